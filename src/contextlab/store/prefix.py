"""Stores whose oldest slots leave the dense buffers for another form: the shared machinery.

A :class:`PrefixStore` is a :class:`~contextlab.store.dense.DenseStore` that, after every forward
(:meth:`PrefixStore.settle`), moves whole units of its oldest buffered slots into the group's prefix,
keeping the newest ``kept`` slots (and a unit still filling) in the buffers. Slots then read as
``[prefix | buffers]``. The quantized store holds its prefix as integer codes
(:mod:`contextlab.store.quantized`); the offloading store holds it in host memory
(:mod:`contextlab.store.offload`).

:class:`BufferPrefix` holds a prefix as named buffers whose slot axis is dim 2 and which grow
geometrically, with the per-slot validity and positions that mirror the dense group's metadata.
"""

from __future__ import annotations

import torch

from contextlab.store.dense import SHRINK_SLACK, DenseStore, MemoryTracker, SlotGroup, widened


class BufferPrefix:
    """Named buffers ``[B, Hg, capacity / units[name], ...]`` of a group's oldest ``length`` slots.

    ``valid [B, 1 | Hg, capacity]`` and ``positions [B, Hg, capacity]`` (on the cache's ``device``) exist only
    once the dense group had them. Capacity is a multiple of ``unit`` slots. Bytes count only what lives on
    the cache's device (:meth:`host_bytes` counts the rest)."""

    anchor = ""  # a buffer with one entry per slot (capacity, batch size)
    buffers: dict[str, torch.Tensor]
    units: dict[str, int]
    tracker: MemoryTracker
    device: torch.device
    dim: int  # head dimension of the slots' keys and values
    unit: int = 1
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.buffers[self.anchor].shape[2] * self.units[self.anchor]

    @property
    def direct_read(self) -> bool:
        """True when decode attention can read the prefix as it is held (quantized codes it understands)."""
        return False

    @property
    def valid(self) -> torch.Tensor | None:
        return self.buffers.get("valid")

    @property
    def positions(self) -> torch.Tensor | None:
        return self.buffers.get("positions")

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.buffers.values() if t.device == self.device)

    def used_bytes(self) -> int:
        return sum(self._used_bytes(k, t) for k, t in self.buffers.items() if t.device == self.device)

    def host_bytes(self) -> int:
        """Bytes held away from the cache's device (all of the buffers, free capacity included)."""
        return sum(t.nbytes for t in self.buffers.values() if t.device != self.device)

    def _used_bytes(self, name: str, t: torch.Tensor) -> int:
        return t.nbytes // t.shape[2] * (self.length // self.units[name])

    # -- reading ----------------------------------------------------------------------------------------
    def used(self) -> dict[str, torch.Tensor]:
        """Views of every buffer's used entries."""
        return {k: t[:, :, : self.length // self.units[k]] for k, t in self.buffers.items()}

    def used_valid(self) -> torch.Tensor | None:
        return None if self.valid is None else self.valid[:, :, : self.length]

    def used_positions(self) -> torch.Tensor:
        if self.positions is None:
            raise RuntimeError("the slots held apart carry no positions while newer slots do")
        return self.positions[:, :, : self.length]

    def slot_positions(self) -> torch.Tensor:
        """``[B, 1 | Hg, length]`` position of every slot: explicit, or its rank among valid slots."""
        if self.positions is not None:
            return self.used_positions().long()
        valid = self.used_valid()
        if valid is None:
            return torch.arange(self.length, device=self.device).view(1, 1, -1)
        return (valid.long().cumsum(-1) - 1).clamp(min=0)

    def valid_count(self) -> torch.Tensor | int:
        """Valid slots held per row (``[B, 1 | Hg, 1]``), or an int when every slot is valid."""
        valid = self.used_valid()
        return self.length if valid is None else valid.long().sum(-1, keepdim=True)

    # -- batch, saving ----------------------------------------------------------------------------------
    def map_batch(self, fn) -> None:
        self.buffers = {k: fn(t) for k, t in self.buffers.items()}

    def export(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Metadata and the used part of every buffer (restored by the store's ``_restore_prefix``)."""
        return {"length": self.length, "dim": self.dim}, {k: v.contiguous() for k, v in self.used().items()}

    def restore(self, tensors: dict[str, torch.Tensor], length: int) -> None:
        """Fill a fresh prefix (capacity >= ``length``) with an :meth:`export`."""
        if set(tensors) - {"valid", "positions"} != set(self.buffers) - {"valid", "positions"}:
            raise ValueError(f"saved slots hold {sorted(tensors)}; this method expects {sorted(self.buffers)}")
        for name in ("valid", "positions"):
            if name in tensors:
                self._metadata(name, tensors[name].shape[1], tensors[name].dtype, fill=0)
        for name, t in tensors.items():
            self.buffers[name][:, :, : t.shape[2]] = t
        self.length = length

    # -- internals --------------------------------------------------------------------------------------
    def _new_positions(self, m: int, valid: torch.Tensor | None, positions: torch.Tensor | None) -> torch.Tensor:
        """``[B, 1 | Hg, m]`` positions of slots about to be appended."""
        if positions is not None:
            return positions.long()
        ones = torch.arange(1, m + 1, device=self.device).view(1, 1, -1)
        steps = ones if valid is None else valid.long().cumsum(-1)
        return (self.valid_count() + steps - 1).clamp(min=0)

    def _append_metadata(
        self, valid: torch.Tensor | None, positions: torch.Tensor | None, start: int, stop: int
    ) -> None:
        """Validity and positions of the slots ``start .. stop`` being appended."""
        self._append_valid(valid, start, stop)
        if (positions is None) != (self.positions is None) and (positions is None or start > 0):
            raise RuntimeError("slots held apart must all carry explicit positions or none")
        if positions is not None:
            if self.positions is None:
                self._metadata("positions", positions.shape[1], positions.dtype, fill=0)
            else:  # follow the dense buffers when they were widened
                self.buffers["positions"] = widened(self.positions, positions.dtype, self.tracker)
            self.positions[:, :, start:stop] = positions

    def _append_valid(self, valid: torch.Tensor | None, start: int, stop: int) -> None:
        if valid is None and self.valid is None:
            return
        heads = 1 if valid is None else valid.shape[1]
        if self.valid is None:
            self._metadata("valid", heads, torch.bool, fill=1)
        elif self.valid.shape[1] < heads:  # per-head validity arrives: widen the shared row
            old = self.valid
            self._metadata("valid", heads, torch.bool, fill=1)
            self.valid.copy_(old.expand_as(self.valid))
            self.tracker.change(-old.nbytes)
        self.valid[:, :, start:stop] = True if valid is None else valid

    def _metadata(self, name: str, heads: int, dtype: torch.dtype, fill: int) -> None:
        batch = self.buffers[self.anchor].shape[0]
        out = torch.full((batch, heads, self.capacity), fill, dtype=dtype, device=self.device)
        self.tracker.change(out.nbytes)
        self.buffers[name], self.units[name] = out, 1

    def _allocate(self, like: torch.Tensor, entries: int) -> torch.Tensor:
        """A zeroed buffer shaped like ``like`` with ``entries`` along dim 2, where ``like`` lives."""
        return like.new_zeros(*like.shape[:2], entries, *like.shape[3:])

    def _grow(self, capacity: int) -> None:
        cap = round_up(capacity, self.unit)
        old = self.nbytes()
        grown = {}
        for name, t in self.buffers.items():
            out = self._allocate(t, cap // self.units[name])
            out[:, :, : t.shape[2]] = t
            grown[name] = out
        self.buffers = grown
        self.tracker.change(self.nbytes())  # both copies exist for a moment
        self.tracker.change(-old)


class PrefixStore(DenseStore):
    """A dense store whose buffers keep the newest ``kept`` slots (plus up to ``unit - 1`` more) between
    forwards; older slots move to each group's prefix in whole units (module docstring)."""

    kept: int
    unit: int

    def __init__(self, tracker: MemoryTracker | None = None, growth: float = 1.5) -> None:
        super().__init__(tracker, growth)
        self._total = 0  # slots the caller planned for (sizes the prefix's first buffers)

    @property
    def window(self) -> int:
        """Dense slots needed between forwards: the kept slots plus one unit still filling."""
        return self.kept + self.unit

    def reserve(self, slots: int) -> None:
        self._total = max(self._total, slots)
        if not self.groups:
            super().reserve(slots)  # the first forward (the prompt) lands in the buffers whole
            return
        for g in self.groups:
            need = min(slots - g.quantized, self.window)
            if g.capacity < need:
                self._resize(g, need)

    def settle(self, queries: torch.Tensor | None = None, scaling: float | None = None) -> None:
        for g in self.groups:
            moved = (g.tail - self.kept) // self.unit * self.unit
            if moved > 0:
                self._flush(g, moved)
            target = max(g.tail, self.window)
            if g.capacity > target + SHRINK_SLACK:
                self._resize(g, target)
        self.fresh = min(self.fresh, min((g.tail for g in self.groups), default=0))

    def _new_prefix(self, g: SlotGroup) -> BufferPrefix:
        """An empty prefix for ``g`` (sized for the slots planned beyond the buffers)."""
        raise NotImplementedError

    def _flush(self, g: SlotGroup, count: int) -> None:
        """Move the oldest ``count`` buffered slots of ``g`` into its prefix; the rest move to the front."""
        rest = g.tail - count
        if g.prefix is None:
            g.prefix = self._new_prefix(g)
        valid = None if g.valid is None else g.valid[:, :, :count]
        positions = None if g.positions is None else g.positions[:, :, :count]
        self._encode(g, count, valid, positions)
        for t in (g.keys, g.values, g.valid, g.positions):
            if t is not None:
                t[:, :, :rest] = t[:, :, count : count + rest].clone()

    def _encode(self, g: SlotGroup, count: int, valid: torch.Tensor | None, positions: torch.Tensor | None) -> None:
        """Append the oldest ``count`` buffered slots of ``g`` to its prefix (before they leave the buffers)."""
        g.prefix.append(g.keys[:, :, :count], g.values[:, :, :count], valid, positions)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
