"""Sparse prefill: MInference's per-head patterns, found on the model itself and applied while the prompt is in.

MInference 1.0 (Jiang et al., 2024, arXiv 2407.02490; "up to 10x" prefill speed-up at 1M tokens on an A100
"while maintaining accuracy") assigns every attention head one of three sparse shapes offline and estimates
the shape's indices online from the prompt's last queries. Here:

- **Offline** (:func:`search_patterns`, once per model and settings, saved by :mod:`contextlab.methods.profiles`):
  the queries and keys of every layer on a synthetic retrieval prompt are captured; for each head the
  attention of a sample of query rows (the last ``last`` and a spread of earlier ones) is computed exactly,
  and each candidate shape (A-shape; vertical-slash and block-sparse with indices estimated as at run time)
  is scored by its *recall*, the share of that attention it keeps. A head takes its best shape, or stays
  dense when no shape recalls ``recall`` of its attention (the paper has no dense fallback; it makes
  ``recall=1`` exactly full attention: every head stays dense, whatever a float sum of recall says).
- **Online** (:class:`MInferencePolicy`): a prompt forward of at least ``min_length`` cached tokens computes
  each layer's attention with the heads' shapes (:mod:`contextlab.kernels.sparse_prefill`: compiled flex
  attention over the active tiles, or the dense masked reference where compiling is impossible); each
  left-padded row of a batch is computed alone, so its shapes sit at its own positions. Decode steps, short
  prompts, and prompts whose slots were evicted or moved are read densely.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from contextlab.hf.support import output_projections
from contextlab.kernels.sparse_prefill import (
    PrefillPattern,
    estimate_blocks,
    estimate_vertical_slash,
    reference_prefill,
    sparse_prefill,
    token_mask,
)
from contextlab.methods.base import (
    DECODE_EVICTION,
    PREFILL_EVICTION,
    SPARSE_PREFILL,
    Method,
    bound,
    check_int,
    check_number,
    param,
)
from contextlab.methods.policy import LayerPolicy, Step
from contextlab.methods.profiles import (
    ProfileError,
    capture_prompt,
    load_profile,
    model_digest,
    profile_path,
    save_profile,
)
from contextlab.store import DenseStore

SHAPES = ("dense", "a_shape", "vertical_slash", "block_sparse")
BLOCK = 64  # tokens per block of a block-sparse head


@dataclass(frozen=True, eq=False)
class MInference(Method):
    """Per-head sparse prefill (module docstring): A-shape heads read ``sink`` + ``local``, vertical-slash
    heads ``vertical`` columns and ``slash`` diagonals (plus the sinks and the ``last`` nearest diagonals),
    block-sparse heads ``blocks`` blocks of 64 per block row (plus the diagonal block)."""

    name = "minference"
    paper = "Jiang et al., 2024, MInference 1.0, https://arxiv.org/abs/2407.02490"
    roles: ClassVar[frozenset[str]] = frozenset({SPARSE_PREFILL})
    sink: int = param("first tokens an A-shape or vertical-slash head always reads", 64)
    local: int = param("recent tokens an A-shape head reads", 1024)
    vertical: int = param("key columns a vertical-slash head reads", 512)
    slash: int = param("diagonals (distances back) a vertical-slash head reads", 1024)
    blocks: int = param("blocks of 64 tokens each block row of a block-sparse head reads", 16)
    last: int = param("last queries that estimate the vertical-slash and block indices", 64)
    recall: float = param("a head whose best shape keeps less of its attention than this stays dense", 0.95)
    calibration: int = param("tokens of the synthetic retrieval prompt the offline search runs on", 4096)
    min_length: int = param("prompts with fewer cached tokens are prefilled densely", 2048)
    profile: str = param("profile file to use (empty: found in, or made into, the profile folder)", "")
    shapes: tuple[tuple[str, ...], ...] | None = bound()  # each layer's head shapes, once bound to a model

    def __post_init__(self) -> None:
        for name, low in (("sink", 0), ("local", 1), ("vertical", 0), ("slash", 0), ("blocks", 1), ("last", 1)):
            check_int(f"minference: {name}", getattr(self, name), low)
        check_int("minference: calibration", self.calibration, 1024)
        check_int("minference: min_length", self.min_length, 1)
        check_number("minference: recall", self.recall, 0.0, 1.0)

    # -- binding to a model (the offline search) ------------------------------------------------------------
    def settings(self) -> dict:
        """What the offline search depends on (a profile is valid only for the same settings)."""
        keys = ("sink", "local", "vertical", "slash", "blocks", "last", "recall", "calibration")
        return {k: getattr(self, k) for k in keys}

    def bind(self, model, tokenizer) -> MInference:
        """This method with each head's shape for ``model``: from ``profile=``, from the profile folder, or
        searched now (and saved there)."""
        if self.shapes is not None:
            return self
        return self.with_shapes(bound_profile(self, model, tokenizer, search_patterns, "shapes"))

    def with_shapes(self, shapes) -> MInference:
        """A copy holding the head shapes of each full-attention layer, in order."""
        for layer in shapes:
            for shape in layer:
                if shape not in SHAPES:
                    raise ValueError(f"minference: unknown head shape {shape!r}; expected one of {SHAPES}")
        return dataclasses.replace(self, shapes=tuple(tuple(x) for x in shapes))

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        if self.shapes is not None and len(self.shapes) != num_layers:
            raise ValueError(
                f"minference: the profile covers {len(self.shapes)} full-attention layers, this model has "
                f"{num_layers}; profile this model again"
            )
        return MInferencePolicy(self, None if self.shapes is None else self.shapes[layer_idx])


class MInferencePolicy(LayerPolicy):
    """One layer's head shapes; computes the prompt's attention sparsely (module docstring)."""

    def __init__(self, method: MInference, shapes: tuple[str, ...] | None) -> None:
        self.method, self.shapes = method, shapes
        self.sparse_forwards = 0  # prompt forwards computed with the sparse shapes
        self.density = 0.0  # share of the causal map the last sparse forward computed (token level)

    def attend(self, store: DenseStore, step: Step) -> torch.Tensor | None:
        if step.phase == "decode" or step.tokens == 1 or store.length < self.method.min_length:
            return None
        if self.shapes is None:
            raise ValueError(
                "minference has no per-head shapes for this model: run it through contextlab.generate / prefill / "
                "Session (they profile the model first) or pass profile=<file from `contextlab profile`>"
            )
        if all(shape == "dense" for shape in self.shapes):
            return None
        heads = step.queries.shape[1]
        if len(self.shapes) != heads:
            raise ValueError(f"minference: the profile has {len(self.shapes)} heads here, the layer has {heads}")

        def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            pattern = online_pattern(self.method, self.shapes, queries, keys, step.scaling)
            return sparse_prefill(queries, keys, values, pattern, step.scaling)

        out = each_row(store, step, attend)
        self.sparse_forwards += out is not None
        return out


def online_pattern(
    method: MInference, shapes: tuple[str, ...], queries: torch.Tensor, keys: torch.Tensor, scaling: float
) -> PrefillPattern:
    """Each head's shape with its indices estimated from ``queries [B, Hq, Tq, D]`` over ``keys``."""
    h, device = len(shapes), queries.device
    kind = {name: torch.tensor([x == name for x in shapes], device=device) for name in SHAPES}
    sink = torch.where(kind["a_shape"] | kind["vertical_slash"], method.sink, 0).long()
    window = torch.where(kind["a_shape"], method.local, torch.where(kind["vertical_slash"], method.last, 0)).long()
    pattern = PrefillPattern(kind["dense"], sink, window, block=BLOCK)
    if bool(kind["vertical_slash"].any()):
        vertical, slash = estimate_vertical_slash(queries, keys, scaling, method.vertical, method.slash, method.last)
        pattern.vertical = vertical & kind["vertical_slash"].view(h, 1)
        pattern.slash = slash & kind["vertical_slash"].view(h, 1)
    if bool(kind["block_sparse"].any()):
        blocks = estimate_blocks(queries, keys, scaling, method.blocks, BLOCK)
        pattern.blocks = blocks & kind["block_sparse"].view(h, 1, 1)
    return pattern


