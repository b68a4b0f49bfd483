"""The quantized store: old slots as packed integer codes, the newest ``residual`` slots in full precision.

KIVI (Liu et al., arXiv 2402.02750) keeps a full-precision window of recent tokens and quantizes keys per
channel and values per token. Here each slot group of a :class:`~contextlab.store.dense.DenseStore` gains a
:class:`QuantizedPrefix`: after every forward (:meth:`QuantizedStore.settle`), whole groups of ``group``
slots beyond the newest ``residual`` leave the dense buffers for the prefix, so the buffers hold between
``residual`` and ``residual + group - 1`` slots between forwards and the codes hold the rest. A prompt
shorter than ``residual`` is never quantized (full attention exactly).

Composition with eviction: an eviction policy runs in the forward's ``after_forward``, before ``settle``,
so prompt eviction picks among full-precision keys and quantization applies to what is kept. An eviction
after slots were quantized (chunked prefill, decode-time eviction) reads every slot back, keeps the chosen
ones in full-precision buffers and quantizes them again on ``settle``: keys re-enter new token groups, so
a slot may gain the error of one more quantization per such eviction.

Reads (``SlotGroup.used``, ``DenseStore.view``) dequantize into a temporary copy; the decode path can
instead attend over the codes directly (:func:`contextlab.kernels.quant_attention.quantized_attention`).
Bytes (``nbytes``/``used_bytes``) count codes, float16 scales and zero points, per-slot validity and
positions, and the full-precision window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contextlab.store.codec import (
    Codes,
    check_bits,
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
    words,
)
from contextlab.store.dense import SHRINK_SLACK, DenseStore, MemoryTracker, SlotGroup


@dataclass(frozen=True)
class QuantSpec:
    """How slots are quantized: ``bits`` per code, ``group`` tokens per key scale and channels per value
    scale, ``residual`` newest slots kept in full precision."""

    bits: int = 4
    group: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        check_bits(self.bits)
        for name, value, low in (("group", self.group, 1), ("residual", self.residual, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.group:
            raise ValueError(
                f"quantization group {self.group} does not divide the head dimension {head_dim} (values are "
                "quantized in groups of channels); pick a divisor of the head dimension"
            )


class QuantizedPrefix:
    """Codes of a slot group's oldest slots, in buffers that grow geometrically (capacity ``cap`` slots).

    Keys: packed ``[B, Hg, cap, W]``, scale/zero ``[B, Hg, cap / group, D]``; values: packed
    ``[B, Hg, cap, W]``, scale/zero ``[B, Hg, cap, D / group]``; ``valid [B, 1 | Hg, cap]`` and
    ``positions [B, Hg, cap]`` mirror the dense group's metadata (None when it has none).
    """

    def __init__(self, spec: QuantSpec, like: torch.Tensor, capacity: int, tracker: MemoryTracker) -> None:
        b, h, _, d = like.shape
        spec.check_head_dim(d)
        self.spec, self.dim, self.tracker = spec, d, tracker
        self.length = 0
        cap = _round_up(max(capacity, spec.group), spec.group)
        w = words(d, spec.bits)
        zeros = like.new_zeros
        self.keys = Codes(
            zeros(b, h, cap, w, dtype=torch.int32),
            zeros(b, h, cap // spec.group, d, dtype=torch.float16),
            zeros(b, h, cap // spec.group, d, dtype=torch.float16),
        )
        self.values = Codes(
            zeros(b, h, cap, w, dtype=torch.int32),
            zeros(b, h, cap, d // spec.group, dtype=torch.float16),
            zeros(b, h, cap, d // spec.group, dtype=torch.float16),
        )
        self.valid: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        tracker.change(self.nbytes())

    @property
    def capacity(self) -> int:
        return self.keys.packed.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer, each with the slot (or slot group) axis at dim 2."""
        out = [self.keys.packed, self.keys.scale, self.keys.zero, self.values.packed]
        out += [self.values.scale, self.values.zero]
        return out + [t for t in (self.valid, self.positions) if t is not None]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def used_bytes(self) -> int:
        return sum(t.nbytes // t.shape[2] * self._used(t) for t in self.tensors())

    # -- reading ----------------------------------------------------------------------------------------
    def codes(self) -> tuple[Codes, Codes]:
        """Views of the used key and value codes (``N = length`` slots)."""
        n, g = self.length, self.length // self.spec.group
        k, v = self.keys, self.values
        return (
            Codes(k.packed[:, :, :n], k.scale[:, :, :g], k.zero[:, :, :g]),
            Codes(v.packed[:, :, :n], v.scale[:, :, :n], v.zero[:, :, :n]),
        )

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``[B, Hg, length, D]`` keys and values in ``dtype`` (a fresh copy)."""
        keys, values = self.codes()
        spec = self.spec
        k = dequantize_keys(keys, spec.bits, spec.group, self.dim)
        v = dequantize_values(values, spec.bits, spec.group, self.dim)
        return k.to(dtype), v.to(dtype)

    def used_valid(self) -> torch.Tensor | None:
        return None if self.valid is None else self.valid[:, :, : self.length]

    def used_positions(self) -> torch.Tensor:
        if self.positions is None:
            raise RuntimeError("the quantized slots carry no positions while newer slots do")
        return self.positions[:, :, : self.length]

    # -- writing ----------------------------------------------------------------------------------------
    def append(
        self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, positions: torch.Tensor | None
    ) -> None:
        """Quantize ``keys``/``values [B, Hg, m, D]`` (``m`` a multiple of ``group``) after the held slots,
        with their validity ``[B, 1 | Hg, m]`` and positions ``[B, Hg, m]`` (None = none kept)."""
        m, spec = keys.shape[2], self.spec
        start, stop = self.length, self.length + m
        if stop > self.capacity:
            self._grow(max(stop, int(self.capacity * 1.5)))
        kc = quantize_keys(keys, spec.bits, spec.group, valid)  # padding does not widen a key group's range
        vc = quantize_values(values, spec.bits, spec.group)
        first, last = start // spec.group, stop // spec.group
        self.keys.packed[:, :, start:stop] = kc.packed
        self.keys.scale[:, :, first:last], self.keys.zero[:, :, first:last] = kc.scale, kc.zero
        self.values.packed[:, :, start:stop] = vc.packed
        self.values.scale[:, :, start:stop], self.values.zero[:, :, start:stop] = vc.scale, vc.zero
        self._append_valid(valid, start, stop)
        if (positions is None) != (self.positions is None) and (positions is None or start > 0):
            raise RuntimeError("quantized slots must all carry explicit positions or none")
        if positions is not None:
            if self.positions is None:
                self.positions = self._metadata(positions.shape[1], torch.int32, fill=0)
            self.positions[:, :, start:stop] = positions
        self.length = stop

    def export(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Metadata and the used part of every buffer (see :meth:`QuantizedStore._restore_prefix`)."""
        keys, values = self.codes()
        tensors = {"key_codes": keys.packed, "key_scale": keys.scale, "key_zero": keys.zero}
        tensors |= {"value_codes": values.packed, "value_scale": values.scale, "value_zero": values.zero}
        if self.valid is not None:
            tensors["valid"] = self.used_valid()
        if self.positions is not None:
            tensors["positions"] = self.used_positions()
        return {"length": self.length, "dim": self.dim}, {k: v.contiguous() for k, v in tensors.items()}

    def map_batch(self, fn) -> None:
        for codes in (self.keys, self.values):
            codes.packed, codes.scale, codes.zero = fn(codes.packed), fn(codes.scale), fn(codes.zero)
        self.valid = None if self.valid is None else fn(self.valid)
        self.positions = None if self.positions is None else fn(self.positions)

    # -- internals --------------------------------------------------------------------------------------
    def _used(self, t: torch.Tensor) -> int:
        """Used entries along dim 2 of one buffer (key scales hold one entry per group of slots)."""
        return self.length // self.spec.group if t.shape[2] != self.capacity else self.length

    def _append_valid(self, valid: torch.Tensor | None, start: int, stop: int) -> None:
        if valid is None and self.valid is None:
            return
        heads = 1 if valid is None else valid.shape[1]
        if self.valid is None:
            self.valid = self._metadata(heads, torch.bool, fill=1)
        elif self.valid.shape[1] < heads:  # per-head validity arrives: widen the shared row
            widened = self._metadata(heads, torch.bool, fill=1)
            widened.copy_(self.valid.expand_as(widened))
            self.tracker.change(-self.valid.nbytes)
            self.valid = widened
        self.valid[:, :, start:stop] = True if valid is None else valid

    def _metadata(self, heads: int, dtype: torch.dtype, fill: int) -> torch.Tensor:
        b = self.keys.packed.shape[0]
        out = torch.full((b, heads, self.capacity), fill, dtype=dtype, device=self.keys.packed.device)
        self.tracker.change(out.nbytes)
        return out

    def _grow(self, capacity: int) -> None:
        cap, before = _round_up(capacity, self.spec.group), self.capacity
        old = self.nbytes()

        def grown(t: torch.Tensor) -> torch.Tensor:
            size = cap if t.shape[2] == before else cap // self.spec.group
            out = t.new_zeros(*t.shape[:2], size, *t.shape[3:])
            out[:, :, : t.shape[2]] = t
            return out

        k, v = self.keys, self.values
        self.keys = Codes(grown(k.packed), grown(k.scale), grown(k.zero))
        self.values = Codes(grown(v.packed), grown(v.scale), grown(v.zero))
        self.valid = None if self.valid is None else grown(self.valid)
        self.positions = None if self.positions is None else grown(self.positions)
        self.tracker.change(self.nbytes())  # both copies exist for a moment
        self.tracker.change(-old)


class QuantizedStore(DenseStore):
    """A dense store whose slots beyond the newest ``spec.residual`` are held as codes (module docstring)."""

    def __init__(self, spec: QuantSpec, tracker: MemoryTracker | None = None, growth: float = 1.5) -> None:
        super().__init__(tracker, growth)
        self.spec = spec
        self._total = 0  # slots the caller planned for (sizes the prefix's first buffers)

    @property
    def window(self) -> int:
        """Dense slots needed between forwards: the residual plus one group still filling."""
        return self.spec.residual + self.spec.group

    def _restore_prefix(self, meta: dict, tensors: dict[str, torch.Tensor]) -> QuantizedPrefix:
        codes = tensors["key_codes"]
        b, h, n, _ = codes.shape
        if n != meta["length"] or n % self.spec.group:
            raise ValueError(f"saved quantized slots ({n}) do not fit this method's groups of {self.spec.group}")
        like = torch.empty(b, h, 0, meta["dim"], device=codes.device)
        prefix = QuantizedPrefix(self.spec, like, n, self.tracker)
        g = n // self.spec.group
        prefix.keys.packed[:, :, :n], prefix.values.packed[:, :, :n] = codes, tensors["value_codes"]
        prefix.keys.scale[:, :, :g], prefix.keys.zero[:, :, :g] = tensors["key_scale"], tensors["key_zero"]
        prefix.values.scale[:, :, :n], prefix.values.zero[:, :, :n] = tensors["value_scale"], tensors["value_zero"]
        if "valid" in tensors:
            prefix.valid = prefix._metadata(tensors["valid"].shape[1], torch.bool, fill=1)
            prefix.valid[:, :, :n] = tensors["valid"]
        if "positions" in tensors:
            prefix.positions = prefix._metadata(tensors["positions"].shape[1], torch.int32, fill=0)
            prefix.positions[:, :, :n] = tensors["positions"]
        prefix.length = n
        return prefix

    def _first_group(self, keys, values) -> None:
        self.spec.check_head_dim(keys.shape[-1])
        super()._first_group(keys, values)

    def reserve(self, slots: int) -> None:
        self._total = max(self._total, slots)
        if not self.groups:
            super().reserve(slots)  # the first forward (the prompt) lands in the buffers whole
            return
        for g in self.groups:
            need = min(slots - g.quantized, self.window)
            if g.capacity < need:
                self._resize(g, need)

    def settle(self) -> None:
        for g in self.groups:
            moved = (g.tail - self.spec.residual) // self.spec.group * self.spec.group
            if moved > 0:
                self._flush(g, moved)
            target = max(g.tail, self.window)
            if g.capacity > target + SHRINK_SLACK:
                self._resize(g, target)
        self.fresh = min(self.fresh, min((g.tail for g in self.groups), default=0))

    def _flush(self, g: SlotGroup, count: int) -> None:
        """Quantize the oldest ``count`` buffered slots of ``g`` into its prefix; the rest move to the front."""
        rest = g.tail - count
        if g.prefix is None:
            g.prefix = QuantizedPrefix(self.spec, g.keys, self._total - self.spec.residual, self.tracker)
        valid = None if g.valid is None else g.valid[:, :, :count]
        positions = None if g.positions is None else g.positions[:, :, :count]
        g.prefix.append(g.keys[:, :, :count], g.values[:, :, :count], valid, positions)
        for t in (g.keys, g.values, g.valid, g.positions):
            if t is not None:
                t[:, :, :rest] = t[:, :, count : count + rest].clone()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
