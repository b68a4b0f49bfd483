"""Training-free window extension: run a RoPE model past the positions it was trained on.

Two mechanisms, one role (``position remapping``; two remaps in one spec are refused):

- *Remaps* (:class:`SelfExtend`, :class:`String`, :class:`LMInfinite`) keep the model's RoPE and change the
  relative distance each (query, key) pair sees, per layer, through the shared branch machinery of
  :mod:`contextlab.methods.positions` (keys stay cached post-RoPE at their true positions; far pairs are
  rotated for one forward). When every distance of a forward is below the method's exact neighbourhood
  the layer attends with plain SDPA, so within that neighbourhood a remap is exactly full attention.
- *RoPE scaling* (:class:`NTK`, :class:`YaRN`, :class:`Linear`) changes the model's rotary frequencies for
  the call (transformers' own rope-parameter formulas), so every position fits the trained range of
  angles; the original frequencies are restored afterwards (:mod:`contextlab.hf.rope`).

Each method states the longest sequence it serves on a model with ``native`` trained positions
(:meth:`Method.window`); the engine checks prompts against it in one place. Parameters left at ``None``
are derived from the planned length (prompt + tokens to generate) when the call starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from contextlab.methods.base import (
    DECODE_EVICTION,
    POSITIONS,
    PREFILL_EVICTION,
    PROTECTED,
    Budget,
    Method,
    check_int,
    check_number,
    param,
    select_tokens,
)
from contextlab.methods.policy import SELECTED, LayerPolicy, Step
from contextlab.methods.positions import Branch, Far, Near, Region, remapped_attention, rotate
from contextlab.store import DenseStore


class RemapPolicy(LayerPolicy):
    """Attends at a remap method's positions whenever a forward reaches beyond its exact neighbourhood."""

    remaps_positions = True

    def __init__(self, method: Remap) -> None:
        self.method = method
        self.track = False  # set True to record the largest relative distance attended (costs O(Tq * S))
        self.max_distance = -1  # of the last forward that remapped, when tracked

    def attend(self, store: DenseStore, step: Step) -> torch.Tensor | None:
        if step.rope is None or step.native is None:
            raise RuntimeError(
                f"{self.method.describe()} needs the model's rotary frequencies and native window; build the "
                "cache with ContextlabCache(config, method) so the layer can pass them"
            )
        view = store.view()
        q_pos = view.positions[:, 0, -step.tokens :]  # [B, Tq]: the newest slots are this forward's tokens
        last = int(q_pos.max())
        reached = q_pos.amax(-1) + 1
        planned = reached if step.planned is None else torch.tensor(step.planned, device=reached.device)
        needed = torch.maximum(planned, reached).tolist()  # per row, so a row's remap ignores its batch
        branches = self.method.branches(q_pos, view.positions, last, needed, step.native)
        if branches is None:
            return None  # every distance is exact: the layer's SDPA is full attention
        stats = {} if self.track else None
        out = remapped_attention(
            step.queries,
            view.keys,
            view.values,
            view.valid,
            q_pos,
            view.positions,
            branches,
            step.rope,
            step.scaling,
            stats=stats,
        )
        if stats is not None:
            self.max_distance = stats["max_distance"]
        return out


PREFILL_CHUNK_HELP = (
    "feed the prompt this many tokens at a time (same result; scores and activations of one chunk at once, "
    "and a model's sliding-window layers then attend over chunk + window, not the whole prompt); None = all "
    "at once"
)


@dataclass(frozen=True, eq=False)
class Remap(Method):
    """Base of position remaps (see module docstring).

    ``prefill_chunk=N`` feeds a long prompt ``N`` tokens at a time. A remap's parameters come from the
    planned length, known before the first chunk, and every chunk's queries read all keys before them, so
    the result is the one-forward result (up to float rounding); what changes is the peak memory (one
    chunk's attention scores and activations) and, on models with sliding-window layers (Gemma 3), their
    cost: those layers read chunk + window keys per chunk instead of the whole prompt."""

    roles: ClassVar[frozenset[str]] = frozenset({POSITIONS})
    remaps_positions: ClassVar[bool] = True
    prefill_chunk: int | None = param(PREFILL_CHUNK_HELP, None)

    def __post_init__(self) -> None:
        check_int("prefill_chunk", self.prefill_chunk, 1, allow_none=True)

    def prefill_chunk_size(self) -> int | None:
        return self.prefill_chunk

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        return RemapPolicy(self)

    def branches(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, last: int, needed: list[int], native: int
    ) -> list[Branch] | None:
        """The branches of one forward (None = every pair is at its true distance). ``q_pos [B, Tq]``,
        ``k_pos [B, Hv, S]``, ``last``: the largest query position, ``needed``: positions each row plans
        to reach (its prompt + tokens to follow), ``native``: the model's trained positions."""
        raise NotImplementedError