# -- the offline search ---------------------------------------------------------------------------------------
def search_patterns(model, tokenizer, method: MInference, seed: int = 0) -> dict:
    """Each full-attention layer's head shapes (in layer order; sliding-window layers keep their own bounded
    cache) on a synthetic retrieval prompt (module docstring), with their recall."""
    native = getattr(model.config, "max_position_embeddings", None) or method.calibration + 64
    captured = capture_prompt(model, tokenizer, min(method.calibration, native - 64), seed)
    shapes, recalls = [], []
    for rank in tqdm(range(len(captured)), desc="minference: searching head shapes", leave=False):
        q, k, _, scaling = captured[rank]
        layer_shapes, layer_recalls = head_shapes(method, q, k, scaling)
        shapes.append(layer_shapes)
        recalls.append(layer_recalls)
    return {"tokens": int(captured[0][0].shape[2]), "shapes": shapes, "recall": recalls}


def sample_rows(length: int, last: int, spread: int = 192) -> torch.Tensor:
    """Query rows scored by the search: the last ``last`` and ``spread`` evenly spaced earlier ones."""
    early = torch.linspace(0, max(length - last - 1, 0), steps=min(spread, max(length - last, 0))).long()
    return torch.unique(torch.cat([early, torch.arange(max(length - last, 0), length)]))


