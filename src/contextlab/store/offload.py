"""The offloading store: old slots in host memory, the newest ``resident`` slots on the device.

InfLLM (Xiao et al., 2024, arXiv 2402.04617) keeps the memory blocks a query does not read in CPU memory and
copies the selected ones to the GPU per step. Here each slot group of a
:class:`~contextlab.store.dense.DenseStore` gains a :class:`HostPrefix`: after every forward
(:meth:`OffloadStore.settle`) whole units of slots beyond the newest ``resident`` leave the device buffers
for host memory (pinned when the device is a GPU, so copies can overlap). Per-slot validity and positions
stay on the device (a few bytes per slot), so a read plan is checked without touching the host.

Reads: :meth:`~contextlab.store.dense.SlotGroup.gather` copies to the device only the host slots a read
plan names; a full read (a prefill chunk attending to everything, an eviction) copies the whole prefix.
Every byte copied host -> device is counted in :attr:`HostPrefix.moved_bytes`. When the cache already
lives in host memory (a CPU-only run) offloading would only copy slots around: the store stays dense and
says so once (:func:`separate_memory` decides; tests force it on to run the mechanism on CPU). Bytes
(``nbytes``) count what lives on the cache's device; :meth:`OffloadStore.host_bytes` the rest.
"""

from __future__ import annotations

import warnings

import torch

from contextlab.store.dense import DenseStore, MemoryTracker, SlotGroup
from contextlab.store.prefix import BufferPrefix, PrefixStore


