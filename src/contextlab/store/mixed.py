"""Mixed-precision quantized store (ZipCache): salient tokens keep more bits than the rest.

ZipCache (He et al., "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token
Identification", arXiv 2405.14256) ranks tokens by their *normalized* attention score: the attention a
token received summed over the queries that could see it, divided by how many could (under a causal mask an
early token is seen by more queries, so plain accumulated attention favours it). To stay compatible with
fused attention, the score comes from a few *probe* queries: the most recent ones and a random sample.
Salient tokens are quantized at ``high`` bits, the others at ``low`` bits, with a channel-separable
token-wise quantizer for keys: each channel is divided by ``sqrt(max |k|)`` over its group of tokens, and
each token is then quantized over all its channels.

Here, after every forward (:meth:`MixedStore.settle`), the store scores its full-precision slots from that
forward's probe queries (prefill: the last 5% and a random 5% of the queries, at least ``MIN_PROBES`` each,
over every slot; decode: the new query over the full-precision window only, a cheaper local proxy) and
keeps a running normalized score per slot. When a group of slots leaves the full-precision window, the
``salient`` fraction with the highest scores of that batch of slots goes to the high-precision tier. An
eviction resets the scores of the slots it keeps (they are scored again by the same forward's probes).
"""

from __future__ import annotations

import math

import torch

from contextlab.methods.positions import Rope
from contextlab.store.codec import Codes, dequantize_keys, dequantize_values, quantize_keys, quantize_values, words
from contextlab.store.dense import MemoryTracker, SlotGroup
from contextlab.store.prefix import round_up
from contextlab.store.quantized import QuantizedPrefix, QuantizedStore, QuantSpec

PROBE_SHARE = 0.05  # recent and random probes, each this share of a forward's queries (ZipCache)
MIN_PROBES = 32
PROBE_BLOCK = 64  # probes scored at a time (bounds the [probes x slots] logits)