def head_shapes(method: MInference, queries: torch.Tensor, keys: torch.Tensor, scaling: float):
    """``(shapes, recalls)`` of one layer's query heads: the shape keeping most attention on sampled rows, or
    ``dense`` when none keeps ``method.recall``."""
    h, s = queries.shape[1], keys.shape[2]
    rows = sample_rows(s, method.last).to(queries.device)
    group = h // keys.shape[1]
    k = keys[0].float().repeat_interleave(group, dim=0)  # [H, S, D]
    scores = torch.einsum("hrd,hsd->hrs", queries[0, :, rows].float(), k) * scaling
    causal = torch.arange(s, device=queries.device).view(1, -1) <= rows.view(-1, 1)
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # [H, R, S]
    candidates = {
        shape: online_pattern(method, (shape,) * h, queries, keys, scaling)
        for shape in ("a_shape", "vertical_slash", "block_sparse")
    }
    recall = {}
    for shape, pattern in candidates.items():
        mask = token_mask(pattern, len(rows), s, positions=rows)  # [H, R, S]
        recall[shape] = (probs * mask).sum(-1).mean(-1)  # [H]
    table = torch.stack([recall[x] for x in candidates])  # [3, H]
    best = table.argmax(0)
    shapes, recalls = [], []
    names = list(candidates)
    for head in range(h):
        value = float(table[best[head], head])
        sparse = value >= method.recall and method.recall < 1.0 and not math.isnan(value)
        shapes.append(names[int(best[head])] if sparse else "dense")
        recalls.append(round(value, 4))
    return shapes, recalls


# -- DuoAttention ---------------------------------------------------------------------------------------------
DUO_SCORES = ("output", "relative")