class HostPrefix(BufferPrefix):
    """A group's oldest slots: ``keys``/``values [B, Hg, cap, D]`` on ``host``; validity and positions on the
    cache's device."""

    anchor = "keys"

    def __init__(self, like: torch.Tensor, capacity: int, tracker: MemoryTracker, host: torch.device) -> None:
        b, h, _, d = like.shape
        self.tracker, self.device, self.host, self.dim = tracker, like.device, host, d
        self.unit, self.length, self.moved_bytes = 1, 0, 0
        self.pin = like.device.type == "cuda" and host.type == "cpu" and torch.cuda.is_available()
        cap = max(capacity, 1)
        self.buffers = {name: self._host_zeros((b, h, cap, d), like.dtype) for name in ("keys", "values")}
        self.units = {"keys": 1, "values": 1}
        tracker.change(self.nbytes())

    def _host_zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.host, pin_memory=self.pin)

    def _allocate(self, like: torch.Tensor, entries: int) -> torch.Tensor:
        if like.device != self.host:
            return super()._allocate(like, entries)
        return self._host_zeros((*like.shape[:2], entries, *like.shape[3:]), like.dtype)

    def _to_device(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        self.moved_bytes += t.nbytes
        return t.to(self.device, dtype, non_blocking=self.pin)

    # -- reading ----------------------------------------------------------------------------------------
    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held slot copied to the device: ``[B, Hg, length, D]`` keys and values."""
        return self.span(0, self.length, dtype)

    def span(self, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.buffers["keys"], self.buffers["values"]
        return self._to_device(keys[:, :, start:end], dtype), self._to_device(values[:, :, start:end], dtype)

    def gather(
        self, indices: torch.Tensor, wanted: torch.Tensor, dtype: torch.dtype, values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, Hg, K, D]`` keys (and values) with the slots ``indices`` where ``wanted`` filled in (other
        entries are left zero): per row and head the wanted slots are gathered on the host first, so only
        ``max over rows and heads of the wanted count`` slots per head cross to the device."""
        b, h, k = indices.shape
        count = int(wanted.sum(-1).max())
        order = (~wanted).to(torch.uint8).argsort(dim=-1, stable=True)[..., :count]  # wanted entries first
        slots = indices.gather(-1, order).clamp(0, self.length - 1).to(self.host)
        index = slots.unsqueeze(-1).expand(b, h, count, self.dim)
        where = order.unsqueeze(-1).expand(b, h, count, self.dim)
        out = []
        for name in ("keys", "values") if values else ("keys",):
            picked = self._to_device(self.buffers[name][:, :, : self.length].gather(2, index), dtype)
            out.append(picked.new_zeros(b, h, k, self.dim).scatter_(2, where, picked))
        return out[0], (out[1] if values else None)

    # -- writing ----------------------------------------------------------------------------------------
    def append(
        self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, positions: torch.Tensor | None
    ) -> None:
        """Copy ``keys``/``values [B, Hg, m, D]`` to the host after the held slots, with their validity
        ``[B, 1 | Hg, m]`` and positions ``[B, Hg, m]`` (None = none kept)."""
        m = keys.shape[2]
        start, stop = self.length, self.length + m
        if stop > self.capacity:
            self._grow(max(stop, int(self.capacity * 1.5)))
        self.buffers["keys"][:, :, start:stop].copy_(keys)
        self.buffers["values"][:, :, start:stop].copy_(values)
        self._append_metadata(valid, positions, start, stop)
        self.length = stop

    def restore(self, tensors: dict[str, torch.Tensor], length: int) -> None:
        super().restore({k: (v.to(self.host) if k in ("keys", "values") else v) for k, v in tensors.items()}, length)


def separate_memory(device: torch.device, host: torch.device) -> bool:
    """Whether slots held on ``host`` would free memory on ``device`` (False when both are host memory)."""
    return device != host


class OffloadStore(PrefixStore):
    """A dense store whose slots beyond the newest ``resident`` live in host memory, moved there ``unit``
    slots at a time (module docstring)."""

    def __init__(
        self,
        resident: int,
        unit: int,
        tracker: MemoryTracker | None = None,
        host: torch.device | str = "cpu",
        growth: float = 1.5,
    ) -> None:
        super().__init__(tracker, growth)
        if resident < 1 or unit < 1:
            raise ValueError(f"an offloading store needs resident >= 1 and unit >= 1, got {resident} and {unit}")
        self.kept, self.unit, self.host = resident, unit, torch.device(host)
        self.active: bool | None = None  # decided on the first settle, from where the cache lives

    def reserve(self, slots: int) -> None:
        if self.active is False:  # a dense store after all
            DenseStore.reserve(self, slots)
        else:
            super().reserve(slots)

    def settle(self, queries: torch.Tensor | None = None, scaling: float | None = None) -> None:
        if self.active is None and self.groups:
            self.active = separate_memory(self.groups[0].keys.device, self.host)
            if not self.active:
                warnings.warn(
                    f"offloading to {self.host} does nothing here: the cache already lives in that memory "
                    "(every slot stays where it is)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if self.active:
            super().settle(queries, scaling)

    @property
    def moved_bytes(self) -> int:
        """Bytes copied from host memory to the device so far."""
        return sum(g.prefix.moved_bytes for g in self.groups if g.prefix is not None)

    def host_bytes(self) -> int:
        """Bytes held in host memory (0 when the host is the cache's device: they count in ``nbytes``)."""
        return sum(g.prefix.host_bytes() for g in self.groups if g.prefix is not None)

    def _new_prefix(self, g: SlotGroup) -> HostPrefix:
        return HostPrefix(g.keys[:, :, :0], self._total - self.kept, self.tracker, self.host)

    def _restore_prefix(self, meta: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> HostPrefix:
        b, h = tensors["keys"].shape[:2]
        like = torch.empty(b, h, 0, meta["dim"], dtype=tensors["keys"].dtype, device=device)
        prefix = HostPrefix(like, meta["length"], self.tracker, self.host)
        prefix.restore(tensors, meta["length"])
        return prefix

    def host_held(self, meta: dict) -> set[str]:
        return {
            f"g{i}.prefix.{name}"
            for i, group in enumerate(meta["groups"])
            if group["prefix"]
            for name in ("keys", "values")
        }