class MixedPrefix(QuantizedPrefix):
    """Quantized slots in two tiers of bits. Slot table (``buffers``): ``norm [B, Hg, cap / group, D]``
    float16 channel normalizers, ``salient [B, Hg, cap]`` bool, validity and positions. Each tier
    (``tiers["high"|"low"]``, in slot order): ``key.packed [B, Hg, n, W]``, ``key.scale``/``key.zero``
    ``[B, Hg, n, 1]``, ``value.packed``, ``value.scale``/``value.zero [B, Hg, n, D / group]``."""

    anchor = "salient"

    def __init__(
        self, spec: QuantSpec, like: torch.Tensor, capacity: int, tracker: MemoryTracker, rope: Rope | None = None
    ) -> None:
        b, h, _, d = like.shape
        spec.check_head_dim(d)
        self.spec, self.dim, self.tracker, self.rope = spec, d, tracker, rope
        self.channels = c = spec.channels(d)
        self.device, self.unit, self.length = like.device, spec.group, 0
        cap = round_up(max(capacity, spec.group), spec.group)
        device = like.device
        self.buffers = {"salient": torch.zeros(b, h, cap, dtype=torch.bool, device=device)}
        self.units = {"salient": 1}
        if spec.tokenwise_keys:
            self.buffers["norm"] = torch.zeros(b, h, cap // spec.group, d, dtype=torch.float16, device=device)
            self.units["norm"] = spec.group
        # Token-wise keys: one scale and zero per token; per-channel keys: per channel per group of the
        # tier's own tokens (a tier then takes whole groups of tokens).
        self.key_unit = 1 if spec.tokenwise_keys else spec.group
        key_width = 1 if spec.tokenwise_keys else d
        share = {"high": spec.salient, "low": 1 - spec.salient}
        self.tiers: dict[str, dict[str, torch.Tensor]] = {}
        self.tier_units = {"key.scale": self.key_unit, "key.zero": self.key_unit}
        self.tier_length = {"high": 0, "low": 0}
        for tier, bits in (("high", spec.bits), ("low", spec.low_bits)):
            n = round_up(max(1, math.ceil(cap * share[tier])), spec.group)
            self.tiers[tier] = {
                "key.packed": torch.zeros(b, h, n, words(d, bits), dtype=torch.int32, device=device),
                "key.scale": torch.zeros(b, h, n // self.key_unit, key_width, dtype=torch.float16, device=device),
                "key.zero": torch.zeros(b, h, n // self.key_unit, key_width, dtype=torch.float16, device=device),
                "value.packed": torch.zeros(b, h, n, words(d, bits), dtype=torch.int32, device=device),
                "value.scale": torch.zeros(b, h, n, d // c, dtype=torch.float16, device=device),
                "value.zero": torch.zeros(b, h, n, d // c, dtype=torch.float16, device=device),
            }
        tracker.change(self.nbytes())

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.nbytes for tier in self.tiers.values() for t in tier.values())

    def used_bytes(self) -> int:
        per_entry = sum(
            t.nbytes // t.shape[2] * (self.tier_length[name] // self.tier_units.get(k, 1))
            for name, tier in self.tiers.items()
            for k, t in tier.items()
        )
        return super().used_bytes() + per_entry

    def codes(self):
        raise RuntimeError("mixed-precision slots are read through a dequantized copy")

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, n, d = *self.buffers["salient"].shape[:2], self.length, self.dim
        salient = self.buffers["salient"][:, :, :n, None].expand(b, h, n, d)  # [B, Hg, N, D]
        keys = torch.empty(b, h, n, d, device=salient.device)
        values = torch.empty_like(keys)
        for tier, bits in (("high", self.spec.bits), ("low", self.spec.low_bits)):
            k, v = self._tier_read(tier, bits)
            where = salient if tier == "high" else ~salient
            keys.masked_scatter_(where, k)  # each (row, head) has the same tier count, in slot order
            values.masked_scatter_(where, v)
        if self.spec.tokenwise_keys:
            norm = self.buffers["norm"][:, :, : n // self.spec.group].float()
            keys *= norm.repeat_interleave(self.spec.group, dim=2)
        return keys.to(dtype), values.to(dtype)

    def append_scored(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        valid: torch.Tensor | None,
        positions: torch.Tensor | None,
        scores: torch.Tensor,
    ) -> None:
        """Quantize ``m`` slots (a multiple of ``group``): the ``salient`` share with the highest ``scores
        [B, Hg, m]`` at high bits, the rest at low bits."""
        spec, (b, h, m, d) = self.spec, keys.shape
        start, stop = self.length, self.length + m
        if stop > self.capacity:
            self._grow(max(stop, int(self.capacity * 1.5)))
        if spec.tokenwise_keys:
            norm = _channel_norm(keys, spec.group, valid)  # [B, Hg, m / group, D]
            self.buffers["norm"][:, :, start // spec.group : stop // spec.group] = norm
            scaled = keys.float() / norm.float().repeat_interleave(spec.group, dim=2)
        else:
            scaled = keys.float()
        high = round(spec.salient * m / self.key_unit) * self.key_unit
        masked = scores.float() if valid is None else scores.float().masked_fill(~valid, float("-inf"))
        order = masked.topk(high, dim=-1).indices.sort(-1).values  # [B, Hg, high]
        salient = torch.zeros(b, h, m, dtype=torch.bool, device=keys.device).scatter(-1, order, True)
        self.buffers["salient"][:, :, start:stop] = salient
        rows = torch.ones(b, h, m, dtype=torch.bool, device=keys.device) if valid is None else valid.expand(b, h, m)
        for tier, bits, pick in (("high", spec.bits, salient), ("low", spec.low_bits, ~salient)):
            count = high if tier == "high" else m - high
            k = scaled[pick[..., None].expand(b, h, m, d)].view(b, h, count, d)
            v = values[pick[..., None].expand(b, h, m, d)].view(b, h, count, d)
            if spec.tokenwise_keys:
                key_codes = quantize_values(k, bits, d)
            else:
                key_codes = quantize_keys(k, bits, spec.group, rows[pick].view(b, h, count))
            self._tier_append(tier, key_codes, quantize_values(v, bits, self.channels))
        self._append_metadata(valid, positions, start, stop)
        self.length = stop

    def map_batch(self, fn) -> None:
        super().map_batch(fn)
        self.tiers = {name: {k: fn(t) for k, t in tier.items()} for name, tier in self.tiers.items()}

    def export(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta, tensors = super().export()
        for name, tier in self.tiers.items():
            n = self.tier_length[name]
            tensors |= {f"{name}.{k}": t[:, :, : n // self._unit(k)].contiguous() for k, t in tier.items()}
        return {**meta, "tiers": dict(self.tier_length)}, tensors

    def restore_mixed(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        for name in self.tiers:
            mine = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
            n = meta["tiers"][name]
            self._tier_reserve(name, n)
            for k, t in mine.items():
                self.tiers[name][k][:, :, : n // self._unit(k)] = t
            self.tier_length[name] = n
        slot_table = {k: v for k, v in tensors.items() if not k.startswith(("high.", "low."))}
        super().restore(slot_table, meta["length"])

    # -- internals --------------------------------------------------------------------------------------
    def _tier_read(self, tier: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, n = self.tiers[tier], self.tier_length[tier]
        g = n // self.key_unit
        k = Codes(t["key.packed"][:, :, :n], t["key.scale"][:, :, :g], t["key.zero"][:, :, :g])
        v = Codes(t["value.packed"][:, :, :n], t["value.scale"][:, :, :n], t["value.zero"][:, :, :n])
        values = dequantize_values(v, bits, self.channels, self.dim)
        if self.spec.tokenwise_keys:
            return dequantize_values(k, bits, self.dim, self.dim), values
        return dequantize_keys(k, bits, self.spec.group, self.dim), values

    def _tier_append(self, tier: str, keys, values) -> None:
        n = keys.packed.shape[2]
        start = self.tier_length[tier]
        self._tier_reserve(tier, start + n)
        fresh = {f"key.{k}": v for k, v in keys.fields().items()}
        fresh |= {f"value.{k}": v for k, v in values.fields().items()}
        for name, t in fresh.items():
            unit = self._unit(name)
            self.tiers[tier][name][:, :, start // unit : (start + n) // unit] = t
        self.tier_length[tier] = start + n

    def _unit(self, name: str) -> int:
        """Tier entries per row of buffer ``name`` along dim 2 (per-channel key scales: one per group)."""
        return self.tier_units.get(name, 1)

    def _tier_reserve(self, tier: str, entries: int) -> None:
        buffers = self.tiers[tier]
        have = buffers["key.packed"].shape[2]
        if entries <= have:
            return
        size = round_up(max(entries, int(have * 1.5)), self.spec.group)
        old = sum(t.nbytes for t in buffers.values())
        grown = {}
        for name, t in buffers.items():
            out = t.new_zeros(*t.shape[:2], size // self._unit(name), *t.shape[3:])
            out[:, :, : t.shape[2]] = t
            grown[name] = out
        self.tiers[tier] = grown
        self.tracker.change(sum(t.nbytes for t in grown.values()))
        self.tracker.change(-old)


class MixedStore(QuantizedStore):
    """A quantized store whose prefix is a :class:`MixedPrefix` and which scores its full-precision slots
    from every forward's probe queries (module docstring)."""

    prefix_class = MixedPrefix

    def __init__(self, spec: QuantSpec, tracker: MemoryTracker | None = None, rope: Rope | None = None) -> None:
        super().__init__(spec, tracker, rope)
        self.scores: list[torch.Tensor] = []  # per group: [B, Hg, tail] summed normalized attention
        self.seen: list[torch.Tensor] = []  # per group: [B, 1, tail] probes that could see each slot

    def settle(self, queries: torch.Tensor | None = None, scaling: float | None = None) -> None:
        if queries is not None:
            self._observe(queries, scaling)
        super().settle()

    def keep(self, indices, kept, headroom: int = 0, shrink: bool = True) -> None:
        self._set_scores([], [])  # the kept slots are scored again by this forward's probes
        super().keep(indices, kept, headroom, shrink)

    def map_batch(self, fn) -> None:
        super().map_batch(fn)
        self._set_scores([fn(t) for t in self.scores], [fn(t) for t in self.seen])

    def crop(self, count: int) -> None:
        super().crop(count)
        keep = [t.shape[2] - count for t in self.scores]
        self._set_scores(
            [t[:, :, :n].clone() for t, n in zip(self.scores, keep, strict=True)],
            [t[:, :, :n].clone() for t, n in zip(self.seen, keep, strict=True)],
        )

    def clear(self) -> None:
        super().clear()
        self._set_scores([], [])

    def score_bytes(self) -> int:
        """Bytes of the running scores of the full-precision slots (counted as store metadata)."""
        return sum(t.nbytes for t in (*self.scores, *self.seen))

    def nbytes(self) -> int:
        return super().nbytes() + self.score_bytes()

    def used_bytes(self) -> int:
        return super().used_bytes() + self.score_bytes()

    def export(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta, tensors = super().export()
        for i, (scores, seen) in enumerate(zip(self.scores, self.seen, strict=True)):
            tensors[f"scores.{i}"], tensors[f"seen.{i}"] = scores.clone(), seen.clone()
        return {**meta, "scored": len(self.scores)}, tensors

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor], room: int = 0) -> None:
        slots = {k: v for k, v in tensors.items() if not k.startswith(("scores.", "seen."))}
        super().restore(meta, slots, room)
        n = meta.get("scored", 0)
        self._set_scores([tensors[f"scores.{i}"] for i in range(n)], [tensors[f"seen.{i}"] for i in range(n)])

    def _set_scores(self, scores: list[torch.Tensor], seen: list[torch.Tensor]) -> None:
        before = self.score_bytes()
        self.scores, self.seen = scores, seen
        self.tracker.change(self.score_bytes() - before)

    # -- internals --------------------------------------------------------------------------------------
    def _observe(self, queries: torch.Tensor, scaling: float) -> None:
        """Add this forward's normalized attention to every group's full-precision slots."""
        b, hq, tq, d = queries.shape
        h = self.num_heads
        by_kv_head = queries.view(b, h, hq // h, tq, d)  # [B, H, G, Tq, D]
        for i, g in enumerate(self.groups):
            heads = slice(None) if g.heads is None else g.heads
            q = by_kv_head[:, heads]  # [B, Hg, G, Tq, D]
            summed, seen = _probe_attention(g, q, scaling, local=tq == 1)
            scores, counts = self._aligned(i, g)
            scores += summed[:, :, -g.tail :]
            counts += seen[:, :, -g.tail :]
            self._store_scores(i, scores, counts)

    def _aligned(self, i: int, g: SlotGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of group ``i``'s running scores and counts, zero-extended to its full-precision slots."""
        b, device = g.keys.shape[0], g.keys.device
        scores = torch.zeros(b, g.num_heads, g.tail, device=device)
        counts = torch.zeros(b, 1, g.tail, device=device)
        if i < len(self.scores) and self.scores[i].shape[2] <= g.tail:
            old = self.scores[i].shape[2]
            scores[:, :, :old], counts[:, :, :old] = self.scores[i], self.seen[i]
        return scores, counts

    def _store_scores(self, i: int, scores: torch.Tensor, counts: torch.Tensor) -> None:
        all_scores, all_seen = list(self.scores), list(self.seen)
        while len(all_scores) <= i:
            all_scores.append(scores[:, :, :0])
            all_seen.append(counts[:, :, :0])
        all_scores[i], all_seen[i] = scores, counts
        self._set_scores(all_scores, all_seen)

    def _encode(self, g: SlotGroup, count: int, valid: torch.Tensor | None, positions: torch.Tensor | None) -> None:
        scores = self._normalized(self.groups.index(g), g)[:, :, :count]
        g.prefix.append_scored(g.keys[:, :, :count], g.values[:, :, :count], valid, positions, scores)

    def _flush(self, g: SlotGroup, count: int) -> None:
        super()._flush(g, count)
        i = self.groups.index(g)
        if i < len(self.scores):
            self._store_scores(i, self.scores[i][:, :, count:].clone(), self.seen[i][:, :, count:].clone())

    def _normalized(self, i: int, g: SlotGroup) -> torch.Tensor:
        """``[B, Hg, tail]`` normalized attention of the full-precision slots (0 where never observed)."""
        if i >= len(self.scores) or self.scores[i].shape[2] != g.tail:
            return torch.zeros(g.keys.shape[0], g.num_heads, g.tail, device=g.keys.device)
        return self.scores[i] / self.seen[i].clamp(min=1)

    def _restore_prefix(self, meta: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> MixedPrefix:
        b, h = tensors["salient"].shape[:2]
        like = torch.empty(b, h, 0, meta["dim"], device=device)
        prefix = MixedPrefix(self.spec, like, meta["length"], self.tracker, self.rope)
        prefix.restore_mixed(tensors, meta)
        return prefix


def _channel_norm(keys: torch.Tensor, group: int, valid: torch.Tensor | None) -> torch.Tensor:
    """``[B, H, N / group, D]`` float16 ``sqrt(max |k|)`` per channel over each group of tokens (1 where a
    channel is all zero or no token is valid), ZipCache's channel-separable normalizer."""
    b, h, n, d = keys.shape
    magnitude = keys.float().abs().reshape(b, h, n // group, group, d)
    if valid is not None:
        magnitude = magnitude.masked_fill(~valid.reshape(b, valid.shape[1], n // group, group, 1), 0.0)
    norm = magnitude.amax(3).sqrt()
    return torch.where(norm > 0, norm, 1.0).to(torch.float16)


def _probe_attention(g: SlotGroup, q: torch.Tensor, scaling: float, local: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention received by each slot of ``g`` from probe queries ``q [B, Hg, G, Tq, D]`` (the newest Tq
    slots), summed over query heads and probes ``[B, Hg, S]``, and how many probes could see each slot
    ``[B, 1, S]``. ``local``: score over the full-precision slots only (decode)."""
    b, hg, groups, tq, _ = q.shape
    if local:
        keys = g.keys[:, :, : g.tail].float()
        valid = None if g.valid is None else g.valid[:, :, : g.tail]
    else:
        keys = g.used()[0].float()
        valid = g.used_valid()
    s = keys.shape[2]
    probes = _probe_rows(tq, q.device)  # [P] rows of this forward
    summed = torch.zeros(b, hg, s, device=q.device)
    seen = torch.zeros(b, 1, s, device=q.device)
    for block in probes.split(PROBE_BLOCK):
        rows = q[:, :, :, block].float()  # [B, Hg, G, P, D]
        logits = torch.einsum("bhgpd,bhsd->bhgps", rows, keys) * scaling  # [B, Hg, G, P, S]
        column = (s - tq + block).view(1, 1, 1, -1, 1)
        visible = torch.arange(s, device=q.device).view(1, 1, 1, 1, -1) <= column  # causal
        if valid is not None:
            visible = visible & valid[:, :, None, None, :]
        probs = logits.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
        summed += probs.sum((2, 3))
        seen += visible[:, :1, 0].sum(2, dtype=torch.float32)
    return summed / groups, seen


def _probe_rows(tq: int, device) -> torch.Tensor:
    """Probe queries of a forward of ``tq`` queries: the most recent and a seeded random sample (all when
    that would be most of them)."""
    share = max(MIN_PROBES, math.ceil(PROBE_SHARE * tq))
    if tq <= 2 * share:
        return torch.arange(tq, device=device)
    recent = torch.arange(tq - share, tq)
    sample = torch.randperm(tq - share, generator=torch.Generator().manual_seed(tq))[:share].sort().values
    return torch.cat([sample, recent]).to(device)