@dataclass(frozen=True, eq=False)
class DuoAttention(Method):
    """DuoAttention: only retrieval heads keep the whole context; streaming heads keep ``sink`` first tokens
    and the newest ``window`` (Xiao et al., 2024, arXiv 2410.10819; memory "up to 2.55x (MHA) / 1.67x (GQA)"
    smaller, "minimal accuracy loss"; the Retrieval Head paper finds "less than 5%" of heads retrieve).

    The paper learns a gate per KV head on synthetic passkey data, with the distance between the last
    hidden states of full and mixed attention as its loss; here each KV head is scored on the model itself
    without training: on a synthetic retrieval prompt, how far the last ``last`` queries' (the question's)
    output moves when the head reads only its sinks and window. ``score=output`` (default) measures what
    the head adds to the residual stream, its attention output through its slice of the layer's output
    projection (L2 distance, summed over the query heads that share the KV head): the head's direct share
    of the paper's hidden-state distance, comparable across layers of a pre-norm model (Llama, Mistral,
    Qwen, Phi-3; Gemma 3 normalizes the projected output before adding it, so there it is the change before
    that norm). It needs plain float weights (refused for a quantized or offloaded ``o_proj``: use
    ``score=relative``). ``score=relative`` measures the head's attention output alone (relative L2
    distance, averaged over the query heads): it ranks a head by how much its own output moves, however
    little that output weighs in the residual stream. The ``retrieval`` share
    of KV heads with the highest scores, over the whole model, keep everything; the rest are streaming
    heads: their prompt attention reads sink + window (sparse prefill), and their cache is cut to sink +
    window when the prompt is in and again every ``every`` generated tokens, so their memory really drops
    (per-head storage). Profile at the length you serve: on SmolLM2-135M, 8K single needles with
    ``calibration=7936`` scored 0.68 against 0.50 with the default 4096 (full attention 0.60; 8K multi-key:
    0.25 either way, full 0.35; ``benchmarks/sparse_prefill.py``, fp32, n = 40)."""

    name = "duo"
    paper = "Xiao et al., 2024, DuoAttention, https://arxiv.org/abs/2410.10819"
    roles: ClassVar[frozenset[str]] = frozenset({SPARSE_PREFILL, PREFILL_EVICTION, DECODE_EVICTION})
    retrieval: float = param("share of KV heads that keep the whole context (retrieval heads)", 0.5)
    sink: int = param("first tokens a streaming head keeps", 64)
    window: int = param("newest tokens a streaming head keeps", 256)
    every: int = param("generated tokens between two cuts of the streaming heads' caches", 64)
    last: int = param("last prompt queries whose outputs score a head", 64)
    calibration: int = param("tokens of the synthetic retrieval prompt heads are scored on", 4096)
    score: str = param(
        "output (a head's change through the output projection) | relative (of its attention output alone)",
        "output",
    )
    profile: str = param("profile file to use (empty: found in, or made into, the profile folder)", "")
    streaming: tuple[tuple[bool, ...], ...] | None = bound()  # per layer, which KV heads stream

    def __post_init__(self) -> None:
        check_number("duo: retrieval", self.retrieval, 0.0, 1.0)
        if self.score not in DUO_SCORES:
            raise ValueError(f"duo: score must be one of {DUO_SCORES}, got {self.score!r}")
        for name, low in (("sink", 0), ("window", 1), ("every", 1), ("last", 1)):
            check_int(f"duo: {name}", getattr(self, name), low)
        check_int("duo: calibration", self.calibration, 1024)

    @property
    def compresses(self) -> bool:
        return self.retrieval < 1.0

    @property
    def splits_heads(self) -> bool:
        return 0.0 < self.retrieval < 1.0

    def settings(self) -> dict:
        """What the head scores depend on (the retrieval share only reads them)."""
        return {k: getattr(self, k) for k in ("sink", "window", "last", "calibration", "score")}

    def bind(self, model, tokenizer) -> DuoAttention:
        if self.streaming is not None:
            return self
        return self.with_scores(bound_profile(self, model, tokenizer, score_heads, "scores"))

    def with_scores(self, scores) -> DuoAttention:
        """A copy whose streaming heads are the ``1 - retrieval`` share of KV heads scoring lowest."""
        flat = torch.tensor([s for layer in scores for s in layer], dtype=torch.float64)
        keep = round(self.retrieval * len(flat))
        retrieval = torch.zeros(len(flat), dtype=torch.bool)
        retrieval[flat.argsort(descending=True, stable=True)[:keep]] = True
        out, start = [], 0
        for layer in scores:
            out.append(tuple(not bool(x) for x in retrieval[start : start + len(layer)]))
            start += len(layer)
        return dataclasses.replace(self, streaming=tuple(out))

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        if self.streaming is not None and len(self.streaming) != num_layers:
            raise ValueError(
                f"duo: the profile covers {len(self.streaming)} full-attention layers, this model has {num_layers}; "
                "profile this model again"
            )
        return DuoPolicy(self, None if self.streaming is None else self.streaming[layer_idx])


