"""Attention at remapped positions: the shared machinery of window-extension methods.

Keys are cached post-RoPE at their true positions (one position per token, kept by the store, so eviction
and remapping compose). A method that changes the relative distance a query sees to a key does it by
rotating: RoPE turns a vector at position ``p`` by angle ``p * theta_i`` in each plane ``i``, rotations in a
plane compose, so a post-RoPE key at ``p`` rotated by ``p' - p`` is exactly the key RoPE would have produced
at ``p'`` (computed here in fp32 with angles in fp64). Only relative distances matter to attention, so every
remap is written as a set of disjoint *branches*: in its region of (query, key) pairs, a branch moves
queries and keys to new positions; the logits of all branches are merged into one softmax per query (the
"merge per query" of Self-Extend). Nothing is stored at the new positions: rotated keys live for one forward
(temporary memory of one key copy per rotating branch), so ``kv_bytes`` is unchanged.

Pure tensor code. Shapes: ``B`` batch, ``H`` KV heads, ``G`` query heads per KV head, ``Tq`` queries of
this forward (the newest ``Tq`` slots), ``S`` slots, ``D`` head dim, ``Hv`` in ``{1, H}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOGITS_BUDGET = 2**21  # reference path: fp32 logits per block of queries (8 MiB), temporary memory O(chunk * S)
FUSED_QUERIES = 256  # fused path: queries per block (its masks are O(block * S))


@dataclass(frozen=True)
class Rope:
    """A model's rotary frequencies: ``inv_freq [R/2]`` (fp32). The first ``R`` dims of every head are
    rotated, in the ``rotate_half`` layout transformers uses (planes ``(i, i + R/2)``)."""

    inv_freq: torch.Tensor

    @property
    def dim(self) -> int:
        return 2 * self.inv_freq.numel()


def rotate(x: torch.Tensor, shift: torch.Tensor, rope: Rope) -> torch.Tensor:
    """``x [..., T, D]`` (post-RoPE) moved by ``shift`` positions (int tensor broadcastable to
    ``x.shape[:-1]``): RoPE's rotation by ``shift * theta``, without RoPE's attention scaling (a post-RoPE
    vector already carries it). Returns ``x``'s dtype."""
    r = rope.dim
    if r > x.shape[-1]:
        raise ValueError(f"rotary dim {r} exceeds the head dim {x.shape[-1]}")
    angles = shift.to(torch.float64)[..., None] * rope.inv_freq.to(x.device, torch.float64)
    cos, sin = angles.cos().float(), angles.sin().float()
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    part = x[..., :r].float()
    half = r // 2
    turned = torch.cat([-part[..., half:], part[..., :half]], -1)
    out = part * cos + turned * sin
    if r < x.shape[-1]:
        out = torch.cat([out, x[..., r:].float()], -1)
    return out.to(x.dtype)


class Region:
    """A set of (query, key) pairs: :meth:`contains` decides each pair; :meth:`span` bounds the key
    positions any query in ``[qmin, qmax]`` may pair with (so the fast path reads only those keys)."""

    def contains(self, qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        """``qp [B, 1, c, 1]``, ``kp [B, Hv, 1, S]`` -> bool ``[B, Hv, c, S]``."""
        raise NotImplementedError

    def span(self, qmin: int, qmax: int) -> tuple[int, int]:
        """Inclusive key-position bounds ``(lo, hi)`` (empty when ``hi < lo``)."""
        raise NotImplementedError


def _per_row(value: int | torch.Tensor, like: torch.Tensor) -> int | torch.Tensor:
    """An int, or a ``[B]`` tensor shaped to broadcast against ``like [B, ...]``."""
    if isinstance(value, int):
        return value
    return value.view(-1, *([1] * (like.dim() - 1)))


def _bounds(value: int | torch.Tensor) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value.min()), int(value.max()))


@dataclass(frozen=True, eq=False)
class Near(Region):
    """Pairs closer than ``window`` positions (an int, or one per row ``[B]``)."""

    window: int | torch.Tensor

    def contains(self, qp, kp):
        return (qp - kp) < _per_row(self.window, qp)

    def span(self, qmin, qmax):
        return qmin - _bounds(self.window)[1] + 1, qmax


@dataclass(frozen=True, eq=False)
class Far(Region):
    """Pairs at least ``window`` positions apart (an int, or one per row ``[B]``), with keys before position
    ``below`` (None = any key)."""

    window: int | torch.Tensor
    below: int | None = None

    def contains(self, qp, kp):
        out = (qp - kp) >= _per_row(self.window, qp)
        return out if self.below is None else out & (kp < self.below)

    def span(self, qmin, qmax):
        hi = qmax - _bounds(self.window)[0]
        return 0, hi if self.below is None else min(hi, self.below - 1)


