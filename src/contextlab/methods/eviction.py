"""KV-cache eviction scorers: score every cached token, keep the best per (row, KV head).

Each class is a frozen dataclass with one scoring rule; budgets come from :class:`Budget`. Tokens that a
method always keeps (attention sinks, the observation window, H2O's recent tokens) get ``PROTECTED``.
The same scorers run at the end of prefill, after every prefill chunk (``prefill_chunk=N``) and, wrapped in
``decode(...)`` (see :mod:`contextlab.methods.decode`), every N generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from contextlab.methods.attention_scores import accumulated_attention, attention_probs, window_attention
from contextlab.methods.base import (
    PROTECTED,
    Budget,
    Method,
    PrefillMethod,
    ScoreInputs,
    check_int,
    check_number,
    param,
    with_budget,
)


def protect_recent(scores: torch.Tensor, inputs: ScoreInputs, count: torch.Tensor | int) -> torch.Tensor:
    """Give the ``count`` most recent tokens of each row (``[B]`` tensor or int) the PROTECTED score, the
    latest highest. ``scores``: ``[B, 1 | H, S]``; returns float64 ``[B, 1 | H, S]`` broadcast with positions."""
    positions, valid = inputs.positions, inputs.valid
    end = positions.masked_fill(~valid, -1).amax(dim=-1, keepdim=True) + 1  # [B, 1 | H, 1]
    if isinstance(count, torch.Tensor):
        count = count.view(-1, 1, 1)
    recent = (positions >= end - count) & valid
    return torch.where(recent, PROTECTED + positions.double(), scores.double())


@dataclass(frozen=True, eq=False)
class Full(Method):
    """Full attention: keep every token (the baseline every method is measured against)."""

    name = "full"
    paper = "Vaswani et al., 2017, Attention Is All You Need, https://arxiv.org/abs/1706.03762"


@dataclass(frozen=True, eq=False)
class Streaming(PrefillMethod):
    """Attention sinks + a recent window (StreamingLLM; LM-Infinite's Lambda-shaped mask).

    Give ``window`` for a fixed size (budget = sink + window), or a budget and the window is what remains.
    """

    name = "streaming"
    paper = (
        "Xiao et al., 2023, Efficient Streaming Language Models with Attention Sinks, "
        "https://arxiv.org/abs/2309.17453; Han et al., 2023, LM-Infinite, https://arxiv.org/abs/2308.16137"
    )
    sink: int = param("first tokens always kept (attention sinks)", 4)
    window: int | None = param("recent tokens kept; sets the budget to sink + window", None)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("sink", self.sink, 0)
        check_int("window", self.window, 1, allow_none=True)
        if self.window is not None and self.budget is not None:
            raise ValueError("give either a window or a budget for streaming, not both")

    @property
    def effective_budget(self) -> Budget | None:
        return Budget(tokens=self.sink + self.window) if self.window is not None else self.budget

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        recency = inputs.positions.double()
        scores = torch.where(inputs.positions < self.sink, PROTECTED + recency, recency)
        return scores.expand(-1, inputs.keys.shape[1], -1)

    def protected_tokens(self) -> int:
        return self.sink + 1  # the sinks plus at least the newest token


@dataclass(frozen=True, eq=False)
class SnapKV(PrefillMethod):
    """Attention of the last ``window`` queries (the observation window), summed and pooled over
    neighbouring keys; the window itself is always kept.

    Defaults chosen on real models (``benchmarks/results/defaults_sensitivity.md``: SmolLM2-135M-Instruct
    and Gemma-3-270M, single needle at 1K tokens, ratio 0.5): ``kernel=31``, not the paper's 7. Both models
    write a number one digit per token, so a 7-digit value spans 8 tokens past its key and a +-3 pooling
    window keeps only part of it (SmolLM2: 3-4/8 with kernel 7 vs 6/8, as full attention, with 31; Gemma:
    kernel 31 matched full attention at every window). ``window=32`` held on both.
    """

    name = "snapkv"
    paper = "Li et al., 2024, SnapKV: LLM Knows What You are Looking for Before Generation, https://arxiv.org/abs/2404.14469"
    window: int = param("observation window: the last queries whose attention scores the prompt", 32)
    kernel: int = param("pooling kernel over neighbouring keys (odd; 1 = no pooling)", 31)
    pooling: str = param("'avg' or 'max' pooling", "avg")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window", self.window, 1)
        check_int("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        votes = window_attention(inputs, self.window).mean(dim=2).sum(dim=2)  # [B, H, S]
        votes = self._pool(votes, inputs.valid.expand_as(votes))
        return protect_recent(votes, inputs, self.window)

    def _pool(self, votes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Pool over neighbouring TOKENS: valid slots are packed first, so the unused slots that an earlier
        eviction left between kept and new tokens do not count as neighbours (a row pools the same alone
        or in a batch)."""
        if self.kernel == 1:
            return votes
        b, h, s = votes.shape
        order = (~valid).long().argsort(dim=-1, stable=True)  # [B, H, S]: valid slots first, in order
        packed = votes.gather(-1, order).masked_fill(~valid.gather(-1, order), 0.0)
        pool = torch.nn.functional.avg_pool1d if self.pooling == "avg" else torch.nn.functional.max_pool1d
        pooled = pool(packed.reshape(b * h, 1, s), self.kernel, stride=1, padding=self.kernel // 2).view(b, h, s)
        return torch.empty_like(pooled).scatter_(-1, order, pooled)

    def decode_queries(self, every: int) -> int:
        return self.window

    def protected_tokens(self) -> int:
        return self.window


@dataclass(frozen=True, eq=False)
class PyramidKV(SnapKV):
    """SnapKV scores with per-layer budgets that shrink linearly from the bottom layer to the top one
    (pyramidal information funneling); the layers' mean budget is the asked budget."""

    name = "pyramidkv"
    paper = (
        "Cai et al., 2024, PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information "
        "Funneling, https://arxiv.org/abs/2406.02069"
    )
    beta: float = param("top layer keeps budget/beta, bottom layer 2*budget - budget/beta", 20.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("beta", self.beta, 1.0, float("inf"))

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
        counts = self.layer_keep(inputs.keep, inputs.lengths, inputs.layer_idx, inputs.num_layers)
        return counts.view(-1, 1).expand(-1, scores.shape[1])

    def layer_capacity(self, keep: int, length: int, num_layers: int, layer_idx: int) -> int:
        return self.schedule(keep, length, num_layers)[layer_idx]


@dataclass(frozen=True, eq=False)
class TOVA(PrefillMethod):
    """The last query's attention, averaged over all heads of the layer, so every head keeps the same
    tokens."""

    name = "tova"
    paper = "Oren et al., 2024, Transformers are Multi-State RNNs, https://arxiv.org/abs/2401.06104"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        tq = inputs.queries.shape[2]
        probs = attention_probs(inputs, tq - 1, tq)  # [B, H, G, 1, S]
        votes = probs.mean(dim=(1, 2, 3))  # [B, S] (the last query sees every key)
        votes = protect_recent(votes[:, None, :], inputs, 1)
        return votes.expand(-1, inputs.keys.shape[1], -1)

    def decode_queries(self, every: int) -> int:
        return 1

    def protected_tokens(self) -> int:
        return 1


@dataclass(frozen=True, eq=False)
class H2O(PrefillMethod):
    """Heavy hitters: attention accumulated over every query (as in H2O and Scissorhands), plus the most
    recent tokens, which take ``recent`` of the budget. During decoding (``decode(h2o,...)``) the
    accumulated attention of surviving tokens carries over from one eviction to the next.

    ``recent=0.5`` (the H2O paper's even split) was checked on real models
    (``benchmarks/results/defaults_sensitivity.md``, SmolLM2-135M-Instruct and Gemma-3-270M, single needle
    at 1K tokens, ratio 0.5): 0.1-0.75 all answer 1-3 of 8 needles against 6-7 for full attention, so no
    share fixes H2O on needle retrieval, and 0.75 is no better beyond noise.
    """

    name = "h2o"
    paper = (
        "Zhang et al., 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs, "
        "https://arxiv.org/abs/2306.14048; Liu et al., 2023, Scissorhands, https://arxiv.org/abs/2305.17118"
    )
    accumulates: ClassVar[bool] = True
    recent: float = param("fraction of the budget given to the most recent tokens", 0.5)
    chunk: int = param("queries scored at a time (memory is O(chunk x tokens))", 512)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("recent", self.recent, 0.0, 1.0)
        check_int("chunk", self.chunk, 1)

    @property
    def uses_column_sums(self) -> bool:
        return True

    def heavy(self, inputs: ScoreInputs) -> torch.Tensor:
        """``[B, H, S]`` attention accumulated by this step's queries, plus the carried ``prior``."""
        heavy = accumulated_attention(inputs, self.chunk)
        return heavy if inputs.prior is None else heavy + inputs.prior

    def protect(self, heavy: torch.Tensor, inputs: ScoreInputs) -> torch.Tensor:
        """Scores from heavy values: the ``recent`` share of the budget goes to the newest tokens."""
        recent = torch.floor(inputs.keep.float() * self.recent).long()
        return protect_recent(heavy, inputs, recent)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return self.protect(self.heavy(inputs), inputs)

    def decode_queries(self, every: int) -> int:
        return every


@dataclass(frozen=True, eq=False)
class KNorm(PrefillMethod):
    """Keep the keys with the LOWEST L2 norm (low-norm keys draw high attention)."""

    name = "knorm"
    paper = (
        "Devoto et al., 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, "
        "https://arxiv.org/abs/2406.11430"
    )

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)


@dataclass(frozen=True, eq=False)
class Random(PrefillMethod):
    """Uniformly random tokens: the floor every scorer must beat. Scores depend only on (seed, layer, head,
    position), so a row keeps the same tokens alone or in a batch."""

    name = "random"
    paper = "baseline (no paper)"
    seed: int = param("random seed", 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("seed", self.seed, 0)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        b, h = inputs.keys.shape[:2]
        positions = inputs.positions.clamp(min=0)
        span = int(positions.max()) + 1
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + inputs.layer_idx)
        # Drawn position-major, so a position's values do not depend on how many positions are drawn.
        table = torch.rand(span, h, generator=gen).T.to(inputs.keys.device)  # [H, positions]
        return table.unsqueeze(0).expand(b, h, span).gather(-1, positions.expand(b, h, -1))  # [B, H, S]


def resolve_scorer(spec: str | Method, owner: str, allowed: set[str] | None = None) -> PrefillMethod:
    """The scoring method a wrapper (adakv, decode) names: a built method or a spec such as ``snapkv`` or
    ``snapkv(window=16)``; it must score tokens, and it takes its budget from the wrapper."""
    if isinstance(spec, str):
        from contextlab.methods.spec import build_part

        spec = build_part(spec, need_budget=False)
    usable = isinstance(spec, PrefillMethod) and type(spec).score is not PrefillMethod.score
    if not usable or isinstance(spec, AdaKV) or (allowed is not None and spec.name not in allowed):
        names = ", ".join(sorted(allowed)) if allowed else "snapkv, tova, h2o or knorm"
        raise ValueError(f"{owner} needs a scoring method ({names}) as its scorer, got {spec.describe()!r}")
    if spec.budget is not None or spec.prefill_chunk is not None:
        raise ValueError(f"give the budget and prefill_chunk to {owner}, not to its scorer {spec.describe()!r}")
    return spec


@dataclass(frozen=True, eq=False)
class AdaKV(PrefillMethod):
    """Head-wise adaptive budgets on top of any scorer: each layer keeps its H x budget best tokens across
    all heads together, after every head is given ``alpha`` x budget of its own best (the safeguard)."""

    name = "adakv"
    paper = (
        "Feng et al., 2024, Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for "
        "Efficient LLM Inference, https://arxiv.org/abs/2407.11550"
    )
    positional: ClassVar[str | None] = "scorer"
    scorer: str | Method = param("method whose scores are shared out across heads", "snapkv")  # noqa: RUF009
    alpha: float = param("safeguard: fraction of the budget every head keeps for itself", 0.2)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("alpha", self.alpha, 0.0, 1.0)
        _ = self.scoring  # validates the scorer now, not at the first eviction

    @property
    def splits_heads(self) -> bool:
        budget = self.effective_budget
        return budget is not None and budget.ratio != 0.0  # removing nothing keeps every head whole

    @cached_property
    def scoring(self) -> PrefillMethod:
        """The scorer, with this method's budget."""
        return with_budget(self.scorer_method, self.budget)

    @cached_property
    def scorer_method(self) -> PrefillMethod:
        """The scorer as given, resolved and checked (no budget)."""
        return resolve_scorer(self.scorer, "adakv")

    def params(self) -> list[str]:
        out = [p for p in super().params() if not p.startswith("scorer=")]
        nested = self.scorer_method.nested()
        return out if nested == "snapkv" else [*out, f"scorer={nested}"]

    @property
    def uses_column_sums(self) -> bool:
        return self.scoring.uses_column_sums

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return self.scoring.score(inputs)

    def keep_counts(self, inputs: ScoreInputs, scores: torch.Tensor) -> torch.Tensor:
        b, h, s = scores.shape
        keep = inputs.keep  # [B]
        valid = inputs.valid.expand(b, h, s)
        guaranteed = torch.floor(keep.float() * self.alpha).long()
        scores = scores.double().masked_fill(~valid, float("-inf"))
        own_rank = scores.sort(dim=-1, descending=True, stable=True).indices.argsort(-1)  # 0 = the head's best
        boosted = torch.where(own_rank < guaranteed.view(b, 1, 1), scores + 2 * PROTECTED, scores)
        boosted = boosted.masked_fill(~valid, float("-inf")).reshape(b, h * s)
        capacity = int((keep * h).max())
        top = boosted.sort(dim=-1, descending=True, stable=True).indices[:, :capacity]  # [B, capacity]
        chosen = torch.arange(capacity, device=scores.device).view(1, -1) < (keep * h).view(-1, 1)
        heads = torch.where(chosen, top // s, h)  # h = "not chosen"
        counts = torch.zeros(b, h + 1, dtype=torch.long, device=scores.device)
        counts.scatter_add_(1, heads, torch.ones_like(heads))
        return counts[:, :h]

    def layer_capacity(self, keep: int, length: int, num_layers: int, layer_idx: int) -> int:
        return keep  # the heads' mean; groups are resized to their own counts at each eviction
