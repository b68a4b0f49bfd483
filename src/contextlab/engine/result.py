"""What a generation reports: its text and its cost."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contextlab.engine.inputs import positions_from_mask
from contextlab.hf.cache import ContextlabCache, ContextlabLayer
from contextlab.hf.compat import layer_types, text_config


@dataclass
class GenerationResult:
    """Outputs and measured costs of one :func:`contextlab.generate` call.

    ``kv_bytes``: bytes the cache holds once the prompt is in (after compression; per-slot metadata such as
    kept positions included); ``kv_bytes_end``: bytes it holds when generation ends (decode eviction keeps
    this bounded; buffers preallocated for the answer included); ``kv_bytes_full``: what a plain
    transformers cache would hold for the same prompt. ``peak_memory_bytes``: on CUDA
    ``torch.cuda.max_memory_allocated`` over the call (weights and activations included); on CPU the peak
    bytes held by the cache's buffers. ``kept_positions``: per layer, ``[B, kv_heads, slots]`` positions
    (within each row) of the prompt tokens the cache holds, ascending, ``-1`` on unused slots (empty for an
    input-level strategy, whose reads hold other prompts than the one given).
    ``calls``: model calls behind the result (1 for a method; an input-level strategy's scoring passes, worker
    and final reads, summed over the batch); ``tokens_processed``: tokens that went through the model in all
    of them (prompts prefilled plus tokens generated). ``routes``: per row, the path an input-level strategy
    took (the router's choice), else None. ``read_bytes_per_step``: mean bytes a decode step read from the
    cache, all layers (a sparse read: the slots it named plus what choosing them read; otherwise everything
    held), the quantity that bounds decode speed on a GPU; 0 when nothing was decoded after the first token.
    """

    texts: list[str]
    token_ids: list[list[int]]
    batched: bool
    method: str
    kv_bytes: int
    kv_bytes_full: int
    peak_memory_bytes: int
    prefill_seconds: float
    decode_seconds: float
    kept_positions: list[torch.Tensor]
    prompt_tokens: list[int]
    kv_bytes_end: int = 0
    calls: int = 1
    tokens_processed: int = 0
    routes: list[str | None] | None = None
    read_bytes_per_step: float = 0.0

    @property
    def text(self) -> str:
        return self._single(self.texts)

    @property
    def tokens(self) -> list[int]:
        return self._single(self.token_ids)

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes / self.kv_bytes_full if self.kv_bytes_full else 1.0

    def _single(self, values):
        if len(values) != 1:
            raise ValueError(f"this result holds a batch of {len(values)}; use .texts / .token_ids")
        return values[0]


def full_cache_bytes(model, batch: int, length: int) -> int:
    """Bytes of K and V a plain ``DynamicCache`` holds after ``length`` columns (sliding layers keep at
    most ``sliding_window - 1``)."""
    cfg = text_config(model.config)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    total = 0
    for kind in layer_types(cfg):
        held = min(length, cfg.sliding_window - 1) if kind == "sliding_attention" else length
        total += 2 * batch * heads * held * head_dim * itemsize
    return total


def kept_positions(
    cache: ContextlabCache, mask: torch.Tensor, origins: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Per layer ``[B, H, slots]`` positions held after the prompt (see :class:`GenerationResult`).
    ``origins [B, S]``: the prompt position of each row's n-th fed token, when the cache was fed a selection
    of the prompt (a re-encoding prefill); the positions are mapped through it."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, ContextlabLayer):
            view = layer.store.view()
            b, h, s = view.keys.shape[:3]
            held = view.positions.expand(b, h, s).masked_fill(~view.valid.expand(b, h, s), -1)
            out.append(_valid_first(held).cpu())
        else:
            positions = positions_from_mask(mask).masked_fill(mask == 0, -1)  # [B, S]
            held = layer.keys.shape[2] if layer.keys is not None else layer.get_seq_length()
            heads = layer.keys.shape[1]
            out.append(positions[:, positions.shape[1] - held :].unsqueeze(1).expand(-1, heads, -1).cpu())
    if origins is None:
        return out
    table = origins.cpu()
    return [_through(held, table) for held in out]


def _through(held: torch.Tensor, origins: torch.Tensor) -> torch.Tensor:
    """``held [B, H, S]`` positions (-1 = none) replaced by ``origins [B, P]`` (right-padded with -1) at
    them; a position past a row's table (a token fed after the prefill) continues after its last origin."""
    b, h, s = held.shape
    count = (origins >= 0).sum(-1).view(b, 1, 1)  # [B, 1, 1] tokens each row's table maps
    last = origins.gather(1, (count.view(b, 1) - 1).clamp(min=0)).view(b, 1, 1)
    inside = held.clamp(min=0).minimum(count - 1).clamp(min=0)
    mapped = origins.gather(1, inside.reshape(b, -1)).view(b, h, s)
    mapped = torch.where(held < count, mapped, last + 1 + held - count)
    return torch.where(held >= 0, mapped, -1)


def _valid_first(held: torch.Tensor) -> torch.Tensor:
    """Move -1 entries after the held positions, keeping their order (``[B, H, S]``)."""
    order = torch.where(held >= 0, 0, 1).argsort(dim=-1, stable=True)
    return held.gather(-1, order)
