"""Prefill KV-cache eviction methods: score every prompt token once, keep the best per (row, KV head).

Each class is a frozen dataclass with one scoring rule; budgets come from :class:`Budget`. Tokens that a
method always keeps (attention sinks, the observation window, H2O's recent tokens) get ``PROTECTED``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from contextlab.methods.attention_scores import accumulated_attention, attention_probs, window_attention
from contextlab.methods.base import PROTECTED, Budget, PrefillMethod, ScoreInputs


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


def _row_lengths(inputs: ScoreInputs) -> torch.Tensor:
    return inputs.valid.sum(dim=-1)  # [B]


def _protect_last(scores: torch.Tensor, inputs: ScoreInputs, count: torch.Tensor | int) -> torch.Tensor:
    """Give the last ``count`` tokens of each row (``[B]`` or int) the PROTECTED score, latest highest."""
    lengths = _row_lengths(inputs)
    first = (lengths - count).view(-1, 1)  # [B, 1]
    recent = (inputs.positions >= first) & inputs.valid  # [B, S]
    bonus = PROTECTED + inputs.positions.double()
    return torch.where(recent[:, None, :], bonus[:, None, :], scores.double())


@dataclass(frozen=True)
class Full(PrefillMethod):
    """Full attention: keep every token (the baseline every method is measured against)."""

    name = "full"
    paper = "Vaswani et al., 2017, Attention Is All You Need, https://arxiv.org/abs/1706.03762"

    def __post_init__(self) -> None:
        if self.budget is not None:
            raise ValueError("full attention takes no budget")


@dataclass(frozen=True)
class Streaming(PrefillMethod):
    """Attention sinks + a recent window (StreamingLLM; LM-Infinite's Lambda-shaped mask).

    Give ``window`` for a fixed size (budget = sink + window), or a budget and the window is what remains.
    """

    name = "streaming"
    paper = (
        "Xiao et al., 2023, Efficient Streaming Language Models with Attention Sinks, "
        "https://arxiv.org/abs/2309.17453; Han et al., 2023, LM-Infinite, https://arxiv.org/abs/2308.16137"
    )
    sink: int = _help("first tokens always kept (attention sinks)", 4)
    window: int | None = _help("recent tokens kept; sets the budget to sink + window", None)

    def __post_init__(self) -> None:
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.window is not None:
            if self.window < 1:
                raise ValueError(f"window must be >= 1, got {self.window}")
            if self.budget is not None and self.budget != Budget(tokens=self.sink + self.window):
                raise ValueError("give either a window or a budget for streaming, not both")
            object.__setattr__(self, "budget", Budget(tokens=self.sink + self.window))

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        recency = inputs.positions.double()
        scores = torch.where(inputs.positions < self.sink, PROTECTED + recency, recency)
        return scores[:, None, :].expand(-1, inputs.keys.shape[1], -1)


@dataclass(frozen=True)
class SnapKV(PrefillMethod):
    """Attention of the last ``window`` queries (the observation window), summed and pooled over
    neighbouring keys; the window itself is always kept."""

    name = "snapkv"
    paper = "Li et al., 2024, SnapKV: LLM Knows What You are Looking for Before Generation, https://arxiv.org/abs/2404.14469"
    window: int = _help("observation window: the last queries whose attention scores the prompt", 32)
    kernel: int = _help("pooling kernel over neighbouring keys (odd; 1 = no pooling)", 7)
    pooling: str = _help("'avg' or 'max' pooling", "avg")

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        votes = window_attention(inputs, self.window).mean(dim=2).sum(dim=2)  # [B, H, S]
        votes = self._pool(votes)
        return _protect_last(votes, inputs, self.window)

    def _pool(self, votes: torch.Tensor) -> torch.Tensor:
        if self.kernel == 1:
            return votes
        b, h, s = votes.shape
        flat = votes.reshape(b * h, 1, s)
        pool = torch.nn.functional.avg_pool1d if self.pooling == "avg" else torch.nn.functional.max_pool1d
        return pool(flat, self.kernel, stride=1, padding=self.kernel // 2).view(b, h, s)


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV scores with per-layer budgets that shrink linearly from the bottom layer to the top one
    (pyramidal information funneling); the layers' mean budget is the asked budget."""

    name = "pyramidkv"
    paper = (
        "Cai et al., 2024, PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information "
        "Funneling, https://arxiv.org/abs/2406.02069"
    )
    beta: float = _help("top layer keeps budget/beta, bottom layer 2*budget - budget/beta", 20.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")

    def layer_keep(self, keep: torch.Tensor, lengths: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
        """``[B]`` tokens layer ``layer_idx`` keeps (see :meth:`schedule`)."""
        return torch.tensor(
            [self.schedule(int(k), int(n), num_layers)[layer_idx] for k, n in zip(keep, lengths, strict=True)],
            device=keep.device,
        )

    def schedule(self, keep: int, length: int, num_layers: int) -> list[int]:
        """Per-layer counts: a line from ``2*keep - keep/beta`` (bottom) to ``keep/beta`` (top) whose total is
        ``num_layers * keep``. No layer can hold more than ``length``: what a layer cannot take is spread
        evenly over the others (so at a 100% budget every layer keeps everything). Every layer keeps at
        least ``min(window, length)``, the observation window."""
        low = keep / self.beta
        high = 2 * keep - low
        wanted = [high - (high - low) * i / max(1, num_layers - 1) for i in range(num_layers)]
        counts = [min(float(length), w) for w in wanted]
        total = float(keep * num_layers)
        while total - sum(counts) > 1e-6:
            room = [i for i, c in enumerate(counts) if c < length]
            if not room:
                break
            extra = (total - sum(counts)) / len(room)
            for i in room:
                counts[i] = min(float(length), counts[i] + extra)
        floors = [int(c) for c in counts]
        order = sorted(range(num_layers), key=lambda i: counts[i] - floors[i], reverse=True)
        for i in order[: round(sum(counts)) - sum(floors)]:
            floors[i] += 1
        return [max(min(self.window, length), c) for c in floors]

    def keep_counts(self, inputs: ScoreInputs, scores: torch.Tensor) -> torch.Tensor:
        counts = self.layer_keep(inputs.keep, _row_lengths(inputs), inputs.layer_idx, inputs.num_layers)
        return counts.view(-1, 1).expand(-1, scores.shape[1])


@dataclass(frozen=True)
class TOVA(PrefillMethod):
    """The last query's attention, averaged over all heads of the layer, so every head keeps the same
    tokens."""

    name = "tova"
    paper = "Oren et al., 2024, Transformers are Multi-State RNNs, https://arxiv.org/abs/2401.06104"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        tq = inputs.queries.shape[2]
        probs = attention_probs(inputs, tq - 1, tq)  # [B, H, G, 1, S]
        votes = probs.mean(dim=(1, 2, 3))  # [B, S] (the last query sees every key)
        votes = _protect_last(votes[:, None, :], inputs, 1)
        return votes.expand(-1, inputs.keys.shape[1], -1)


@dataclass(frozen=True)
class H2O(PrefillMethod):
    """Heavy hitters: attention accumulated over every prompt query (as in H2O and Scissorhands),
    plus the most recent tokens, which take ``recent`` of the budget."""

    name = "h2o"
    paper = (
        "Zhang et al., 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs, "
        "https://arxiv.org/abs/2306.14048; Liu et al., 2023, Scissorhands, https://arxiv.org/abs/2305.17118"
    )
    recent: float = _help("fraction of the budget given to the most recent tokens", 0.5)
    chunk: int = _help("queries scored at a time (memory is O(chunk x tokens))", 512)

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"recent must be in [0, 1], got {self.recent}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        heavy = accumulated_attention(inputs, self.chunk)
        recent = torch.floor(inputs.keep.float() * self.recent).long()
        return _protect_last(heavy, inputs, recent)


@dataclass(frozen=True)
class KNorm(PrefillMethod):
    """Keep the keys with the LOWEST L2 norm (low-norm keys draw high attention)."""

    name = "knorm"
    paper = (
        "Devoto et al., 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, "
        "https://arxiv.org/abs/2406.11430"
    )

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)


@dataclass(frozen=True)
class Random(PrefillMethod):
    """Uniformly random tokens: the floor every scorer must beat. Scores depend only on (seed, layer, head,
    position), so a row keeps the same tokens alone or in a batch."""

    name = "random"
    paper = "baseline (no paper)"
    seed: int = _help("random seed", 0)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        h = inputs.keys.shape[1]
        span = int(inputs.positions.max()) + 1
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + inputs.layer_idx)
        # Drawn position-major, so a position's values do not depend on how many positions are drawn.
        table = torch.rand(span, h, generator=gen).T.to(inputs.keys.device)  # [H, positions]
        return table[:, inputs.positions.clamp(min=0)].permute(1, 0, 2)  # [B, H, S]


@dataclass(frozen=True)
class AdaKV(PrefillMethod):
    """Head-wise adaptive budgets on top of any scorer: each layer keeps its H x budget best tokens across
    all heads together, after every head is given ``alpha`` x budget of its own best (the safeguard)."""

    name = "adakv"
    paper = (
        "Feng et al., 2024, Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for "
        "Efficient LLM Inference, https://arxiv.org/abs/2407.11550"
    )
    scorer: PrefillMethod | str = _help("method whose scores are shared out across heads", "snapkv")  # noqa: RUF009
    alpha: float = _help("safeguard: fraction of the budget every head keeps for itself", 0.2)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        scorer = self.scorer
        if isinstance(scorer, str):
            from contextlab.methods.spec import METHODS

            cls = METHODS.get(scorer)
            if cls in (AdaKV, Full):
                raise ValueError("adakv needs a scoring method such as snapkv, tova or knorm as its scorer")
            scorer = cls(budget=self.budget)
        if isinstance(scorer, (AdaKV, Full)) or type(scorer).score is PrefillMethod.score:
            raise ValueError("adakv needs a scoring method such as snapkv, tova or knorm as its scorer")
        object.__setattr__(self, "scorer", scorer)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return self.scorer.score(inputs)

    def keep_counts(self, inputs: ScoreInputs, scores: torch.Tensor) -> torch.Tensor:
        b, h, s = scores.shape
        keep = inputs.keep  # [B]
        guaranteed = torch.floor(keep.float() * self.alpha).long()
        scores = scores.double().masked_fill(~inputs.valid[:, None, :], float("-inf"))
        own_rank = scores.sort(dim=-1, descending=True, stable=True).indices.argsort(-1)  # 0 = the head's best
        boosted = torch.where(own_rank < guaranteed.view(b, 1, 1), scores + 2 * PROTECTED, scores)
        boosted = boosted.masked_fill(~inputs.valid[:, None, :], float("-inf")).reshape(b, h * s)
        capacity = int((keep * h).max())
        top = boosted.sort(dim=-1, descending=True, stable=True).indices[:, :capacity]  # [B, capacity]
        chosen = torch.arange(capacity, device=scores.device).view(1, -1) < (keep * h).view(-1, 1)
        heads = torch.where(chosen, top // s, h)  # h = "not chosen"
        counts = torch.zeros(b, h + 1, dtype=torch.long, device=scores.device)
        counts.scatter_add_(1, heads, torch.ones_like(heads))
        return counts[:, :h]