def bound_profile(method, model, tokenizer, measure, field: str) -> list[list]:
    """The per-layer ``field`` of ``method``'s profile on ``model``: from ``profile=``, from the profile
    folder, or measured now by ``measure(model, tokenizer, method)`` and saved there."""
    digest = model_digest(model)
    path = Path(method.profile) if method.profile else profile_path(method.name, digest, method.settings())
    if method.profile or path.exists():
        data = load_profile(path, method.name, digest, method.settings())
    else:
        data = measure(model, tokenizer, method)
        save_profile(path, method.name, digest, method.settings(), data)
    layers = data.get(field) if isinstance(data, dict) else None
    if not isinstance(layers, list) or not all(isinstance(x, list) for x in layers):
        raise ProfileError(f"{path} holds no per-layer {field!r} list; measure it again (contextlab profile --force)")
    return layers


class DuoPolicy(LayerPolicy):
    """One layer's streaming KV heads (``[Hkv]`` bool): sparse prompt attention for them, and their cache cut to
    sink + window after the prompt and every ``every`` generated tokens."""

    def __init__(self, method: DuoAttention, streaming: tuple[bool, ...] | None) -> None:
        self.method, self.streaming = method, streaming
        self.since = 0  # generated tokens since the last cut

    def _heads(self) -> tuple[bool, ...]:
        if self.streaming is None:
            raise ValueError(
                "duo has no head scores for this model: run it through contextlab.generate / prefill / Session "
                "(they profile the model first) or pass profile=<file from `contextlab profile`>"
            )
        return self.streaming

    def attend(self, store: DenseStore, step: Step) -> torch.Tensor | None:
        if step.phase == "decode" or step.tokens == 1 or not any(self._heads()):
            return None  # (rows with gaps read densely too: see each_row; the cut below still applies)
        m = self.method
        hq = step.queries.shape[1]
        if len(self.streaming) != store.num_heads:
            raise ValueError(
                f"duo: the profile has {len(self.streaming)} KV heads here, the layer has {store.num_heads}"
            )
        group = hq // len(self.streaming)
        stream = torch.tensor(self.streaming, device=step.queries.device).repeat_interleave(group)
        sink, window = torch.where(stream, m.sink, 0).long(), torch.where(stream, m.window, 0).long()
        pattern = PrefillPattern(~stream, sink, window)
        return each_row(store, step, lambda q, k, v: sparse_prefill(q, k, v, pattern, step.scaling))

    def after_forward(self, store: DenseStore, step: Step) -> None:
        if not any(self._heads()):
            return
        if step.phase == "prompt_end":
            self._cut(store)
        elif step.phase == "decode":
            self.since += step.tokens
            if self.since >= self.method.every:
                self.since = 0
                self._cut(store)

    def decode_reserve(self, tokens: int) -> int:
        return tokens  # retrieval heads keep every generated token

    def _cut(self, store: DenseStore) -> None:
        """Keep every valid slot of retrieval heads and the first ``sink`` + newest ``window`` valid slots of
        streaming heads (per row)."""
        view = store.view()
        b, h, s = view.keys.shape[:3]
        valid = view.valid.expand(b, h, s)
        rank = valid.long().cumsum(-1) - 1
        count = valid.sum(-1, keepdim=True)
        m = self.method
        edge = (rank < m.sink) | (rank >= count - m.window)
        stream = torch.tensor(self.streaming, device=valid.device).view(1, h, 1)
        keep = valid & (~stream | edge)
        if bool((keep == valid).all()):
            return  # nothing to cut yet
        width = int(keep.sum(-1).max())
        indices = (~keep).to(torch.uint8).argsort(dim=-1, stable=True)[..., :width]
        store.keep(indices, keep.gather(-1, indices), headroom=m.every)