def _check_window(name: str, window: int, native: int) -> None:
    if window >= native:
        raise ValueError(
            f"{name} window of {window} positions must be smaller than the model's native window of {native}"
        )


@dataclass(frozen=True, eq=False)
class SelfExtend(Remap):
    """Self-Extend: exact attention to the ``window`` nearest tokens, grouped positions for the rest.

    A key at position ``k`` farther than ``window`` from the query at ``q`` is seen at distance
    ``(q // G + window - window // G) - k // G``: floor division by the group size ``G`` maps ``G``
    neighbouring positions to one, and the shift makes the grouped distances continue where the exact
    ones stop. Both logits come from the model's own attention and are merged in one softmax per query
    (Jin et al., 2024, Sec. 3). The largest position used is ``(n - 1) // G + window - window // G``.

    ``group=None`` picks ``G`` per row from its planned length: ``G = 1`` (exactly full attention) when the
    row fits the native window, else the smallest ``G`` that keeps every position below ``reach`` x the
    native window. ``reach=0.5`` because models use their trained distances well only up to about half
    the window (STRING, An et al., 2024; our reference model: 100% single-needle accuracy at 2K of its 4K
    window, 62% at 4K); on it, 8K-16K needles were found more often with the larger groups this gives.
    """

    name = "selfextend"
    paper = "Jin et al., 2024, LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning, https://arxiv.org/abs/2401.01325"
    group: int | None = param("group size G (positions per grouped position); None = smallest that fits", None)
    window: int | None = param(
        "neighbour window W kept at exact distances; None = a quarter of the native window", None
    )
    reach: float = param("with group unset: grouped positions stay below this fraction of the native window", 0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("group", self.group, 1, allow_none=True)
        check_int("window", self.window, 1, allow_none=True)
        check_number("reach", self.reach, 0.0, 1.0)

    def neighbours(self, native: int) -> int:
        w = self.window if self.window is not None else native // 4
        _check_window("selfextend", w, native)
        return w

    def window_for(self, native: int) -> int | None:
        w = self.neighbours(native)
        if self.group is None:
            self._limit(w, native)
            return None
        return (native - w + w // self.group) * self.group

    def group_for(self, needed: int, native: int) -> int:
        """The group size used for a call that reaches ``needed`` positions."""
        w = self.neighbours(native)
        if self.group is not None:
            return self.group
        if needed <= native:
            return 1
        limit, g = self._limit(w, native), 1
        while (needed - 1) // g + w - w // g >= limit:
            g += 1
        return g

    def _limit(self, w: int, native: int) -> int:
        """Positions grouped attention may use (group unset): ``reach`` x native, above the window."""
        limit = int(self.reach * native)
        if limit <= w:
            raise ValueError(
                f"selfextend reach {self.reach} x the native window ({limit} positions) leaves no room beyond the "
                f"{w}-token neighbour window; raise reach or lower window"
            )
        return limit

    def branches(self, q_pos, k_pos, last, needed, native):
        w = self.neighbours(native)
        groups = [self.group_for(n, native) for n in needed]
        if last < w or max(groups) == 1:
            return None
        g = torch.tensor(groups, device=q_pos.device)
        gq, gk = g.view(-1, 1), g.view(-1, 1, 1)
        grouped_q = q_pos // gq + (w - w // gq)
        return [Branch(Near(w)), Branch(Far(w), q_shift=grouped_q - q_pos, k_shift=k_pos // gk - k_pos)]


@dataclass(frozen=True, eq=False)
class String(Remap):
    """STRING: distances of at least ``S`` are shifted down to start at ``local``, so the model uses only its
    frequently trained small distances (An et al., 2024: the left-skewed frequency of relative positions in
    training leaves the largest ones undertrained). A pair at distance ``d >= S`` is seen at
    ``d - S + local``; nearer pairs are exact. The paper sets ``S`` to 0.25-0.4 of the length (0.33 by
    default) and ``local`` to 128. Past the native window ``L``, ``S`` is raised so the largest shifted
    distance stays inside it, and it may not exceed ``L`` (the exact pairs must stay inside too), so one
    shift serves at most ``2 L - local`` positions. STRING changes attention within the native window too
    (that is its purpose), so it is not full attention there.
    """

    name = "string"
    paper = (
        "An et al., 2024, Why Does the Effective Context Length of LLMs Fall Short?, https://arxiv.org/abs/2410.18745"
    )
    shift: float = param("offset S as a fraction of the planned length (paper: 0.25-0.4)", 0.33)
    offset: int | None = param("offset S in positions (overrides shift)", None)
    local: int | None = param(
        "distance the shifted pairs start from (paper: 128; 256-512 if results degrade); None = 128, or a "
        "sixteenth of a native window shorter than 2048",
        None,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("shift", self.shift, 0.0, 1.0)
        check_int("offset", self.offset, 1, allow_none=True)
        check_int("local", self.local, 1, allow_none=True)
        if self.offset is not None and self.local is not None and self.offset <= self.local:
            raise ValueError(f"offset ({self.offset}) must be larger than local ({self.local})")

    def local_for(self, native: int) -> int:
        local = self.local if self.local is not None else min(128, max(1, native // 16))
        _check_window("string local", local, native)
        if self.offset is not None and self.offset <= local:
            raise ValueError(f"offset ({self.offset}) must be larger than local ({local})")
        if self.offset is not None and self.offset > native:
            raise ValueError(
                f"string offset of {self.offset} exceeds the model's native window of {native}: pairs nearer than "
                "the offset keep their distance, which must stay inside the window"
            )
        return local

    def window_for(self, native: int) -> int | None:
        local = self.local_for(native)
        return native + (self.offset if self.offset is not None else native) - local

    def offset_for(self, needed: int, native: int) -> int:
        local = self.local_for(native)
        if self.offset is not None:
            return self.offset
        return min(native, max(round(self.shift * needed), needed - native + local, local + 1))

    def branches(self, q_pos, k_pos, last, needed, native):
        local = self.local_for(native)
        offsets = [self.offset_for(n, native) for n in needed]
        if last < min(offsets):
            return None
        s = torch.tensor(offsets, device=q_pos.device)
        return [Branch(Near(s)), Branch(Far(s), q_shift=(local - s).view(-1, 1).expand_as(q_pos))]


@dataclass(frozen=True, eq=False)
class LMInfinite(Remap):
    """LM-Infinite: a Lambda-shaped mask (the first ``sink`` tokens plus the ``window`` nearest) and a
    distance cap: a sink farther than the window is seen at distance ``window - 1``. Tokens outside the
    Lambda are never read again, so after the prompt the cache keeps only sink + window tokens (O(n) time
    and memory for decoding; Han et al., 2023, Sec. 4). Within ``window`` tokens it is full attention.
    """

    name = "lminfinite"
    paper = "Han et al., 2023, LM-Infinite: Zero-Shot Extreme Length Generalization for LLMs, https://arxiv.org/abs/2308.16137"
    roles: ClassVar[frozenset[str]] = frozenset({POSITIONS, PREFILL_EVICTION, DECODE_EVICTION})
    sink: int = param("starting tokens every query attends to (paper: 10)", 10)
    window: int | None = param("nearest tokens attended at exact distance; None = the native window", None)
    slack: int = param("tokens decoded between two cuts of the cache back to sink + window", 64)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("sink", self.sink, 0)
        check_int("window", self.window, 2, allow_none=True)
        check_int("slack", self.slack, 1)

    def local(self, native: int) -> int:
        if self.window is None:
            return native
        if self.window > native:
            raise ValueError(f"lminfinite window of {self.window} exceeds the model's native window of {native}")
        return self.window

    def window_for(self, native: int) -> int | None:
        self.local(native)
        return None

    @property
    def compresses(self) -> bool:
        return True

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        return LMInfinitePolicy(self)

    def branches(self, q_pos, k_pos, last, needed, native):
        w = self.local(native)
        if last < w:
            return None
        return [Branch(Near(w)), Branch(Far(w, below=self.sink), q_shift=(w - 1) - q_pos, k_shift=-k_pos)]


class LMInfinitePolicy(RemapPolicy):
    """LM-Infinite's attention plus its eviction: once the prompt is in, slots outside every later query's
    Lambda are dropped (cut back to sink + window - 1 whenever ``slack`` more tokens arrived)."""

    method: LMInfinite

    def after_forward(self, store: DenseStore, step: Step) -> None:
        if step.phase == "prefill" or step.native is None:
            return
        keep = self.method.sink + self.method.local(step.native) - 1
        if store.length < keep + (self.method.slack if step.phase == "decode" else 1):
            return
        view = store.view()
        positions, valid = view.positions, view.valid
        last = positions.masked_fill(~valid, -1).amax(-1, keepdim=True)  # [B, Hv, 1]
        # The next query sits at last + 1 and reads distances below the window: positions > last + 1 - window.
        seen = (positions < self.method.sink) | (positions > last + 1 - self.method.local(step.native))
        h = store.num_heads
        scores = torch.where(seen & valid, PROTECTED + positions.double(), positions.double()).expand(-1, h, -1)
        counts = (seen & valid).sum(-1).expand(-1, h)
        indices, kept = select_tokens(scores, counts, valid)
        store.keep(indices, kept, headroom=self.method.slack + step.answer_room)

    def capacity_hint(self, columns: int) -> int:
        return columns

    def decode_reserve(self, tokens: int) -> int:
        return min(tokens, self.method.slack)


# -- RoPE scaling ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RopeScaling(Method):
    """Base of RoPE-scaling methods: a transformers rope type with a scale factor for the call."""

    roles: ClassVar[frozenset[str]] = frozenset({POSITIONS})
    rope_type: ClassVar[str] = ""
    rescales_rope: ClassVar[bool] = True
    factor: float | None = param("scale factor; None = planned length / native window (at least 1)", None)

    def __post_init__(self) -> None:
        if self.factor is not None:
            check_number("factor", self.factor, 1.0, 1e6)

    def window_for(self, native: int) -> int | None:
        return None if self.factor is None else int(native * self.factor)

    def factor_for(self, needed: int, native: int) -> float:
        return float(self.factor) if self.factor is not None else max(1.0, needed / native)

    def rope_scaling(self, needed: int, native: int) -> dict | None:
        factor = self.factor_for(needed, native)
        if factor == 1.0:
            return None  # the model's own RoPE
        return {"rope_type": self.rope_type, "factor": factor, "original_max_position_embeddings": native}


@dataclass(frozen=True, eq=False)
class NTK(RopeScaling):
    """NTK-aware RoPE scaling: the rotary base grows by ``s ** (d / (d - 2))`` so the slowest frequencies
    stretch by ``s`` while the fastest stay (bloc97, 2023; dynamic NTK, emozilla, 2023). Evaluated once at
    the planned length (transformers' ``dynamic`` formula at that length), not per step, so cached keys
    and later queries share one set of frequencies. One rotary module serves the whole batch, so with
    ``factor`` unset a batch takes its longest row's factor; set ``factor`` for answers that do not depend on
    the batch."""

    name = "ntk"
    paper = "bloc97, 2023, NTK-Aware Scaled RoPE; Peng et al., 2023, YaRN (Sec. 3.2), https://arxiv.org/abs/2309.00071"
    rope_type = "dynamic"


@dataclass(frozen=True, eq=False)
class YaRN(RopeScaling):
    """YaRN: per-frequency interpolation (high frequencies kept, low ones divided by the factor, a ramp in
    between) plus an attention temperature ``0.1 ln s + 1`` (Peng et al., 2023), through transformers'
    ``yarn`` rope parameters."""

    name = "yarn"
    paper = "Peng et al., 2023, YaRN: Efficient Context Window Extension of Large Language Models, https://arxiv.org/abs/2309.00071"
    rope_type = "yarn"


@dataclass(frozen=True, eq=False)
class Linear(RopeScaling):
    """Linear position interpolation: positions divided by the factor (Chen et al., 2023), through
    transformers' ``linear`` rope parameters."""

    name = "linear"
    paper = "Chen et al., 2023, Extending Context Window of Large Language Models via Positional Interpolation, https://arxiv.org/abs/2306.15595"
    rope_type = "linear"


# -- retrieval with position reset ------------------------------------------------------------------------------


class All(Region):
    """Every causal pair."""

    def contains(self, qp, kp):
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=qp.device)

    def span(self, qmin, qmax):
        return 0, qmax


SHARES = ("none", "all")
SHARED_VOTES = "infiniretri.votes"  # Step.shared: this forward's votes by position (share=all)
PENDING = "infiniretri.pending"  # Step.shared: the layers that voted and wait for the last one to evict


@dataclass(frozen=True, eq=False)
class InfiniRetri(Method):
    """Read a long input segment by segment inside the native window, keep what the question attends to,
    and re-number what is kept contiguously (InfiniRetri, Ye et al., 2025; LongCache, Liu et al., 2024).

    The prompt is fed ``chunk`` tokens at a time and the question is appended to every chunk (InfiniRetri's
    per-segment question); the question's attention scores the tokens (SnapKV's observation-window votes,
    pooled over neighbouring tokens as InfiniRetri's phrase-level pooling) and ``budget`` tokens are kept;
    the question copies are dropped, the real question stays at the end of the last chunk.

    Default (``reencode=true``, ``share=all``), the paper's way: after every segment but the last, the votes
    of all layers (each layer's normalised to one per row, summed by position) pick one set of token ids,
    the first ``sink`` tokens first (StreamingLLM's attention sinks); the engine feeds those ids, the next
    segment and the question copy into a fresh cache at contiguous positions (:meth:`Method.reencodes`).
    The last segment's cache (kept ids + last segment with the question, nothing evicted) is the one
    decoding reads, with plain attention. Each kept token is encoded again with every later segment
    (``budget`` extra tokens per segment); the cache kept holds up to budget + chunk + question tokens.

    ``reencode=false`` keeps KV entries instead (as LongCache selects cache entries): nothing is encoded
    twice, each layer evicts down to ``budget`` after every segment (``share=none``: each layer's heads keep
    what they vote for; ``share=all``: one set for every layer and head, the last layer evicting them all),
    and every forward attends at *ranks* (a kept token's position is its index in the cache), so budget +
    chunk + question + answer must fit the native window.

    Why the default (benchmarks/results/extension.md, SmolLM2-135M-Instruct, single needle, same needles):
    at 16K re-encoding found 29 of 30 against 21 for KV reuse (``share=none,sink=0``), at 32K 26 of 30, and
    15 of the 18 needles on which KV reuse found 7 (probes: ``share=none`` drops the needle in the layers
    whose question attention misses it, 0-6 and 25-28, and the first tokens in layers 0-11;
    ``share=all,sink=4`` keeps both yet found 5 of 12, its kept ids re-encoded 9 of 12): KV entries computed
    inside their own segment, then re-rotated to new ranks, lose what the same ids read together still
    answer.
    """

    name = "infiniretri"
    paper = (
        "Ye et al., 2025, Infinite Retrieval: Attention Enhanced LLMs in Long-Context Processing, "
        "https://arxiv.org/abs/2502.12962; Liu et al., 2024, Farewell to Length Extrapolation, a Training-Free "
        "Infinite Context with Finite Attention Scope (LongCache)"
    )
    roles: ClassVar[frozenset[str]] = frozenset({POSITIONS, PREFILL_EVICTION})
    remaps_positions: ClassVar[bool] = True
    budget: Budget = param("tokens kept between segments (budget=N)", Budget(tokens=1024))  # noqa: RUF009
    chunk: int = param("prompt tokens per segment", 2048)
    window: int = param("observation window: the last queries (the question) whose attention scores tokens", 32)
    kernel: int = param("pooling kernel over neighbouring tokens (phrase-level selection; odd)", 31)
    sink: int = param("first tokens always kept (attention sinks, StreamingLLM)", 4)
    share: str = param(
        "none: every layer's heads keep what they vote for; all: every layer keeps the most voted", "all"
    )
    reencode: bool = param(
        "keep token ids (one set, share=all) and encode them again with the next segment (the paper's way); "
        "false: keep KV entries, attend at ranks",
        True,
    )

    def __post_init__(self) -> None:
        if self.share not in SHARES:
            raise ValueError(f"infiniretri share must be one of {', '.join(SHARES)}, got {self.share!r}")
        if self.reencode and self.share != "all":
            raise ValueError(
                "infiniretri reencode=true keeps one set of token ids for the whole model, chosen by the votes of "
                "every layer: it needs share=all (reencode=false keeps each layer's KV entries, share=none allowed)"
            )
        if not isinstance(self.budget, Budget) or self.budget.tokens is None:
            raise ValueError(
                f"infiniretri needs a token budget (budget=N; the input has no fixed length), got {self.budget!r}"
            )
        check_int("chunk", self.chunk, 1)
        check_int("window", self.window, 1)
        check_int("kernel", self.kernel, 1)
        check_int("sink", self.sink, 0)
        if self.sink >= self.keep:
            raise ValueError(f"infiniretri sink ({self.sink}) must be smaller than its budget ({self.keep} tokens)")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {self.kernel}")

    @property
    def compresses(self) -> bool:
        return True

    def prefill_chunk_size(self) -> int | None:
        return self.chunk

    def repeats_question(self) -> bool:
        return True

    def reencodes(self) -> bool:
        return self.reencode

    @property
    def keep(self) -> int:
        return self.budget.tokens

    def prompt_keep(self, length: int) -> int | None:
        # reencode: the last segment is read whole, after the tokens kept from the ones before it
        return min(length, self.keep + self.chunk) if self.reencode else min(length, self.keep)

    def window_for(self, native: int) -> int | None:
        if self.keep + self.chunk >= native:
            raise ValueError(
                f"infiniretri holds budget + chunk = {self.keep + self.chunk} tokens at once, which must stay "
                f"below the model's native window of {native} (with room for the question and the answer)"
            )
        return None

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        return InfiniRetriPolicy(self)


class InfiniRetriPolicy(LayerPolicy):
    """Attention at ranks (see :class:`InfiniRetri`) and eviction after every segment."""

    remaps_positions = True

    def __init__(self, method: InfiniRetri) -> None:
        from contextlab.methods.eviction import SnapKV

        self.method = method
        self.scorer = SnapKV(budget=method.budget, window=method.window, kernel=method.kernel)
        self.reranked = False  # True once an eviction made ranks differ from positions

    def attend(self, store: DenseStore, step: Step) -> torch.Tensor | None:
        if not store.keeps_positions and store.length <= (step.native or 1 << 62):
            return None  # nothing evicted (a first segment, reencode's caches): positions are ranks, no host sync
        view = store.view()
        valid = view.valid
        ranks = (valid.long().cumsum(-1) - 1).clamp(min=0)  # [B, Hv, S]: index among the kept slots
        if int(ranks.max()) >= (step.native or 1 << 62):
            raise ValueError(
                f"infiniretri holds {int(ranks.max()) + 1} tokens in one layer, more than the model's native window "
                f"of {step.native}; lower its budget or chunk (the question and the answer need room too)"
            )
        if not self.reranked and bool((ranks == view.positions).all()):
            return None  # ranks are the true positions: plain attention
        q_pos = view.positions[:, 0, -step.tokens :]
        q_rank = ranks[:, 0, -step.tokens :]
        branch = Branch(All(), q_shift=q_rank - q_pos, k_shift=ranks - view.positions)
        return remapped_attention(
            step.queries, view.keys, view.values, valid, q_pos, view.positions, [branch], step.rope, step.scaling
        )

    def after_forward(self, store: DenseStore, step: Step) -> None:
        if step.phase == "decode" or step.prompt_lengths is None:
            return
        if self.method.reencode and not step.segment:
            return  # the last segment (or the only one) is read whole: nothing is dropped
        transient = step.transient
        if store.length - transient <= self.method.keep and not transient and not step.segment:
            return  # nothing to drop (a segment of reencode always names what it keeps)
        from contextlab.methods.prefill import score_inputs

        view = store.view()
        b, h = view.keys.shape[0], view.keys.shape[1]
        device = view.keys.device
        keep = torch.full((b,), self.method.keep, device=device)
        lengths = torch.tensor(step.prompt_lengths, device=device)
        inputs = score_inputs(view, step, keep, lengths)
        if store.keeps_positions:  # else nothing was evicted yet: ranks are the positions, no rotation needed
            # Score at ranks too: the question's attention at true distances would leave the trained range.
            ranks = (view.valid.long().cumsum(-1) - 1).clamp(min=0)
            tq = step.tokens
            q_shift = (ranks[:, 0, -tq:] - view.positions[:, 0, -tq:])[:, None, :]
            inputs.queries = rotate(step.queries, q_shift, step.rope)
            inputs.keys = rotate(view.keys, (ranks - view.positions).expand(b, h, -1), step.rope)
        scores = self.scorer.score(inputs)  # [B, H, S]
        # The first tokens stay (StreamingLLM's attention sinks): without them attention has nowhere to rest.
        scores = torch.where(view.positions < self.method.sink, PROTECTED + view.positions.double(), scores)
        valid = view.valid.expand(b, h, -1).clone()
        if transient:
            valid[:, :, -transient:] = False  # the question copy scored this segment; it is not context
        more = step.phase == "prefill"
        room = self.method.chunk + transient if more else step.answer_room
        if self.method.share == "none":
            self.evict(store, scores, valid, keep, room, more)
            return
        # share=all: vote now, evict once every layer has voted (the last layer evicts them all; keep, room
        # and phase are the same for every layer of one forward)
        positions = view.positions.expand(b, h, -1)
        add_votes(scores, positions, valid, step)
        if self.method.reencode:
            if step.layer_idx == step.num_layers - 1:
                step.shared[SELECTED] = select_positions(step.shared.pop(SHARED_VOTES), scores, positions, valid, keep)
            return
        if step.layer_idx == 0:
            step.shared[PENDING] = []
        step.shared[PENDING].append((self, store, scores, positions, valid))
        if step.layer_idx < step.num_layers - 1:
            return
        votes = step.shared.pop(SHARED_VOTES)
        for policy, layer_store, own, layer_positions, layer_valid in step.shared.pop(PENDING):
            policy.evict(layer_store, voted(votes, own, layer_positions), layer_valid, keep, room, more)

    def evict(self, store, scores, valid, keep, room: int, more: bool) -> None:
        """Keep the ``keep [B]`` best-scored valid slots of every head of this layer."""
        b, h = scores.shape[:2]
        counts = torch.minimum(keep.view(b, 1).expand(b, h), valid.sum(-1))
        indices, kept = select_tokens(scores, counts, valid)
        store.keep(indices, kept, room, shrink=not more)
        self.reranked = True

    def capacity_hint(self, columns: int) -> int:
        # reencode: every forward starts a cache of its own and evicts nothing
        return columns if self.method.reencode else min(columns, self.method.keep + self.method.chunk)


def select_positions(
    votes: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """``reencode``: the ``keep [B]`` positions ``[B, K]`` (ascending, -1 past a row's count) with the most
    ``votes [B, P]`` (summed over every layer by :func:`add_votes`) among one layer's valid slots; slots
    that layer's ``scores [B, H, S]`` protect (sinks, SnapKV's recent window) come first. Every head of a
    segment's fresh cache holds the same slots, so head 0 stands for them."""
    where, ok = positions[:, :1], valid[:, :1]
    counts = torch.minimum(keep.view(-1, 1), ok.sum(-1))
    indices, kept = select_tokens(voted(votes, scores[:, :1], where), counts, ok)
    return where.gather(-1, indices).masked_fill(~kept, -1)[:, 0].long()


def voted(votes: torch.Tensor, own: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``share=all``: each slot's score ``[B, H, S]`` is the summed ``votes [B, P]`` at its position, except
    the slots this layer's own scores protect (sinks, SnapKV's recent window), which keep them."""
    common = votes.gather(1, positions.clamp(min=0).flatten(1)).view_as(own)
    return torch.where(own >= PROTECTED, own, common)


def add_votes(scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, step: Step) -> None:
    """InfiniRetri's ``share=all``: add this layer's votes ``[B, H, S]`` (float64, PROTECTED scores
    included) to the votes of this forward in ``step.shared``, keyed by token position (layer 0 starts
    afresh). Each head's votes over its valid unprotected slots are normalised to sum to one and averaged
    over heads, so every layer adds one unit of vote per row whatever its attention's scale; protected slots
    (the recent tokens SnapKV always keeps) and invalid ones add nothing.
    """
    if step.shared is None:
        raise RuntimeError("infiniretri share=all needs the cache's shared scratch space (Step.shared)")
    b, h, _ = scores.shape
    own = scores.masked_fill((scores >= PROTECTED) | ~valid, 0.0)
    own = own / own.sum(-1, keepdim=True).clamp(min=1e-30) / h
    slots = positions.clamp(min=0)
    width = int(slots.max()) + 1
    votes = step.shared.get(SHARED_VOTES)
    if step.layer_idx == 0 or votes is None:
        votes = torch.zeros(b, width, dtype=torch.float64, device=scores.device)
    elif votes.shape[1] < width:
        votes = torch.nn.functional.pad(votes, (0, width - votes.shape[1]))
    step.shared[SHARED_VOTES] = votes.scatter_add(1, slots.reshape(b, -1), own.reshape(b, -1))