@dataclass
class Branch:
    """Where and how one part of a remap applies: in ``region`` (branches of one remap are disjoint; pairs
    no branch claims are not attended), queries move by ``q_shift [B, Tq]`` and keys by
    ``k_shift [B, Hv, S]`` positions (None = unmoved)."""

    region: Region
    q_shift: torch.Tensor | None = None
    k_shift: torch.Tensor | None = None


def remapped_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    branches: list[Branch],
    rope: Rope,
    scaling: float,
    backend: str = "auto",
    stats: dict | None = None,
) -> torch.Tensor:
    """Causal attention of ``queries [B, Hq, Tq, D]`` over ``keys``/``values [B, H, S, D]`` with each
    branch's positions in its region; returns ``[B, Hq, Tq, D]`` in the queries' dtype.

    ``valid [B, Hv, S]``: False slots are never attended; ``q_pos [B, Tq]`` / ``k_pos [B, Hv, S]``: true
    positions, non-decreasing along slots (stores keep slots in token order). A query with no key to attend
    (a padding slot) gets a zero output, never NaN.

    ``backend``: ``"reference"`` materialises every branch's logits over all slots and merges them in one
    softmax (the definition); ``"fused"`` attends branch by branch over only the slots the branch can reach
    (:meth:`Region.span`), with PyTorch's CPU flash kernel returning each part's log-sum-exp, and merges
    the parts by their log-sum-exps (exact up to float rounding); ``"auto"``: fused on CPU, reference elsewhere.
    ``stats``: when given, ``stats["max_distance"]`` is set to the largest relative distance attended.
    """
    if backend == "auto":
        backend = "fused" if queries.device.type == "cpu" and _CPU_FLASH is not None else "reference"
    if backend not in ("reference", "fused"):
        raise ValueError(f"unknown backend {backend!r}; expected auto, reference or fused")
    moved = [_moved(queries, keys, br, rope) for br in branches]
    if stats is not None:
        stats["max_distance"] = _max_distance(q_pos, k_pos, valid, branches, keys.shape[2])
    run = _fused if backend == "fused" else _reference
    return run(queries, values, valid, q_pos, k_pos, branches, moved, scaling)


def _reference(queries, values, valid, q_pos, k_pos, branches, moved, scaling):
    b, hq, tq, d = queries.shape
    h, s = values.shape[1], values.shape[2]
    g = hq // h
    slot = torch.arange(s, device=values.device)
    out = queries.new_empty(b, h, g, tq, d)
    v32 = values.float()
    chunk = max(1, LOGITS_BUDGET // max(1, b * hq * s))
    kp = k_pos[:, :, None, :]  # [B, Hv, 1, S]
    for start in range(0, tq, chunk):
        stop = min(tq, start + chunk)
        qp = q_pos[:, None, start:stop, None]  # [B, 1, c, 1]
        causal = slot.view(1, 1, 1, s) <= (slot[s - tq + start : s - tq + stop]).view(1, 1, -1, 1)
        allowed = causal & valid[:, :, None, :]  # [B, Hv, c, S]
        logits = None
        for br, (q_b, k_b) in zip(branches, moved, strict=True):
            region = (br.region.contains(qp, kp) & allowed).unsqueeze(2)  # [B, Hv, 1, c, S]
            part = torch.einsum("bhgqd,bhsd->bhgqs", q_b[:, :, :, start:stop], k_b) * scaling
            logits = part.masked_fill(~region, float("-inf")) if logits is None else torch.where(region, part, logits)
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a row with no visible key -> zeros
        out[:, :, :, start:stop] = torch.einsum("bhgqs,bhsd->bhgqd", probs, v32).to(out.dtype)
    return out.view(b, hq, tq, d)


def _fused(queries, values, valid, q_pos, k_pos, branches, moved, scaling):
    """Per block of queries and per branch, the CPU flash kernel over the branch's slots only. The G query
    heads of a KV head are folded into the kernel's query axis (``[B, H, G * c, D]``), so each KV head is
    read once and keys and values are never repeated per query head."""
    b, hq, tq, d = queries.shape
    h, s = values.shape[1], values.shape[2]
    g = hq // h
    out = queries.new_empty(b, h, g, tq, d)
    v32 = values.float()
    slot = torch.arange(s, device=values.device)
    first_pos = k_pos.masked_fill(~valid, torch.iinfo(k_pos.dtype).max)
    last_pos = k_pos.masked_fill(~valid, -1)
    for start in range(0, tq, FUSED_QUERIES):
        stop = min(tq, start + FUSED_QUERIES)
        c = stop - start
        qp = q_pos[:, None, start:stop, None]
        qmin, qmax = int(q_pos[:, start:stop].min()), int(q_pos[:, start:stop].max())
        q_slot_end = s - tq + stop  # keys beyond the block's last slot are in no query's past
        parts = []
        for br, (q_b, k_b) in zip(branches, moved, strict=True):
            lo_pos, hi_pos = br.region.span(qmin, qmax)
            lo, hi = (0, 0) if hi_pos < lo_pos else _slot_range(first_pos, last_pos, lo_pos, hi_pos, q_slot_end)
            if hi <= lo:
                continue
            causal = slot[lo:hi].view(1, 1, 1, -1) <= slot[s - tq + start : q_slot_end].view(1, 1, -1, 1)
            region = br.region.contains(qp, k_pos[:, :, None, lo:hi]) & causal & valid[:, :, None, lo:hi]
            folded = region.unsqueeze(2).expand(-1, -1, g, -1, -1).reshape(b, region.shape[1], g * c, hi - lo)
            mask = torch.zeros(folded.shape, dtype=torch.float32, device=folded.device).masked_fill_(
                ~folded, float("-inf")
            )
            q_fold = q_b[:, :, :, start:stop].reshape(b, h, g * c, d)
            o, lse = _CPU_FLASH(q_fold, k_b[:, :, lo:hi], v32[:, :, lo:hi], 0.0, False, attn_mask=mask, scale=scaling)
            lse = lse.masked_fill(~folded.any(-1), float("-inf"))  # the kernel reports 0 for an empty row
            parts.append((o, lse))
        out[:, :, :, start:stop] = _merge(parts, (b, h, g * c, d), queries.device).view(b, h, g, c, d).to(out.dtype)
    return out.view(b, hq, tq, d)


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]], shape, device) -> torch.Tensor:
    """Outputs of attention over disjoint key sets combined by their log-sum-exps (rows with no key: 0)."""
    if not parts:
        return torch.zeros(shape, device=device)
    total = torch.stack([lse for _, lse in parts]).logsumexp(0)  # [B, Hq, c]
    out = torch.zeros(shape, device=device)
    for o, lse in parts:
        weight = (lse - total).exp().nan_to_num_(0.0)  # -inf - -inf on empty rows -> 0
        out += weight.unsqueeze(-1) * o.nan_to_num(0.0)
    return out


