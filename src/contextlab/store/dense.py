"""The dense store: one layer's keys and values in preallocated buffers, written in place.

Layout, per group of KV heads that share a slot count::

    keys [B, Hg, capacity, D] = [ used slots (length) | free capacity ]

Appending writes into the free capacity; only when it runs out is the buffer reallocated, geometrically
(``growth`` x), so ``n`` one-token appends cost O(log n) reallocations instead of n copies of the cache.
Callers plan capacity ahead (:meth:`DenseStore.reserve`: prompt + answer, or budget + one chunk) so most
runs never reallocate. Eviction compacts the kept slots to the front in place and then gives back capacity
beyond what the caller asks to keep free (``headroom``) when that surplus is worth a copy, so memory
really shrinks.

Heads with different budgets (AdaKV, PyramidKV rows) live in separate groups, so per-head budgets save
real memory. Per-slot metadata is held only where it is needed, and counted in :meth:`DenseStore.nbytes`:
``valid [B, 1 | Hg, capacity]`` (False on padding and on slots past a row's own count) once any slot is
invalid, and ``positions [B, Hg, capacity]`` (each slot's position in its row) once tokens were evicted;
before that a slot's position is its rank among its row's valid slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

COMPACT_BLOCK = 1024  # slots moved at a time by in-place compaction (bounds its temporary memory)
SHRINK_SLACK = 64  # after eviction, free capacity beyond max(this, a quarter of what is kept) is given back


def position_dtype(largest: int) -> torch.dtype:
    """The narrowest type for slot positions up to ``largest``: int16 (2 bytes per slot and head) while
    every position is below 32768, int32 beyond. Stores widen their buffers when a later position needs it,
    so an evicted cache of a prompt under 32K tokens spends 2 bytes, not 4, on each kept slot's position."""
    return torch.int16 if largest <= torch.iinfo(torch.int16).max else torch.int32


