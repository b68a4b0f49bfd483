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
from typing import NamedTuple

import torch

from contextlab.methods.positions import Rope, rotate
from contextlab.store.codec import (
    E4M3,
    Codes,
    check_bits,
    check_fit,
    check_hadamard_dim,
    check_levels,
    check_rotate,
    check_scales,
    dequantize_keys,
    dequantize_values,
    hadamard,
    level_table,
    outlier_count,
    quantize_keys,
    quantize_values,
    words,
)
from contextlab.store.dense import MemoryTracker, SlotGroup
from contextlab.store.prefix import BufferPrefix, PrefixStore, round_up


@dataclass(frozen=True)
class QuantSpec:
    """How slots are quantized: ``bits`` per code, ``group`` tokens per key scale and channels per value
    scale, ``residual`` newest slots kept in full precision, ``outliers`` fraction of entries per group kept
    apart in float16 (KVQuant's dense-and-sparse split), ``pre_rope``: keys quantized before RoPE (rotated
    back by their position when stored, forward when read; KVQuant), ``scales``: ``"fp16"`` (asymmetric,
    float16 scale and zero point) or ``"e4m3"`` (symmetric, one float8 scale per group; see
    :mod:`contextlab.store.codec`), ``sink``: the first ``sink`` valid slots of each row and head keep exact
    keys and values and do not widen their key group's range (see :class:`QuantizedPrefix`), ``levels``:
    ``"uniform"`` or ``"normal"`` (non-uniform levels: between a group's min and max for fp16 scales, the
    normal law's Lloyd-Max levels for e4m3 scales; see the codec),
    ``rotate``: ``"none"`` or ``"hadamard"`` (keys and values are quantized in a Hadamard-rotated basis of
    the head dimension and rotated back when read; see :class:`QuantizedPrefix`), ``fit``: ``"absmax"`` or
    ``"mse"`` (how float8 scales are chosen; see the codec)."""

    bits: int = 4
    group: int = 32
    residual: int = 128
    outliers: float = 0.0
    pre_rope: bool = False
    value_group: int | None = None  # channels per value scale; None = min(group, head dim)
    low_bits: int | None = None  # mixed precision: non-salient slots get these bits (ZipCache)
    salient: float = 1.0  # share of slots at ``bits`` when ``low_bits`` is set
    tokenwise_keys: bool = False  # mixed precision: ZipCache's channel-separable token-wise keys
    scales: str = "fp16"
    sink: int = 0  # the first ``sink`` valid slots stay exact (attention sinks)
    levels: str = "uniform"
    rotate: str = "none"
    fit: str = "absmax"  # e4m3 scales: unclipped, or fitted for the smallest squared error (see the codec)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_scales(self.scales)
        check_levels(self.levels)
        check_rotate(self.rotate)
        check_fit(self.fit)
        if self.fit != "absmax" and self.scales != "e4m3":
            raise ValueError(f"fit={self.fit} chooses float8 scales: it needs scales=e4m3 (fp16 scales keep min/max)")
        if self.rotate != "none" and self.low_bits is not None:
            raise ValueError(
                f"rotate={self.rotate} is implemented for one precision tier (kivi, kvquant), not zipcache"
            )
        if self.levels != "uniform" and self.low_bits is not None:
            raise ValueError(
                f"levels={self.levels} is implemented for codes of one precision tier (kivi, kvquant), not for "
                "zipcache's two tiers"
            )
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"sink must be an integer >= 0, got {self.sink!r}")
        if self.sink and self.low_bits is not None:
            raise ValueError("exact sink slots are implemented for one precision tier (kivi, kvquant), not zipcache")
        if self.scales != "fp16" and (self.low_bits is not None or self.pre_rope or self.outliers):
            raise ValueError(
                f"scales={self.scales} is implemented for plain per-group codes (kivi); mixed precision, "
                "pre-RoPE keys and outliers use scales=fp16"
            )
        for name, value, low in (("group", self.group, 1), ("residual", self.residual, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        vg = self.value_group
        if vg is not None and (isinstance(vg, bool) or not isinstance(vg, int) or vg < 1):
            raise ValueError(f"value_group must be an integer >= 1, got {vg!r}")
        if self.low_bits is not None:
            check_bits(self.low_bits)
            if self.low_bits >= self.bits:
                raise ValueError(f"low bits ({self.low_bits}) must be fewer than the high bits ({self.bits})")
        if isinstance(self.salient, bool) or not isinstance(self.salient, (int, float)) or not 0 <= self.salient <= 1:
            raise ValueError(f"salient must be a fraction in [0, 1], got {self.salient!r}")
        if (
            isinstance(self.outliers, bool)
            or not isinstance(self.outliers, (int, float))
            or not 0 <= self.outliers < 0.5
        ):
            raise ValueError(f"outliers must be a fraction in [0, 0.5), got {self.outliers!r}")

    @property
    def direct_read(self) -> bool:
        """True when attention can read the codes as they are (post-RoPE, unrotated keys, no outliers, uniform
        levels)."""
        plain = self.levels == "uniform" and self.rotate == "none"
        return plain and not self.pre_rope and not self.outliers and self.low_bits is None

    def channels(self, head_dim: int) -> int:
        """Channels per value scale on a head of ``head_dim``."""
        return self.value_group if self.value_group is not None else min(self.group, head_dim)

    def tables(self, head_dim: int, device=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The key and value level tables (None for uniform levels): a key code stands for one of ``group``
        tokens of its channel, a value code for one of ``channels(head_dim)`` channels of its token."""
        return (
            level_table(self.levels, self.bits, self.group, device, self.scales),
            level_table(self.levels, self.bits, self.channels(head_dim), device, self.scales),
        )

    def basis(self, head_dim: int, device=None) -> torch.Tensor | None:
        """The rotation keys and values are quantized in (None: the model's own basis)."""
        return hadamard(head_dim, device) if self.rotate == "hadamard" else None

    def check_head_dim(self, head_dim: int) -> None:
        if self.rotate == "hadamard":
            check_hadamard_dim(head_dim)
        channels = self.channels(head_dim)
        if head_dim % channels:
            name = "value_group" if self.value_group is not None else "quantization group"
            raise ValueError(
                f"{name} {channels} does not divide the head dimension {head_dim} (values are quantized in "
                "groups of channels); pick a divisor of the head dimension"
            )


class Sinks(NamedTuple):
    """A prefix's exact sink slots, for attention beside its codes."""

    keys: torch.Tensor  # [B, Hg, S, D]
    values: torch.Tensor  # [B, Hg, S, D]
    valid: torch.Tensor  # [B, Hg, S]: found and still valid
    coded: torch.Tensor  # [B, Hg, length]: the prefix's validity with the sink slots taken out


def _per_head(valid: torch.Tensor | None, b: int, h: int, n: int, device: torch.device) -> torch.Tensor:
    """``[B, 1 | H, n]`` validity (None = all valid) as ``[B, H, n]``."""
    return torch.ones(b, h, n, dtype=torch.bool, device=device) if valid is None else valid.expand(b, h, n)


class QuantizedPrefix(BufferPrefix):
    """Codes of a slot group's oldest slots, in buffers that grow geometrically (capacity ``cap`` slots).

    ``buffers``, each with its slot axis at dim 2: ``key.packed [B, Hg, cap, W]``, ``key.scale`` /
    ``key.zero [B, Hg, cap / group, D]``, ``value.packed [B, Hg, cap, W]``, ``value.scale`` / ``value.zero``
    ``[B, Hg, cap, D / group]``, with outliers ``key.outlier_index`` / ``key.outlier_value``
    ``[B, Hg, cap / group, k]`` and ``value.outlier_*`` ``[B, Hg, cap, k]``; ``valid [B, 1 | Hg, cap]`` and
    ``positions [B, Hg, cap]`` mirror the dense group's metadata (absent when it has none). ``units[name]``:
    slots per entry along dim 2 (``group`` for per-group key tensors, 1 otherwise).

    Rotation (``spec.rotate = "hadamard"``): keys (after the pre-RoPE un-rotation, when there is one) and
    values are multiplied by the orthonormal Hadamard matrix of the head dimension before they are coded,
    and read-backs by it again (it is its own inverse). A channel whose entries are far larger than the
    others' (the key outliers KIVI groups per channel for) is spread over all channels, so every group's
    range is set by typical entries (QuaRot, Ashkboos et al., arXiv 2404.00456, rotates the KV cache this way
    for 4-bit). The matrix follows from the head dimension: no bytes are stored for it.

    Attention sinks (``spec.sink = S > 0``): the first ``S`` valid slots of every row and head, found as
    slots arrive (left padding is skipped), keep their exact keys and values in ``sink_keys`` /
    ``sink_values [B, Hg, S, D]`` (the cache's dtype) with their slot index in ``sink_slots [B, Hg, S]``
    (int32, -1 until found). They are left out of their key group's range, so their large magnitudes do not
    coarsen the other tokens' codes, and reads put the exact entries back (their codes stay in the packed
    buffers, unused). The first token draws a large share of attention in most LLMs (StreamingLLM, arXiv
    2309.17453); keeping it lossless is IntactKV's idea (Liu et al., arXiv 2403.01241), the "preserve first
    N" baseline of KVSink (arXiv 2508.04257). Bytes: ``S * (2 * D * itemsize + 4)`` per row and head.
    """

    anchor = "key.packed"
    sink_slots: torch.Tensor | None = None  # [B, Hg, S] int32 slot index of each exact sink slot, -1 = not yet
    sink_keys: torch.Tensor | None = None  # [B, Hg, S, D] exact (post-RoPE) keys of the sink slots
    sink_values: torch.Tensor | None = None

    def __init__(
        self, spec: QuantSpec, like: torch.Tensor, capacity: int, tracker: MemoryTracker, rope: Rope | None = None
    ) -> None:
        b, h, _, d = like.shape
        spec.check_head_dim(d)
        if spec.pre_rope and rope is None:
            raise ValueError("keys quantized before RoPE need the model's rotary frequencies")
        self.spec, self.dim, self.tracker, self.rope = spec, d, tracker, rope
        self.device, self.unit, self.length = like.device, spec.group, 0
        cap = round_up(max(capacity, spec.group), spec.group)
        self.buffers: dict[str, torch.Tensor] = {}
        self.units: dict[str, int] = {}
        w, g, device = words(d, spec.bits), spec.group, like.device
        self.channels = c = spec.channels(d)
        self.key_table, self.value_table = spec.tables(d, like.device)  # a function of the spec: never saved
        self.basis = spec.basis(d, like.device)  # likewise
        key_outliers, value_outliers = outlier_count(spec.outliers, g * d), outlier_count(spec.outliers, d)
        layout = [
            ("key.packed", w, torch.int32, 1),
            ("key.scale", d, torch.float16, g),
            ("key.zero", d, torch.float16, g),
            ("value.packed", w, torch.int32, 1),
            ("value.scale", d // c, torch.float16, 1),
            ("value.zero", d // c, torch.float16, 1),
        ]
        if spec.scales == "e4m3":  # one float8 scale per group, no zero point
            layout = [
                (name, width, E4M3 if name.endswith("scale") else dtype, unit)
                for name, width, dtype, unit in layout
                if not name.endswith("zero")
            ]
        if key_outliers:
            layout += [
                ("key.outlier_index", key_outliers, torch.int16, g),
                ("key.outlier_value", key_outliers, torch.float16, g),
            ]
            layout += [("value.outlier_index", value_outliers, torch.int16, 1)]
            layout += [("value.outlier_value", value_outliers, torch.float16, 1)]
        for name, width, dtype, unit in layout:
            self.buffers[name] = torch.zeros(b, h, cap // unit, width, dtype=dtype, device=device)
            self.units[name] = unit
        if spec.sink:
            self.sink_slots = torch.full((b, h, spec.sink), -1, dtype=torch.int32, device=device)
            self.sink_keys = like.new_zeros(b, h, spec.sink, d)
            self.sink_values = like.new_zeros(b, h, spec.sink, d)
        tracker.change(self.nbytes())

    @property
    def direct_read(self) -> bool:
        return self.spec.direct_read

    # -- bytes ------------------------------------------------------------------------------------------
    def _sink_bytes(self) -> int:
        if self.sink_slots is None:
            return 0
        return sum(t.nbytes for t in (self.sink_slots, self.sink_keys, self.sink_values))

    def nbytes(self) -> int:
        return super().nbytes() + self._sink_bytes()

    def used_bytes(self) -> int:
        return super().used_bytes() + self._sink_bytes()

    # -- reading ----------------------------------------------------------------------------------------
    def codes(self) -> tuple[Codes, Codes]:
        """Views of the used key and value codes (``N = length`` slots)."""
        used = self.used()
        return tuple(
            Codes(**{k.split(".", 1)[1]: v for k, v in used.items() if k.startswith(f"{side}.")})
            for side in ("key", "value")
        )

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``[B, Hg, length, D]`` keys and values in ``dtype`` (a fresh copy; keys quantized
        before RoPE are rotated to their positions)."""
        keys, values = self.codes()
        spec = self.spec
        k = dequantize_keys(keys, spec.bits, spec.group, self.dim, self.key_table)
        v = dequantize_values(values, spec.bits, self.channels, self.dim, self.value_table)
        if self.basis is not None:  # back from the Hadamard basis (the matrix is its own inverse)
            k, v = k @ self.basis, v @ self.basis
        if spec.pre_rope:
            k = rotate(k, self.slot_positions(), self.rope)
        k, v = k.to(dtype), v.to(dtype)
        if self.sink_slots is not None:
            self._put_sinks(k, v)
        return k, v

    def sinks(self) -> Sinks | None:
        """The exact sink slots for attention beside the codes (None without sinks)."""
        if self.sink_slots is None:
            return None
        found = self.sink_slots >= 0
        slots = self.sink_slots.long().clamp(min=0)
        b, h = self.sink_slots.shape[:2]
        valid = _per_head(self.used_valid(), b, h, self.length, self.device)
        sink_valid = found & valid.gather(-1, slots.clamp(max=max(self.length - 1, 0)))
        taken = torch.zeros(b, h, self.length + 1, dtype=torch.bool, device=self.device)
        taken.scatter_(-1, torch.where(found, slots, self.length), True)  # not found: the spare column
        return Sinks(self.sink_keys, self.sink_values, sink_valid, valid & ~taken[..., : self.length])

    def _put_sinks(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the sink slots of dequantized ``keys``/``values [B, Hg, length, D]`` with exact ones."""
        found = (self.sink_slots >= 0).unsqueeze(-1)  # [B, Hg, S, 1]
        index = self.sink_slots.long().clamp(min=0).unsqueeze(-1).expand(*self.sink_keys.shape)
        for out, exact in ((keys, self.sink_keys), (values, self.sink_values)):
            out.scatter_(2, index, torch.where(found, exact.to(out.dtype), out.gather(2, index)))

    def span(self, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``[start, end)`` dequantized (the whole prefix is dequantized, then sliced)."""
        keys, values = self.read(dtype)
        return keys[:, :, start:end], values[:, :, start:end]

    def gather(self, indices: torch.Tensor, wanted: torch.Tensor, dtype: torch.dtype, values: bool = True):
        """Slots ``indices [B, Hg, K]`` (where ``wanted``) as ``[B, Hg, K, D]`` keys and values: everything is
        dequantized, then gathered (codes are not addressable one slot at a time here)."""
        keys, vals = self.read(dtype)
        index = indices.clamp(0, self.length - 1).unsqueeze(-1).expand(*indices.shape, self.dim)
        return keys.gather(2, index), (vals.gather(2, index) if values else None)

    # -- writing ----------------------------------------------------------------------------------------
    def append(
        self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, positions: torch.Tensor | None
    ) -> None:
        """Quantize ``keys``/``values [B, Hg, m, D]`` (``m`` a multiple of ``group``; keys post-RoPE) after the
        held slots, with their validity ``[B, 1 | Hg, m]`` and positions ``[B, Hg, m]`` (None = none kept)."""
        m, spec = keys.shape[2], self.spec
        start, stop = self.length, self.length + m
        if stop > self.capacity:
            self._grow(max(stop, int(self.capacity * 1.5)))
        in_range = valid  # slots that set their key group's range: not padding, not sinks
        if self.sink_slots is not None and bool((self.sink_slots < 0).any()):
            in_range = self._take_sinks(keys, values, valid, start)
        if spec.pre_rope:
            keys = rotate(keys, -self._new_positions(m, valid, positions), self.rope)
        if self.basis is not None:
            keys, values = keys.float() @ self.basis, values.float() @ self.basis
        kc = quantize_keys(keys, spec.bits, spec.group, in_range, spec.outliers, spec.scales, self.key_table, spec.fit)
        vc = quantize_values(values, spec.bits, self.channels, spec.outliers, spec.scales, self.value_table, spec.fit)
        fresh = {f"key.{k}": v for k, v in kc.fields().items()} | {f"value.{k}": v for k, v in vc.fields().items()}
        for name, t in fresh.items():
            unit = self.units[name]
            self.buffers[name][:, :, start // unit : stop // unit] = t
        self._append_metadata(valid, positions, start, stop)
        self.length = stop

    def _take_sinks(
        self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, start: int
    ) -> torch.Tensor:
        """Record the valid slots among ``keys``/``values [B, Hg, m, D]`` (slots ``start..``) that are still
        among the first ``spec.sink`` of their row and head; returns the validity ``[B, Hg, m]`` with them
        removed (the slots that set key ranges)."""
        b, h, m, d = keys.shape
        sink = self.spec.sink
        ok = _per_head(valid, b, h, m, keys.device)
        rank = (self.sink_slots >= 0).sum(-1, keepdim=True) + ok.long().cumsum(-1) - 1  # [B, Hg, m]
        take = ok & (rank < sink)
        spot = torch.where(take, rank, sink)  # entry of the sink tables; ``sink`` = a spare column, dropped
        here = torch.arange(start, start + m, dtype=torch.int32, device=keys.device).expand(b, h, m)
        got = torch.zeros(b, h, sink + 1, dtype=torch.bool, device=keys.device).scatter(-1, spot, take)[..., :sink]
        slots = self.sink_slots.new_full((b, h, sink + 1), -1).scatter(-1, spot, here)[..., :sink]
        self.sink_slots = torch.where(got, slots, self.sink_slots)
        where = spot.unsqueeze(-1).expand(b, h, m, d)
        for name, new in (("sink_keys", keys), ("sink_values", values)):
            old = getattr(self, name)
            fresh = old.new_zeros(b, h, sink + 1, d).scatter(2, where, new.to(old.dtype))[:, :, :sink]
            setattr(self, name, torch.where(got.unsqueeze(-1), fresh, old))
        return ok & ~take

    # -- batch, saving ----------------------------------------------------------------------------------
    def map_batch(self, fn) -> None:
        super().map_batch(fn)
        if self.sink_slots is not None:
            self.sink_slots, self.sink_keys, self.sink_values = map(
                fn, (self.sink_slots, self.sink_keys, self.sink_values)
            )

    def export(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta, tensors = super().export()
        if self.sink_slots is not None:
            tensors |= {"sink.slots": self.sink_slots, "sink.key": self.sink_keys, "sink.value": self.sink_values}
        return meta, tensors

    def restore(self, tensors: dict[str, torch.Tensor], length: int) -> None:
        sinks = {k: tensors[k] for k in ("sink.slots", "sink.key", "sink.value") if k in tensors}
        if bool(sinks) != (self.sink_slots is not None) or (
            sinks and sinks["sink.slots"].shape != self.sink_slots.shape
        ):
            raise ValueError(
                f"saved slots hold {len(sinks) and sinks['sink.slots'].shape[-1]} exact sink slots; this method "
                f"keeps {self.spec.sink}"
            )
        super().restore({k: v for k, v in tensors.items() if not k.startswith("sink.")}, length)
        if sinks:
            self.tracker.change(-self._sink_bytes())
            self.sink_slots = sinks["sink.slots"].to(torch.int32)
            self.sink_keys, self.sink_values = sinks["sink.key"], sinks["sink.value"]
            self.tracker.change(self._sink_bytes())


class QuantizedStore(PrefixStore):
    """A dense store whose slots beyond the newest ``spec.residual`` are held as codes (module docstring)."""

    prefix_class = QuantizedPrefix

    def __init__(
        self, spec: QuantSpec, tracker: MemoryTracker | None = None, rope: Rope | None = None, growth: float = 1.5
    ) -> None:
        super().__init__(tracker, growth)
        self.spec, self.rope = spec, rope
        self.kept, self.unit = spec.residual, spec.group

    def _new_prefix(self, g: SlotGroup) -> QuantizedPrefix:
        return self.prefix_class(self.spec, g.keys, self._total - self.spec.residual, self.tracker, self.rope)

    def _restore_prefix(self, meta: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> QuantizedPrefix:
        n = meta["length"]
        if n % self.spec.group:
            raise ValueError(f"saved quantized slots ({n}) do not fit this method's groups of {self.spec.group}")
        b, h = tensors["key.packed"].shape[:2]
        like = torch.empty(b, h, 0, meta["dim"], device=device)
        prefix = QuantizedPrefix(self.spec, like, n, self.tracker, self.rope)
        prefix.restore(tensors, n)
        return prefix

    def _first_group(self, keys, values) -> None:
        self.spec.check_head_dim(keys.shape[-1])
        super()._first_group(keys, values)
