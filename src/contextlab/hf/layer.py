"""The compressible cache layer: a transformers ``DynamicLayer`` that an eviction method can shrink.

Layout of a :class:`CompressibleLayer` after compression, per head group::

    keys [B, Hg, P + T, D] = [ P compressed prompt slots | T tokens appended since ]

``P`` can differ per group: heads with different budgets (AdaKV, or rows of different lengths) are
stored in separate groups, so per-head budgets really shrink memory. Slots past a row's or head's own
count are marked in ``prefix_valid`` and never attended to.

Lengths: ``get_seq_length()`` is LOGICAL (tokens seen, which sets positions); ``get_mask_sizes()``
describes only the tail of tokens appended since compression, starting at logical column
``compressed_at``. transformers builds that tail's causal + padding mask; the attention function puts
each group's compressed prefix in front of it (see :meth:`CompressibleLayer.attend`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from contextlab.hf import compat
from contextlab.hf.compat import DynamicLayer, sdpa
from contextlab.methods.base import PrefillMethod, ScoreInputs, select_tokens

LAYER_ATTRIBUTE = "contextlab_layer"  # set on the key tensor handed to the attention function


@dataclass
class HeadGroup:
    """KV heads stored together. ``heads``: indices of the KV heads (None = all, in order)."""

    heads: torch.Tensor | None
    keys: torch.Tensor  # [B, Hg, P + T, D]
    values: torch.Tensor  # [B, Hg, P + T, D]
    prefix: int = 0  # P
    prefix_valid: torch.Tensor | None = None  # [B, Hg, P] bool; None = all valid

    def nbytes(self) -> int:
        extra = self.prefix_valid.nbytes if self.prefix_valid is not None else 0
        return self.keys.nbytes + self.values.nbytes + extra


@dataclass
class CompressionRequest:
    """Compress each layer once it has seen ``length`` logical tokens.

    ``valid``/``positions``: ``[B, length]`` (False on padding; each token's position in its own row).
    ``keep``: ``[B]`` tokens each row keeps under the plain budget.
    """

    method: PrefillMethod
    length: int
    valid: torch.Tensor
    positions: torch.Tensor
    keep: torch.Tensor


class MemoryTracker:
    """Peak bytes held by a cache's tensors (the CPU stand-in for ``torch.cuda.max_memory_allocated``)."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def change(self, delta: int) -> None:
        self.current += delta
        self.peak = max(self.peak, self.current)


class CompressibleLayer(DynamicLayer):
    """A full-attention cache layer that a prefill-eviction method can shrink (see module docstring)."""

    def __init__(self, layer_idx: int = 0, num_layers: int = 1, tracker: MemoryTracker | None = None) -> None:
        super().__init__()
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.groups: list[HeadGroup] = []
        self.seen = 0
        self.compressed_at = 0
        self.request: CompressionRequest | None = None
        self.kept_positions: torch.Tensor | None = None  # [B, H, P], -1 on unused slots
        self.tracker = tracker or MemoryTracker()

    # -- transformers' Cache layer interface ---------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        before = self.nbytes()
        if not self.groups:
            self.lazy_initialization(key_states, value_states)
            self.groups = [HeadGroup(heads=None, keys=key_states, values=value_states)]
        else:
            for g in self.groups:
                k = key_states if g.heads is None else key_states[:, g.heads]
                v = value_states if g.heads is None else value_states[:, g.heads]
                g.keys, g.values = torch.cat([g.keys, k], dim=-2), torch.cat([g.values, v], dim=-2)
        self.seen += key_states.shape[-2]
        self._publish()
        self.tracker.change(self.nbytes() - before)
        return self._handles()

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """Length and offset of the keys the mask must cover: the tokens appended since compression plus
        the new ones (``query_length`` is an int, or the ``cache_position`` tensor in older transformers)."""
        return self.seen - self.compressed_at + compat.query_length(query_length), self.compressed_at

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.tracker.change(-self.nbytes())
        self.groups, self.seen, self.compressed_at, self.request, self.kept_positions = [], 0, 0, None, None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0 or -tokens_to_remove > self.seen - self.compressed_at:
            raise ValueError(
                f"cannot crop {tokens_to_remove} tokens: only the {self.seen - self.compressed_at} "
                "tokens appended after compression can be removed (pass a negative count)"
            )
        if tokens_to_remove == 0 or not self.groups:
            return
        for g in self.groups:
            g.keys, g.values = g.keys[..., :tokens_to_remove, :], g.values[..., :tokens_to_remove, :]
        self.seen += tokens_to_remove
        self._publish()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    # -- contextlab -----------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes this layer holds for attention (keys, values, slot-validity masks)."""
        return sum(g.nbytes() for g in self.groups)

    def attend(self, query: torch.Tensor, tail_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention of ``query [B, Hq, Tq, D]`` over this layer, as ``[B, Tq, Hq, D]``.

        ``tail_mask``: transformers' boolean mask ``[B, 1, Tq, T]`` over the tokens appended since
        compression (None = plain causal, or everything when ``Tq == 1``).
        """
        if len(self.groups) == 1 and self.groups[0].heads is None:
            out = self._attend_group(self.groups[0], query, tail_mask, scaling)
        else:
            b, hq, tq, d = query.shape
            h = self.kv_heads
            by_kv_head = query.view(b, h, hq // h, tq, d)
            out = query.new_empty(b, h, hq // h, tq, d)
            for g in self.groups:
                q = by_kv_head[:, g.heads].reshape(b, -1, tq, d)
                out[:, g.heads] = self._attend_group(g, q, tail_mask, scaling).view(b, len(g.heads), -1, tq, d)
            out = out.view(b, hq, tq, d)
        if self.request is not None and self.request.length == self.seen:
            self.compress(query, scaling)
        return out.transpose(1, 2).contiguous()

    @property
    def kv_heads(self) -> int:
        return sum(g.keys.shape[1] for g in self.groups)

    def compress(self, query: torch.Tensor, scaling: float) -> None:
        """Score and evict with the armed request, using this forward's queries ``[B, Hq, Tq, D]``."""
        request, self.request = self.request, None
        group = self.groups[0]
        if len(self.groups) != 1 or group.prefix:
            raise RuntimeError("this layer is already compressed; a cache is compressed once")
        inputs = ScoreInputs(
            queries=query,
            keys=group.keys,
            values=group.values,
            valid=request.valid,
            positions=request.positions,
            keep=request.keep,
            scaling=scaling,
            layer_idx=self.layer_idx,
            num_layers=self.num_layers,
        )
        scores = request.method.score(inputs)
        counts = request.method.keep_counts(inputs, scores)
        indices, kept = select_tokens(scores, counts, request.valid)
        before = self.nbytes()
        self._install(group, indices, kept, counts)
        self.kept_positions = (
            request.positions.unsqueeze(1).expand_as(scores).gather(-1, indices).masked_fill(~kept, -1)
        )
        self.compressed_at = self.seen
        self._publish()
        self.tracker.change(self.nbytes() - before)

    # -- internals -------------------------------------------------------------------------------------
    def _install(self, group: HeadGroup, indices: torch.Tensor, kept: torch.Tensor, counts: torch.Tensor) -> None:
        """Replace the uncompressed group by groups of heads that share a slot count."""
        per_head = counts.max(dim=0).values  # [H]: slots each head needs (max over rows)
        sizes = per_head.unique().tolist()
        d = group.keys.shape[-1]
        new_groups = []
        for size in sizes:
            heads = None if len(sizes) == 1 else (per_head == size).nonzero().flatten()
            idx = indices if heads is None else indices[:, heads]
            idx, ok = idx[..., :size], (kept if heads is None else kept[:, heads])[..., :size]
            gather = idx.unsqueeze(-1).expand(*idx.shape, d)
            src_k = group.keys if heads is None else group.keys[:, heads]
            src_v = group.values if heads is None else group.values[:, heads]
            new_groups.append(
                HeadGroup(
                    heads=heads,
                    keys=src_k.gather(2, gather),
                    values=src_v.gather(2, gather),
                    prefix=size,
                    prefix_valid=None if bool(ok.all()) else ok.contiguous(),
                )
            )
        self.groups = new_groups

    def _attend_group(self, g: HeadGroup, q: torch.Tensor, tail_mask: torch.Tensor | None, scaling: float):
        tq, total = q.shape[2], g.keys.shape[2]
        mask = self._group_mask(g, tail_mask, tq, total)
        if tq == 1 and mask is not None:
            # Decode: fold the query heads of each KV head into the query axis, so each KV head is read
            # once under a per-KV-head mask (no repeat of the cache).
            b, hq, _, d = q.shape
            h = g.keys.shape[1]
            packed = q.view(b, h, hq // h, d)
            out = sdpa(packed, g.keys, g.values, mask.reshape(b, -1, 1, total), scaling)
            return out.view(b, hq, 1, d)
        if mask is not None and mask.shape[1] > 1:
            mask = mask.repeat_interleave(q.shape[1] // mask.shape[1], dim=1)
        is_causal = mask is None and tq > 1
        return sdpa(q, g.keys, g.values, mask, scaling, is_causal=is_causal and tq == total)

    @staticmethod
    def _group_mask(g: HeadGroup, tail_mask: torch.Tensor | None, tq: int, total: int) -> torch.Tensor | None:
        """Boolean ``[B, 1 | Hg, Tq, P + T]`` mask for one group, or None when no mask is needed."""
        tail = total - g.prefix
        if g.prefix == 0 and (tail_mask is None or tail_mask.shape[-1] == total):
            if tail_mask is None and 1 < tq < total:
                return _causal(tq, total, _device(g))
            return tail_mask
        if tail_mask is None and g.prefix_valid is None and tq == 1:
            return None
        if tail_mask is None:
            tail_mask = (
                _causal(tq, tail, _device(g))
                if tq > 1
                else torch.ones(1, 1, 1, tail, dtype=torch.bool, device=_device(g))
            )
        b = g.keys.shape[0]
        prefix = (
            g.prefix_valid
            if g.prefix_valid is not None
            else torch.ones(b, 1, g.prefix, dtype=torch.bool, device=_device(g))
        )
        heads = max(prefix.shape[1], tail_mask.shape[1])
        prefix = prefix.unsqueeze(2).expand(b, heads, tq, g.prefix)
        return torch.cat([prefix, tail_mask.expand(b, heads, tq, tail)], dim=-1)

    def _publish(self) -> None:
        """Mirror a single all-heads group on ``keys``/``values`` for code that inspects cache layers."""
        single = len(self.groups) == 1 and self.groups[0].heads is None
        self.keys = self.groups[0].keys if single else None
        self.values = self.groups[0].values if single else None

    def _handles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``update`` returns: views of the keys and values (empty placeholders when heads are split
        in groups); the key view carries a weak reference to this layer for the attention function."""
        g = self.groups[0]
        if self.keys is not None:
            keys, values = g.keys.view(g.keys.shape), g.values.view(g.values.shape)
        else:
            b, _, _, d = g.keys.shape
            keys = values = g.keys.new_empty(b, self.kv_heads, 0, d)
        setattr(keys, LAYER_ATTRIBUTE, weakref.ref(self))
        return keys, values

    def _map_batch(self, fn) -> None:
        for g in self.groups:
            g.keys, g.values = fn(g.keys), fn(g.values)
            if g.prefix_valid is not None:
                g.prefix_valid = fn(g.prefix_valid)
        if self.kept_positions is not None:
            self.kept_positions = fn(self.kept_positions)
        self._publish()


def _device(g: HeadGroup) -> torch.device:
    return g.keys.device


def _causal(tq: int, total: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, Tq, total]``: query i (the last Tq of total) sees columns <= total - Tq + i."""
    rows = torch.arange(tq, device=device).view(-1, 1) + (total - tq)
    return (torch.arange(total, device=device).view(1, -1) <= rows).view(1, 1, tq, total)