class MemoryTracker:
    """Current and peak bytes held by stores (the CPU stand-in for ``torch.cuda.max_memory_allocated``)."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def change(self, delta: int) -> None:
        self.current += delta
        self.peak = max(self.peak, self.current)


def widened(t: torch.Tensor | None, dtype: torch.dtype, tracker: MemoryTracker) -> torch.Tensor | None:
    """``t`` converted to ``dtype`` when that is wider than its own type (the bytes change tracked)."""
    if t is None or t.element_size() >= dtype.itemsize:
        return t
    out = t.to(dtype)
    tracker.change(out.nbytes - t.nbytes)
    return out


@dataclass
class SlotGroup:
    """KV heads stored together. ``heads``: indices of the KV heads (None = all, in order)."""

    heads: torch.Tensor | None
    keys: torch.Tensor  # [B, Hg, capacity, D]
    values: torch.Tensor  # [B, Hg, capacity, D]
    length: int = 0
    valid: torch.Tensor | None = None  # [B, 1 | Hg, capacity] bool; None = every used slot is valid
    positions: torch.Tensor | None = None  # [B, Hg, capacity] int16/int32; None = rank among valid slots
    prefix: Prefix | None = None  # the oldest slots, held in another form (quantized codes); None = none

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def num_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def quantized(self) -> int:
        """Slots held by the prefix (the first ``quantized`` slots)."""
        return 0 if self.prefix is None else self.prefix.length

    @property
    def tail(self) -> int:
        """Slots held in the buffers: slots ``quantized .. length`` live in columns ``0 .. tail``."""
        return self.length - self.quantized

    def nbytes(self) -> int:
        meta = sum(t.nbytes for t in (self.valid, self.positions) if t is not None)
        held = 0 if self.prefix is None else self.prefix.nbytes()
        return self.keys.nbytes + self.values.nbytes + meta + held

    def used_bytes(self) -> int:
        """Bytes of the used slots only (keys, values and their metadata)."""
        per_slot = sum(
            t.nbytes // t.shape[2] for t in (self.keys, self.values, self.valid, self.positions) if t is not None
        )
        return per_slot * self.tail + (0 if self.prefix is None else self.prefix.used_bytes())

    def used(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, Hg, length, D]`` keys and values of the used slots: views of the buffers, or a fresh copy
        with the prefix read back (dequantized) in front."""
        keys, values = self.keys[:, :, : self.tail], self.values[:, :, : self.tail]
        if self.prefix is None:
            return keys, values
        old_keys, old_values = self.prefix.read(keys.dtype)
        return torch.cat([old_keys, keys], dim=2), torch.cat([old_values, values], dim=2)

    def span(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, Hg, end - start, D]`` keys and values of slots ``[start, end)``: views of the buffers when the
        span lies there; only the span is read back from the prefix otherwise."""
        q = self.quantized
        if start >= q:
            return self.keys[:, :, start - q : end - q], self.values[:, :, start - q : end - q]
        old_keys, old_values = self.prefix.span(start, min(end, q), self.keys.dtype)
        if end <= q:
            return old_keys, old_values
        keys, values = self.keys[:, :, : end - q], self.values[:, :, : end - q]
        return torch.cat([old_keys, keys], dim=2), torch.cat([old_values, values], dim=2)

    def gather(
        self, indices: torch.Tensor, values: bool = True, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys (and values) ``[B, Hg, K, D]`` of slots ``indices [B, Hg, K]`` (each in ``[0, length)``),
        reading from the prefix only the slots it holds; with ``valid [B, Hg, K]`` only the entries the
        caller will use (the others come back as any slot's content)."""
        index = (indices - self.quantized).clamp(0, max(self.tail - 1, 0))
        expand = index.unsqueeze(-1).expand(*index.shape, self.keys.shape[-1])
        keys = self.keys.gather(2, expand)
        vals = self.values.gather(2, expand) if values else None
        if self.prefix is None:
            return keys, vals
        old = indices < self.quantized
        if valid is not None:
            old = old & valid
        if not bool(old.any()):
            return keys, vals
        old_keys, old_values = self.prefix.gather(indices, old, keys.dtype, values)
        keys = torch.where(old.unsqueeze(-1), old_keys, keys)
        return keys, (torch.where(old.unsqueeze(-1), old_values, vals) if values else None)

    def used_valid(self) -> torch.Tensor | None:
        tail = None if self.valid is None else self.valid[:, :, : self.tail]
        old = None if self.prefix is None else self.prefix.used_valid()
        if self.prefix is None or (old is None and tail is None):
            return tail
        b, n = self.keys.shape[0], self.quantized
        ones = self.keys.new_ones
        old = ones(b, 1, n, dtype=torch.bool) if old is None else old
        tail = ones(b, 1, self.tail, dtype=torch.bool) if tail is None else tail
        heads = max(old.shape[1], tail.shape[1])
        return torch.cat([old.expand(-1, heads, -1), tail.expand(-1, heads, -1)], dim=2)

    def used_positions(self) -> torch.Tensor | None:
        """``[B, Hg, length]`` positions of the used slots (None when slots carry no explicit position)."""
        if self.positions is None:
            return None
        tail = self.positions[:, :, : self.tail]
        return tail if self.prefix is None else torch.cat([self.prefix.used_positions(), tail], dim=2)


