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
  ``recall=1`` exactly full attention).
- **Online** (:class:`MInferencePolicy`): a prompt forward of at least ``min_length`` cached tokens computes
  each layer's attention with the heads' shapes (:mod:`contextlab.kernels.sparse_prefill`: compiled flex
  attention over the active tiles, or the dense masked reference where compiling is impossible). Decode
  steps, short prompts, and batches whose rows differ in length (padding) are read densely.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from contextlab.kernels.sparse_prefill import (
    PrefillPattern,
    estimate_blocks,
    estimate_vertical_slash,
    sparse_prefill,
    token_mask,
)
from contextlab.methods.base import SPARSE_PREFILL, Method, bound, check_int, check_number, param
from contextlab.methods.policy import LayerPolicy, Step
from contextlab.methods.profiles import capture_prompt, load_profile, model_digest, profile_path, save_profile
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
        digest = model_digest(model)
        path = Path(self.profile) if self.profile else profile_path(self.name, digest, self.settings())
        if self.profile or path.exists():
            data = load_profile(path, self.name, digest, self.settings())
        else:
            data = search_patterns(model, tokenizer, self)
            save_profile(path, self.name, digest, self.settings(), data)
        return self.with_shapes(data["shapes"])

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
        if all(shape == "dense" for shape in self.shapes) or store.split:
            return None
        g = store.groups[0]
        if g.used_valid() is not None and not bool(g.used_valid().all()):
            return None  # rows of different lengths: read densely (see the module docstring)
        heads = step.queries.shape[1]
        if len(self.shapes) != heads:
            raise ValueError(f"minference: the profile has {len(self.shapes)} heads here, the layer has {heads}")
        keys, values = g.used()
        pattern = online_pattern(self.method, self.shapes, step.queries, keys, step.scaling)
        self.sparse_forwards += 1
        return sparse_prefill(step.queries, keys, values, pattern, step.scaling)


def online_pattern(
    method: MInference, shapes: tuple[str, ...], queries: torch.Tensor, keys: torch.Tensor, scaling: float
) -> PrefillPattern:
    """Each head's shape with its indices estimated from ``queries [B, Hq, Tq, D]`` over ``keys``."""
    h, s, device = len(shapes), keys.shape[2], queries.device
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
    del s
    return pattern


# -- the offline search ---------------------------------------------------------------------------------------
def search_patterns(model, tokenizer, method: MInference, seed: int = 0) -> dict:
    """Each full-attention layer's head shapes (in layer order; sliding-window layers keep their own bounded
    cache) on a synthetic retrieval prompt (module docstring), with their recall."""
    native = getattr(model.config, "max_position_embeddings", None) or method.calibration + 64
    captured = capture_prompt(model, tokenizer, min(method.calibration, native - 64), seed)
    shapes, recalls = [], []
    for rank in tqdm(range(len(captured)), desc="minference: searching head shapes", leave=False):
        q, k = captured[rank]
        layer_shapes, layer_recalls = head_shapes(method, q, k, q.shape[-1] ** -0.5)
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
        shapes.append(names[int(best[head])] if value >= method.recall and not math.isnan(value) else "dense")
        recalls.append(round(value, 4))
    return shapes, recalls