def _slot_range(first_pos, last_pos, lo_pos: int, hi_pos: int, end: int) -> tuple[int, int]:
    """Slots ``[lo, hi)`` holding every valid key whose position is in ``[lo_pos, hi_pos]`` in any row or
    head (positions are non-decreasing along slots)."""
    lo_mask = last_pos >= lo_pos  # slots at or after the first key reaching lo_pos
    hi_mask = first_pos <= hi_pos
    if not bool(lo_mask.any()) or not bool(hi_mask.any()):
        return 0, 0
    s = first_pos.shape[-1]
    lo = int(lo_mask.int().argmax(-1).min())
    hi = s - int(hi_mask.flip(-1).int().argmax(-1).min())
    return lo, min(hi, end)


def _max_distance(q_pos, k_pos, valid, branches, s: int) -> int:
    """Largest relative distance any attended pair is seen at (for checks and reports; O(Tq * S) work)."""
    best, tq = 0, q_pos.shape[1]
    slot = torch.arange(s, device=q_pos.device)
    kp = k_pos[:, :, None, :]
    for start in range(0, tq, FUSED_QUERIES):
        stop = min(tq, start + FUSED_QUERIES)
        causal = slot.view(1, 1, 1, s) <= slot[s - tq + start : s - tq + stop].view(1, 1, -1, 1)
        qp = q_pos[:, None, start:stop, None]
        for br in branches:
            region = br.region.contains(qp, kp) & causal & valid[:, :, None, :]
            qn = qp if br.q_shift is None else qp + br.q_shift[:, None, start:stop, None]
            kn = kp if br.k_shift is None else kp + br.k_shift[:, :, None, :]
            best = max(best, int((qn - kn).masked_fill(~region, -1).max()))
    return best


def _moved(queries: torch.Tensor, keys: torch.Tensor, br: Branch, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """A branch's queries ``[B, H, G, Tq, D]`` and keys ``[B, H, S, D]`` (fp32) at its positions."""
    b, hq, tq, d = queries.shape
    h = keys.shape[1]
    q = queries if br.q_shift is None else rotate(queries.float(), br.q_shift[:, None, :], rope)
    k = keys if br.k_shift is None else rotate(keys.float(), br.k_shift.expand(b, h, -1), rope)
    return q.float().view(b, h, hq // h, tq, d), k.float()


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
