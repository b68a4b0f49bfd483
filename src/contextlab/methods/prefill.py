"""The policy of prefill eviction: score and evict when the prompt is in, or after every prompt chunk.

Chunked prefill (Finch, Corallo & Papotti 2024, https://arxiv.org/abs/2408.00167): the prompt is fed
``prefill_chunk`` tokens at a time; after each chunk the layer evicts down to the budget, scored by that
chunk's queries (for SnapKV-style scorers the chunk's last queries are the observation window; the last
chunk holds the question when the question is compressed with the context). The budget is fixed from the
whole prompt's length, so the cache holds at most the budget plus one chunk. With one chunk as long as the
prompt this is exactly unchunked eviction.
"""

from __future__ import annotations

import torch

from contextlab.kernels.colsum import attention_and_column_sums
from contextlab.methods.base import PrefillMethod, ScoreInputs, select_tokens
from contextlab.methods.policy import LayerPolicy, Step
from contextlab.store import DenseStore, SlotView


def score_inputs(
    view: SlotView, step: Step, keep: torch.Tensor, lengths: torch.Tensor, prior=None, column_sums=None
) -> ScoreInputs:
    """What a scorer sees of a store's view and a forward."""
    return ScoreInputs(
        queries=step.queries,
        keys=view.keys,
        values=view.values,
        valid=view.valid,
        positions=view.positions,
        keep=keep,
        lengths=lengths,
        scaling=step.scaling,
        layer_idx=step.layer_idx,
        num_layers=step.num_layers,
        prior=prior,
        column_sums=column_sums,
    )


def evict(
    store: DenseStore,
    method: PrefillMethod,
    inputs: ScoreInputs,
    headroom: int,
    scores: torch.Tensor | None = None,
    shrink: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score (unless ``scores`` are given), count, select and keep; returns ``select_tokens``' indices and
    kept mask (``[B, H, C]``, columns of the view the scores were computed on)."""
    scores = method.score(inputs) if scores is None else scores
    held = inputs.valid.sum(-1)  # [B, 1 | H]
    counts = torch.minimum(method.keep_counts(inputs, scores), held)
    indices, kept = select_tokens(scores, counts, inputs.valid)
    store.keep(indices, kept, headroom, shrink)
    return indices, kept


class PrefillEvictionPolicy(LayerPolicy):
    """Evicts a layer's prompt with a :class:`PrefillMethod` (see module docstring)."""

    def __init__(self, method: PrefillMethod, layer_idx: int, num_layers: int) -> None:
        self.method, self.layer_idx, self.num_layers = method, layer_idx, num_layers
        self.chunk = method.prefill_chunk_size()
        self.column_sums: torch.Tensor | None = None  # from this forward's own attention (see attend)

    def _evicts(self, store: DenseStore, step: Step) -> list[int] | None:
        """Each row's budget when this forward ends with an eviction, else None."""
        if step.phase == "decode" or step.prompt_lengths is None:
            return None
        if step.phase == "prefill" and self.chunk is None:
            return None  # the prompt arrives in pieces, but eviction waits for its end
        keeps = [self.method.prompt_keep(n) for n in step.prompt_lengths]
        if step.phase == "prefill" and store.length <= min(keeps):
            return None  # no row is over its budget yet (known without a device sync)
        return keeps

    def attend(self, store: DenseStore, step: Step) -> torch.Tensor | None:
        """On CPU, scorers that need every query's attention (H2O) get it from the attention pass itself
        instead of a second pass over the probabilities; CUDA keeps SDPA and the Triton column sums."""
        self.column_sums = None
        if not self.method.uses_column_sums or step.queries.is_cuda or step.tokens == 1 or store.split:
            return None
        if self._evicts(store, step) is None:
            return None
        view = store.view()
        out, self.column_sums = attention_and_column_sums(
            step.queries, view.keys, view.values, view.valid, step.scaling, chunk=getattr(self.method, "chunk", 512)
        )
        return out

    def after_forward(self, store: DenseStore, step: Step) -> None:
        keeps = self._evicts(store, step)
        column_sums, self.column_sums = self.column_sums, None
        if keeps is None:
            return
        device = step.queries.device
        keep = torch.tensor(keeps, device=device)
        view = store.view()
        lengths = torch.tensor(step.prompt_lengths, device=device)
        more = step.phase == "prefill"  # more chunks follow: keep the buffer planned for budget + chunk
        inputs = score_inputs(view, step, keep, lengths, column_sums=column_sums)
        evict(store, self.method, inputs, self.chunk if more else step.answer_room, shrink=not more)

    def capacity_hint(self, columns: int) -> int:
        if self.chunk is None or self.chunk >= columns:
            return columns
        keep = self.method.prompt_keep(columns)
        return min(columns, self.method.layer_capacity(keep, columns, self.num_layers, self.layer_idx) + self.chunk)