def each_row(store: DenseStore, step: Step, attend) -> torch.Tensor | None:
    """The prompt forward's attention ``[B, Hq, Tq, D]`` by ``attend(queries, keys, values)``, run on the whole
    batch when no row is padded, else on each left-padded row alone with its padding dropped (so a row's
    estimated indices and shapes sit at its own positions, and a batch answers like its rows alone; padding
    queries get zeros). None (read densely) when the store's columns are not its rows' positions: heads
    stored apart, or slots evicted or moved (explicit positions, or gaps inside a row)."""
    if store.split or store.keeps_positions:
        return None
    g = store.groups[0]
    pad = left_padding(g.used_valid())
    if pad is False:
        return None
    keys, values = g.used()
    queries = step.queries
    if pad is None:
        return attend(queries, keys, values)
    out = queries.new_zeros(queries.shape)
    first = keys.shape[2] - queries.shape[2]  # store column of the first query
    for row, columns in enumerate(pad.tolist()):
        start = max(0, columns - first)  # the row's first real query
        if start < queries.shape[2]:
            one = slice(row, row + 1)
            out[one, :, start:] = attend(queries[one, :, start:], keys[one, :, columns:], values[one, :, columns:])
    return out


def left_padding(valid: torch.Tensor | None) -> torch.Tensor | bool | None:
    """Leading padding columns per row ``[B]`` of a store whose rows are left-padded (None: no padding);
    False when some row has a gap after its first token (its positions are not its columns)."""
    if valid is None or bool(valid.all()):
        return None
    rows = valid.any(1)  # [B, S]
    pad = rows.long().argmax(-1)
    if not bool((rows.sum(-1) == rows.shape[-1] - pad).all()):
        return False
    return pad


def score_heads(model, tokenizer, method: DuoAttention, seed: int = 0) -> dict:
    """Per full-attention layer, each KV head's retrieval score (class docstring)."""
    native = getattr(model.config, "max_position_embeddings", None) or method.calibration + 64
    captured = capture_prompt(model, tokenizer, min(method.calibration, native - 64), seed)
    projections = output_projections(model) if method.score == "output" else [None] * len(captured)
    if len(projections) != len(captured):
        raise ValueError(f"duo: {len(projections)} output projections for {len(captured)} full-attention layers")
    scores = []
    for rank in tqdm(range(len(captured)), desc="duo: scoring heads", leave=False):
        q, k, v, scaling = captured[rank]
        deviation = head_deviation(method, q, k, v, scaling, projections[rank])
        scores.append([round(x, 6) for x in deviation.tolist()])
    return {"tokens": int(captured[0][0].shape[2]), "scores": scores}


def head_deviation(
    method: DuoAttention,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    projection: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[Hkv]``: how far the last ``last`` queries' outputs move when each head reads only its sink + window
    (``method.score``, class docstring). ``projection``: the layer's output projection ``[hidden, Hq * D]``,
    needed by ``score=output``."""
    hq, hkv, d = queries.shape[1], keys.shape[1], queries.shape[-1]
    if method.score == "output":  # refused before any attention is computed
        if projection is None or projection.dim() != 2 or projection.shape[-1] != hq * d:
            got = None if projection is None else tuple(projection.shape)
            raise ValueError(f"duo: score=output needs the layer's output projection [hidden, {hq * d}], got {got}")
        if not projection.is_floating_point() or projection.is_meta:
            raise ValueError(
                f"duo: score=output reads the output projection's weights, which are not plain floats here "
                f"({projection.dtype} on {projection.device}: quantized or offloaded); use duo:score=relative"
            )
    q = queries[:, :, -method.last :]
    dense = PrefillPattern.full(hq)
    full = reference_prefill(q.float(), keys.float(), values.float(), dense, scaling)[0]  # [Hq, L, D]
    streaming = PrefillPattern.streaming(hq, method.sink, method.window)
    cut = reference_prefill(q.float(), keys.float(), values.float(), streaming, scaling)[0]
    if method.score == "relative":
        change = (full - cut).norm(dim=-1) / full.norm(dim=-1).clamp(min=1e-6)  # [Hq, L]
        return change.mean(-1).view(hkv, hq // hkv).mean(-1)
    per_head = projection.to(full.device, torch.float32).view(-1, hq, d).permute(1, 2, 0)  # [Hq, D, hidden]
    moved = torch.einsum("hld,hdo->hlo", full - cut, per_head).norm(dim=-1)  # [Hq, L]
    return moved.mean(-1).view(hkv, hq // hkv).sum(-1)