class Prefix(Protocol):
    """The oldest slots of a group held in another form than the buffers (integer codes:
    :class:`~contextlab.store.quantized.QuantizedPrefix`; host memory:
    :class:`~contextlab.store.offload.HostPrefix`); read back on demand."""

    length: int

    @property
    def direct_read(self) -> bool: ...
    def host_bytes(self) -> int: ...
    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]: ...
    def span(self, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]: ...
    def gather(
        self, indices: torch.Tensor, wanted: torch.Tensor, dtype: torch.dtype, values: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def used_valid(self) -> torch.Tensor | None: ...
    def used_positions(self) -> torch.Tensor: ...
    def nbytes(self) -> int: ...
    def used_bytes(self) -> int: ...
    def map_batch(self, fn) -> None: ...
    def export(self) -> tuple[dict, dict[str, torch.Tensor]]: ...


@dataclass
class SlotView:
    """Every head's used slots in one block, right-aligned: the newest slot of every head is the last
    column, so the last ``Tq`` columns are the tokens of the current forward for every head.

    ``keys``/``values``: ``[B, H, S, D]``; ``valid``: ``[B, 1 | H, S]``; ``positions``: ``[B, 1 | H, S]``
    (long); ``offsets``: ``[H]`` column where each head's own slots begin (0 for the longest heads).
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    offsets: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[2]


class DenseStore:
    """Keys and values of one attention layer (see module docstring)."""

    def __init__(self, tracker: MemoryTracker | None = None, growth: float = 1.5) -> None:
        if growth <= 1.0:
            raise ValueError(f"growth must be > 1, got {growth}")
        self.groups: list[SlotGroup] = []
        self.tracker = tracker or MemoryTracker()
        self.growth = growth
        self.reallocations = 0
        self.fresh = 0  # slots appended since the last eviction (the only ones that can be cropped)
        self.version = 0  # bumped whenever used slots move or disappear (eviction, crop, clear, restore)
        self._planned = 0

    # -- sizes ------------------------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return sum(g.num_heads for g in self.groups)

    @property
    def length(self) -> int:
        """Slots of the longest head."""
        return max((g.length for g in self.groups), default=0)

    @property
    def split(self) -> bool:
        """True when heads are stored in more than one group."""
        return len(self.groups) > 1

    @property
    def keeps_positions(self) -> bool:
        """True once slots carry explicit positions (after an eviction)."""
        return any(g.positions is not None for g in self.groups)

    def nbytes(self) -> int:
        """Bytes held: every buffer at its capacity, metadata included."""
        return sum(g.nbytes() for g in self.groups)

    def used_bytes(self) -> int:
        """Bytes of the slots in use (keys, values, metadata), without free capacity."""
        return sum(g.used_bytes() for g in self.groups)

    # -- writing ----------------------------------------------------------------------------------------
    def reserve(self, slots: int) -> None:
        """Make every group hold at least ``slots`` slots without reallocating (planned before the first
        append, applied at once after it)."""
        if not self.groups:
            self._planned = max(self._planned, slots)
            return
        for g in self.groups:
            if g.capacity < slots:
                self._resize(g, slots)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``keys``/``values`` ``[B, H, T, D]`` after every group's used slots. New slots count as
        valid until :meth:`mark_new` says otherwise."""
        if not self.groups:
            self._first_group(keys, values)
        t = keys.shape[2]
        for g in self.groups:
            k = keys if g.heads is None else keys[:, g.heads]
            v = values if g.heads is None else values[:, g.heads]
            start, need = g.tail, g.tail + t
            if need > g.capacity:
                self._resize(g, max(need, math.ceil(g.capacity * self.growth)))
            g.keys[:, :, start:need] = k
            g.values[:, :, start:need] = v
            if g.valid is not None:
                g.valid[:, :, start:need] = True
            g.length += t
        self.fresh += t

    def mark_new(
        self, count: int, valid: torch.Tensor | None, positions: torch.Tensor | None, largest: int | None = None
    ) -> None:
        """Validity ``[B, count]`` (None = all valid) and positions ``[B, count]`` of the newest slots
        (needed once the store :attr:`keeps_positions`). ``largest``: a bound on those positions known
        without reading them (the layer's column count; None = read them), which widens the position
        buffers when they outgrow int16."""
        if positions is not None and self.keeps_positions:
            bound = int(positions.max()) if largest is None else largest
            for g in self.groups:
                g.positions = widened(g.positions, position_dtype(bound), self.tracker)
        for g in self.groups:
            span = slice(g.tail - count, g.tail)
            if valid is not None:
                if g.valid is None:
                    g.valid = self._metadata(g, torch.ones, torch.bool, heads=1)
                g.valid[:, :, span] = valid[:, None, :]
            if g.positions is not None:
                g.positions[:, :, span] = positions[:, None, :].to(g.positions.dtype)

    def crop(self, count: int) -> None:
        """Forget the newest ``count`` slots of every group."""
        if count > self.fresh:
            raise ValueError(f"cannot crop {count} slots: only {self.fresh} were appended since the last eviction")
        if any(count > g.tail for g in self.groups):
            raise ValueError(f"cannot crop {count} slots: some of them were already quantized")
        for g in self.groups:
            g.length -= count
        self.fresh -= count
        self.version += 1

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (reorder, select or repeat rows) to every buffer's batch axis."""
        before = self.nbytes()
        for g in self.groups:
            g.keys, g.values = fn(g.keys), fn(g.values)
            g.valid = None if g.valid is None else fn(g.valid)
            g.positions = None if g.positions is None else fn(g.positions)
            if g.prefix is not None:
                g.prefix.map_batch(fn)
        self.tracker.change(self.nbytes() - before)

    def settle(self, queries: torch.Tensor | None = None, scaling: float | None = None) -> None:
        """Called after every forward once the policy is done, with the forward's queries ``[B, Hq, Tq, D]``:
        a store may re-encode old slots here (the dense store keeps everything as it is)."""
        return None

    def clear(self) -> None:
        self.tracker.change(-self.nbytes())
        self.groups, self._planned, self.fresh = [], 0, 0
        self.version += 1

    # -- reading ----------------------------------------------------------------------------------------
    def view(self) -> SlotView:
        """All heads' used slots as one right-aligned block (see :class:`SlotView`). Views of the buffers
        when heads are not split; a padded copy otherwise."""
        if not self.split:
            return self._single_view(self.groups[0])
        return self._padded_view()

    # -- eviction ---------------------------------------------------------------------------------------
    def keep(self, indices: torch.Tensor, kept: torch.Tensor, headroom: int = 0, shrink: bool = True) -> None:
        """Keep, for every (row, head), the slots ``indices [B, H, C]`` (columns of :meth:`view`, ascending;
        where ``kept [B, H, C]`` is False the slot is unused). Heads then hold ``max over rows`` of their
        kept count, grouped by that count; ``headroom`` free slots stay allocated after each group.
        ``shrink=False`` keeps a group's buffer when it was compacted in place (more tokens are coming)."""
        self.fresh = 0
        self.version += 1
        per_head = kept.sum(-1).amax(0)  # [H]
        sizes = sorted(set(per_head.tolist()))
        if not self.split and len(sizes) == 1 and self.groups[0].prefix is None:
            self._compact(self.groups[0], indices[..., : sizes[0]], kept[..., : sizes[0]], headroom if shrink else None)
        else:
            self._rebuild(indices, kept, per_head, sizes, headroom)

    # -- saving ---------------------------------------------------------------------------------------------
    def export(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Everything needed to rebuild the store: JSON-able metadata and named tensors of the used slots."""
        meta: dict = {"fresh": self.fresh, "version": self.version, "groups": []}
        tensors: dict[str, torch.Tensor] = {}
        for i, g in enumerate(self.groups):
            group_meta, group_tensors = export_group(g)
            if g.prefix is not None:
                group_meta["prefix"], prefix_tensors = g.prefix.export()
                group_tensors.update({f"prefix.{k}": v for k, v in prefix_tensors.items()})
            meta["groups"].append(group_meta)
            tensors.update({f"g{i}.{k}": v for k, v in group_tensors.items()})
        return meta, tensors

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor], room: int = 0) -> None:
        """Replace the content by an :meth:`export` (``room`` free slots after each group's used ones)."""
        self.clear()
        for i, group_meta in enumerate(meta["groups"]):
            mine = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"g{i}.")}
            g = restore_group(group_meta, mine, room)
            self.tracker.change(g.nbytes())
            if group_meta["prefix"]:
                prefix = {k.split(".", 1)[1]: v for k, v in mine.items() if k.startswith("prefix.")}
                g.prefix = self._restore_prefix(group_meta["prefix"], prefix, g.keys.device)
            self.groups.append(g)
        self.fresh = meta["fresh"]
        self.version = meta.get("version", self.version)  # the saved policy state refers to this numbering

    def _restore_prefix(self, meta: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> Prefix:
        raise ValueError("the saved cache holds quantized slots but this store is dense (load it with its method)")

    def host_held(self, meta: dict) -> set[str]:
        """Names of the tensors of an :meth:`export` (``meta``) that this store keeps in host memory, so a
        loaded cache need not put them on the device first."""
        return set()

    # -- internals --------------------------------------------------------------------------------------
    def _first_group(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        b, h, t, d = keys.shape
        cap = max(t, self._planned)
        g = SlotGroup(heads=None, keys=keys.new_empty(b, h, cap, d), values=values.new_empty(b, h, cap, d))
        self.groups = [g]
        self.tracker.change(g.nbytes())

    def _metadata(self, g: SlotGroup, fill, dtype: torch.dtype, heads: int | None = None) -> torch.Tensor:
        """A fresh ``[B, heads or Hg, capacity]`` metadata buffer (its bytes are tracked)."""
        b = g.keys.shape[0]
        out = fill(b, heads or g.num_heads, g.capacity, dtype=dtype, device=g.keys.device)
        self.tracker.change(out.nbytes)
        return out

    def _keep_positions(self, g: SlotGroup, positions: torch.Tensor) -> None:
        """Give ``g`` a fresh position buffer holding ``positions [B, Hg, n]`` in its first ``n`` slots, in the
        narrowest type they fit (:func:`position_dtype`)."""
        largest = int(positions.max()) if positions.numel() else 0
        g.positions = self._metadata(g, torch.zeros, position_dtype(largest))
        g.positions[:, :, : positions.shape[-1]] = positions

    def _resize(self, g: SlotGroup, capacity: int) -> None:
        """Move a group into buffers of ``capacity`` slots (its used slots are copied once)."""
        old = g.nbytes()
        n = g.tail

        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            out = t.new_empty(*t.shape[:2], capacity, *t.shape[3:])
            out[:, :, :n] = t[:, :, :n]
            return out

        g.keys, g.values, g.valid, g.positions = (moved(t) for t in (g.keys, g.values, g.valid, g.positions))
        self.tracker.change(g.nbytes())  # both copies exist for a moment
        self.tracker.change(-old)
        self.reallocations += 1

    def _single_view(self, g: SlotGroup) -> SlotView:
        keys, values = g.used()
        valid = g.used_valid()
        if valid is None:
            valid = torch.ones(keys.shape[0], 1, g.length, dtype=torch.bool, device=keys.device)
        explicit = g.used_positions()
        # Without explicit positions a slot's position is its rank among the row's valid slots.
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0) if explicit is None else explicit.long()
        offsets = torch.zeros(g.num_heads, dtype=torch.long, device=keys.device)
        return SlotView(keys, values, valid, positions, offsets)

    def _padded_view(self) -> SlotView:
        first = self.groups[0]
        b, _, _, d = first.keys.shape
        h, s, device = self.num_heads, self.length, first.keys.device
        keys = first.keys.new_zeros(b, h, s, d)
        values = first.values.new_zeros(b, h, s, d)
        valid = torch.zeros(b, h, s, dtype=torch.bool, device=device)
        positions = torch.zeros(b, h, s, dtype=torch.long, device=device)
        offsets = torch.zeros(h, dtype=torch.long, device=device)
        for g in self.groups:
            part = self._single_view(g)
            off = s - g.length
            keys[:, g.heads, off:] = part.keys
            values[:, g.heads, off:] = part.values
            valid[:, g.heads, off:] = part.valid.expand(-1, g.num_heads, -1)
            positions[:, g.heads, off:] = part.positions.expand(-1, g.num_heads, -1)
            offsets[g.heads] = off
        return SlotView(keys, values, valid, positions, offsets)

    def _compact(self, g: SlotGroup, indices: torch.Tensor, kept: torch.Tensor, headroom: int | None) -> None:
        """Move the kept slots ``indices [B, Hg, C]`` (ascending) to the front of the group's own buffers.

        Safe in place: the slot written at column j comes from column indices[j] >= j, and a block reads
        all its sources before writing, so no source is overwritten before it is read."""
        view = self._single_view(g)
        positions = view.positions.expand(-1, g.num_heads, -1).gather(-1, indices)  # [B, Hg, C]
        c, d = indices.shape[-1], g.keys.shape[-1]
        for start in range(0, c, COMPACT_BLOCK):
            idx = indices[:, :, start : start + COMPACT_BLOCK]
            gather = idx.unsqueeze(-1).expand(*idx.shape, d)
            stop = start + idx.shape[-1]
            g.keys[:, :, start:stop] = g.keys.gather(2, gather)
            g.values[:, :, start:stop] = g.values.gather(2, gather)
        all_kept = bool(kept.all())
        self._drop_metadata(g)
        g.length = c
        target = c + (headroom or 0)
        if headroom is not None and g.capacity - target > max(SHRINK_SLACK, target // 4):
            self._resize(g, target)  # give memory back; a small surplus is kept rather than copied
        if not all_kept:
            g.valid = self._metadata(g, torch.zeros, torch.bool)
            g.valid[:, :, :c] = kept
        self._keep_positions(g, positions)

    def _drop_metadata(self, g: SlotGroup) -> None:
        freed = sum(t.nbytes for t in (g.valid, g.positions) if t is not None)
        g.valid = g.positions = None
        self.tracker.change(-freed)

    def _rebuild(
        self, indices: torch.Tensor, kept: torch.Tensor, per_head: torch.Tensor, sizes: list[int], headroom: int
    ) -> None:
        """Regroup heads by their new slot count, gathering from the padded view."""
        view = self.view()
        copied = self.split or any(g.prefix is not None for g in self.groups)  # view() made a copy
        transient = view.keys.nbytes + view.values.nbytes if copied else 0
        self.tracker.change(transient)
        b, h, _, d = view.keys.shape
        groups = []
        for size in sizes:
            heads = None if len(sizes) == 1 else (per_head == size).nonzero().flatten()
            pick = slice(None) if heads is None else heads
            idx, ok = indices[:, pick, :size], kept[:, pick, :size]
            gather = idx.unsqueeze(-1).expand(*idx.shape, d)
            hg = idx.shape[1]
            g = SlotGroup(
                heads=heads,
                keys=view.keys.new_empty(b, hg, size + headroom, d),
                values=view.values.new_empty(b, hg, size + headroom, d),
                length=size,
            )
            g.keys[:, :, :size] = view.keys[:, pick].gather(2, gather)
            g.values[:, :, :size] = view.values[:, pick].gather(2, gather)
            self.tracker.change(g.nbytes())
            if not bool(ok.all()):
                g.valid = self._metadata(g, torch.zeros, torch.bool)
                g.valid[:, :, :size] = ok
            self._keep_positions(g, view.positions.expand(b, h, -1)[:, pick].gather(-1, idx))
            groups.append(g)
        self.tracker.change(-transient - self.nbytes())
        self.groups = groups


# -- saving and loading (see contextlab.engine.persist) ------------------------------------------------------
GROUP_FIELDS = ("keys", "values", "valid", "positions")


def export_group(g: SlotGroup) -> tuple[dict, dict[str, torch.Tensor]]:
    """A group's used slots as metadata and named tensors (free capacity is not saved)."""
    meta: dict = {"length": g.length, "prefix": None}
    tensors = {}
    for name in GROUP_FIELDS:
        t = getattr(g, name)
        if t is not None:
            tensors[name] = t[:, :, : g.tail].contiguous()
    if g.heads is not None:
        tensors["heads"] = g.heads
    return meta, tensors


def restore_group(meta: dict, tensors: dict[str, torch.Tensor], room: int) -> SlotGroup:
    """Inverse of :func:`export_group` (without the prefix), with ``room`` free slots after the used ones."""

    def padded(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        out = t.new_zeros(*t.shape[:2], t.shape[2] + room, *t.shape[3:])
        out[:, :, : t.shape[2]] = t
        return out

    get = tensors.get
    return SlotGroup(
        heads=get("heads"),
        keys=padded(get("keys")),
        values=padded(get("values")),
        length=meta["length"],
        valid=padded(get("valid")),
        positions=padded(get("positions")),
    )
