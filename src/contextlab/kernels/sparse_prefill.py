"""Sparse prefill attention: each query head attends to a structured subset of the causal mask.

MInference 1.0 (Jiang et al., 2024, arXiv 2407.02490) finds three recurring shapes in long-prompt attention
maps and computes only them: *A-shape* (the first tokens and a local band), *vertical-slash* (a few key
columns every query reads, and a few diagonals: fixed distances back), and *block-sparse* (a few blocks of
the map per block row). DuoAttention's streaming heads (Xiao et al., 2024, arXiv 2410.10819) read attention
sinks and a recent window: the A-shape again. One per-head mask expresses them all
(:class:`PrefillPattern`): key ``k`` is visible to the query at position ``p`` when ``k <= p`` and

    dense[h]  or  k < sink[h]  or  p - k < window[h]  or  vertical[h, k]  or  slash[h, p - k]
    or  blocks[h, p // block, k // block]

Ways to compute it, equal up to float rounding:

- :func:`reference_prefill`: the mask drawn token by token and handed to SDPA, a chunk of queries at a
  time (the correctness reference; no faster than dense).
- :func:`flex_prefill`: ``torch.nn.attention.flex_attention`` with a block mask built from the pattern at
  block level (:func:`active_blocks`), so inactive blocks are never computed. Compiled (``torch.compile``)
  when possible, which is where the speed comes from; eager flex attention materializes the scores and is
  for small shapes only.
- :func:`sparse_prefill` (what the methods call) routes each head (:func:`head_routes`): dense heads to
  causal SDPA (:func:`causal_prefill`), heads that read only sinks and a window to :func:`band_prefill`
  (each block of queries reads the sinks and the keys its band spans: SDPA's speed on a short band), and the
  rest to compiled flex attention, or the reference where it cannot be compiled.

The indices are estimated online from the prompt itself (:func:`estimate_vertical_slash`,
:func:`estimate_blocks`), as MInference does with the last queries.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch

FLEX_BLOCK = 128  # flex attention's tile along queries and keys


@dataclass
class PrefillPattern:
    """Which keys each query head reads during prefill (module docstring). ``dense``, ``sink``, ``window``:
    ``[H]``; ``vertical``/``slash``: ``[H, S]`` bool or None (columns, and distances back, always read);
    ``blocks``: ``[H, ceil(S / block), ceil(S / block)]`` bool or None. ``S`` is the key length the
    pattern was made for."""

    dense: torch.Tensor
    sink: torch.Tensor
    window: torch.Tensor
    vertical: torch.Tensor | None = None
    slash: torch.Tensor | None = None
    blocks: torch.Tensor | None = None
    block: int = 64

    @property
    def heads(self) -> int:
        return self.dense.shape[0]

    def keeping(self, heads: torch.Tensor) -> PrefillPattern:
        """This pattern for the query heads ``heads`` (indices); every other head reads nothing."""
        keep = torch.zeros_like(self.dense)
        keep[heads.to(self.dense.device)] = True

        def only(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t & keep.view(-1, *([1] * (t.dim() - 1)))

        zero = torch.zeros_like(self.sink)
        return PrefillPattern(
            self.dense & keep,
            torch.where(keep, self.sink, zero),
            torch.where(keep, self.window, zero),
            only(self.vertical),
            only(self.slash),
            only(self.blocks),
            self.block,
        )

    @classmethod
    def full(cls, heads: int, device=None) -> PrefillPattern:
        """Every head reads every key (dense attention)."""
        none = torch.zeros(heads, dtype=torch.long, device=device)
        return cls(torch.ones(heads, dtype=torch.bool, device=device), none, none.clone())

    @classmethod
    def streaming(cls, heads: int, sink: int, window: int, device=None) -> PrefillPattern:
        """Every head reads ``sink`` first tokens and a ``window`` of recent ones (A-shape)."""
        full = functools.partial(torch.full, (heads,), device=device, dtype=torch.long)
        return cls(torch.zeros(heads, dtype=torch.bool, device=device), full(sink), full(window))


def token_mask(
    pattern: PrefillPattern, q_len: int, kv_len: int, first: int | None = None, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """``[H, q_len, kv_len]``: whether each query reads each key. Queries sit at ``positions`` (``[q_len]``),
    else at ``first .. first + q_len - 1`` (default: the last ``q_len`` of ``kv_len``)."""
    device = pattern.dense.device
    first = kv_len - q_len if first is None else first
    if positions is None:
        positions = torch.arange(first, first + q_len, device=device)
    q = positions.view(1, -1, 1)
    k = torch.arange(kv_len, device=device).view(1, 1, -1)
    distance = q - k  # [1, Tq, S]
    h = pattern.heads
    seen = pattern.dense.view(h, 1, 1) | (k < pattern.sink.view(h, 1, 1)) | (distance < pattern.window.view(h, 1, 1))
    if pattern.vertical is not None:
        seen = seen | pattern.vertical[:, :kv_len].view(h, 1, kv_len)
    if pattern.slash is not None:
        seen = seen | pattern.slash.gather(1, distance.clamp(min=0).flatten().expand(h, -1)).view(h, q_len, kv_len)
    if pattern.blocks is not None:
        qb, kb = q.flatten() // pattern.block, k.flatten() // pattern.block
        seen = seen | pattern.blocks[:, qb][:, :, kb]
    return seen & (distance >= 0)


def reference_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: PrefillPattern,
    scaling: float,
    chunk: int = 1024,
) -> torch.Tensor:
    """``[B, Hq, Tq, D]`` attention of ``query`` (the last ``Tq`` columns) over ``key``/``value [B, Hkv, S,
    D]`` under ``pattern``'s token mask, ``chunk`` queries at a time (dense SDPA with a boolean mask). A query
    that reads no key gets zeros."""
    _b, hq, tq, _d = query.shape
    s = key.shape[2]
    group = hq // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    out = torch.empty_like(query)
    for start in range(0, tq, chunk):
        stop = min(start + chunk, tq)
        mask = token_mask(pattern, stop - start, s, first=s - tq + start).unsqueeze(0)
        part = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:stop], key, value, attn_mask=mask | ~mask.any(-1, keepdim=True), scale=scaling
        )
        out[:, :, start:stop] = torch.where(mask.any(-1, keepdim=True), part, 0.0)
    return out


def active_blocks(pattern: PrefillPattern, q_len: int, kv_len: int, size: int = FLEX_BLOCK) -> torch.Tensor:
    """``[H, ceil(q_len / size), ceil(kv_len / size)]``: the ``size`` x ``size`` tiles of the attention map
    (queries are the last ``q_len`` positions) holding at least one key some query reads, computed per tile
    from the pattern (never token by token)."""
    device = pattern.dense.device
    h = pattern.heads
    offset = kv_len - q_len
    qt, kt = math.ceil(q_len / size), math.ceil(kv_len / size)
    q_first = offset + torch.arange(qt, device=device) * size  # positions of each query tile
    q_last = torch.clamp(q_first + size - 1, max=kv_len - 1)
    k_first = torch.arange(kt, device=device) * size
    k_last = torch.clamp(k_first + size - 1, max=kv_len - 1)
    near = (q_first.view(-1, 1) - k_last.view(1, -1)).clamp(min=0)  # [QT, KT] shortest causal distance
    far = q_last.view(-1, 1) - k_first.view(1, -1)  # longest distance
    causal = far >= 0
    view = (h, 1, 1)
    tile = pattern.dense.view(view) | (k_first.view(1, 1, -1) < pattern.sink.view(view))
    tile = tile | (near.unsqueeze(0) < pattern.window.view(view))
    if pattern.vertical is not None:
        padded = _pad_to(pattern.vertical[:, :kv_len], kt * size)
        tile = tile | padded.view(h, kt, size).any(-1).unsqueeze(1)
    if pattern.slash is not None:  # a tile meets every distance between its shortest and longest
        seen = torch.cat([pattern.slash.new_zeros(h, 1), pattern.slash[:, :kv_len]], dim=1).long().cumsum(-1)
        low, high = near.clamp(max=kv_len - 1), far.clamp(min=-1, max=kv_len - 1)
        count = seen[:, (high + 1).flatten()] - seen[:, low.flatten()]
        tile = tile | (count.view(h, qt, kt) > 0)
    if pattern.blocks is not None:
        tile = tile | _tiles_of_blocks(pattern, q_first, q_last, k_first, k_last)
    return tile & causal.unsqueeze(0)


def full_blocks(pattern: PrefillPattern, q_len: int, kv_len: int, size: int = FLEX_BLOCK) -> torch.Tensor:
    """``[H, QT, KT]``: tiles every query of which reads every key (no mask to evaluate inside): below the
    diagonal, and all their keys are sinks, or all their distances are inside the window, or the head is
    dense, or every key is a vertical column. A subset of :func:`active_blocks`; edge tiles are never full."""
    device = pattern.dense.device
    h = pattern.heads
    qt, kt = math.ceil(q_len / size), math.ceil(kv_len / size)
    q_first = kv_len - q_len + torch.arange(qt, device=device) * size
    k_first = torch.arange(kt, device=device) * size
    whole_q = (q_first + size <= kv_len).view(-1, 1)  # a full tile of queries ...
    whole_k = (k_first + size <= kv_len).view(1, -1)  # ... and of keys
    below = (k_first.view(1, -1) + size - 1 <= q_first.view(-1, 1)) & whole_q & whole_k  # [QT, KT]
    far = q_first.view(-1, 1) + size - 1 - k_first.view(1, -1)
    view = (h, 1, 1)
    full = pattern.dense.view(view) | (k_first.view(1, 1, -1) + size <= pattern.sink.view(view))
    full = full | (far.unsqueeze(0) < pattern.window.view(view))
    if pattern.vertical is not None:
        padded = _pad_to(pattern.vertical[:, :kv_len], kt * size)
        full = full | padded.view(h, kt, size).all(-1).unsqueeze(1)
    return full & below.unsqueeze(0)


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, length - t.shape[-1]))


def _tiles_of_blocks(pattern, q_first, q_last, k_first, k_last) -> torch.Tensor:
    """``[H, QT, KT]``: tiles overlapping an active pattern block."""
    blocks, bs = pattern.blocks, pattern.block
    nq, nk = blocks.shape[1:]

    def overlap(first: torch.Tensor, last: torch.Tensor, n: int) -> torch.Tensor:  # [tiles, n] as float
        start = torch.arange(n, device=first.device) * bs
        return ((start.view(1, -1) <= last.view(-1, 1)) & (start.view(1, -1) + bs > first.view(-1, 1))).float()

    rows, cols = overlap(q_first, q_last, nq), overlap(k_first, k_last, nk)
    return torch.einsum("iq,hqk,jk->hij", rows, blocks.float(), cols) > 0


def flex_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: PrefillPattern,
    scaling: float,
    compiled: bool = True,
) -> torch.Tensor:
    """Same result as :func:`reference_prefill`, computing only the active tiles with flex attention.

    Compiled flex attention is specialised to its input shapes, so queries and keys are padded at the end to a
    power of two (:func:`bucket`): prompts of many lengths share a few compiled kernels. Padded tiles are
    never active, so they cost no attention; padded queries are dropped from the output."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    b, hq, tq, _d = query.shape
    s = key.shape[2]
    tq_pad, s_pad = (bucket(tq), bucket(s)) if compiled else (tq, s)
    full = full_blocks(pattern, tq, s)  # [H, QT, KT]: no mask to evaluate
    partial = active_blocks(pattern, tq, s) & ~full
    tiles = (tq_pad // FLEX_BLOCK - full.shape[1], s_pad // FLEX_BLOCK - full.shape[2]) if compiled else (0, 0)
    full, partial = (torch.nn.functional.pad(t, (0, tiles[1], 0, tiles[0])) for t in (full, partial))
    block_mask = BlockMask.from_kv_blocks(
        *_kv_blocks(partial, b),
        *_kv_blocks(full, b),
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=_mask_mod(pattern, s - tq, s_pad),
        seq_lengths=(tq_pad, s_pad),
    )
    q, k, v = (_pad_rows(t, n) for t, n in ((query, tq_pad), (key, s_pad), (value, s_pad)))
    attend = _FLEX if compiled else flex_attention
    out = attend(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=hq != key.shape[1])
    return out[:, :, :tq]


def bucket(length: int) -> int:
    """The padded length compiled flex attention runs at: the next power of two, at least one tile."""
    return max(FLEX_BLOCK, 1 << (length - 1).bit_length())


def _pad_rows(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t [B, H, L, D]`` padded with zero rows to ``length``."""
    return t if t.shape[2] == length else torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[2]))


def _kv_blocks(tiles: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flex attention's layout of a tile map ``[H, QT, KT]``: per query tile, how many key tiles and which."""
    order = tiles.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    counts = tiles.sum(-1).to(torch.int32)
    return counts.unsqueeze(0).expand(batch, -1, -1).contiguous(), order.unsqueeze(0).expand(
        batch, -1, -1, -1
    ).contiguous()


def _mask_mod(pattern: PrefillPattern, offset: int, kv_len: int):
    """The token mask as flex attention's ``mask_mod`` over ``kv_len`` key columns (queries at ``offset`` +
    their index). Absent parts become all-False tables and the offset a tensor, so every pattern of one shape
    shares one compiled kernel (the closure's tensor shapes, not their values, decide recompiles)."""
    h, device, bs = pattern.heads, pattern.dense.device, pattern.block
    nb = math.ceil(kv_len / bs)

    def table(t: torch.Tensor | None) -> torch.Tensor:  # [H, S] padded (or cut) to kv_len columns
        t = torch.zeros(h, kv_len, dtype=torch.bool, device=device) if t is None else t[:, :kv_len]
        return _pad_to(t, kv_len)

    vertical, slash = table(pattern.vertical), table(pattern.slash)
    blocks = torch.zeros(h, nb, nb, dtype=torch.bool, device=device)
    if pattern.blocks is not None:
        given = pattern.blocks[:, :nb, :nb]
        blocks[:, : given.shape[1], : given.shape[2]] = given
    dense, sink, window = pattern.dense, pattern.sink, pattern.window
    start = torch.tensor(offset, device=device)

    def mask_mod(b, head, q_idx, kv_idx):
        position = q_idx + start
        distance = position - kv_idx
        seen = dense[head] | (kv_idx < sink[head]) | (distance < window[head])
        seen = seen | vertical[head, kv_idx.clamp(max=kv_len - 1)]
        seen = seen | slash[head, distance.clamp(min=0, max=kv_len - 1)]
        seen = seen | blocks[head, (position // bs).clamp(max=nb - 1), (kv_idx // bs).clamp(max=nb - 1)]
        return seen & (distance >= 0)

    return mask_mod


class FlexUnavailable(RuntimeError):
    """Compiled flex attention cannot run here (no compiler, or a compiler failure)."""


class _CompiledFlex:
    """flex attention compiled once per process, used while it can stay compiled.

    ``torch.compile`` keeps one specialised kernel per input signature and, past its recompile limit, runs the
    function eagerly, which for flex attention means materializing every score (tens of GB at 32K tokens).
    So the signatures compiled so far are counted (:meth:`admits`), and a machine that cannot compile (a CPU
    needs a C++ compiler) is found out once, with a warning."""

    def __init__(self) -> None:
        self.compiled = None
        self.broken = False
        self.signatures: set[tuple] = set()

    def admits(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> bool:
        """Whether a call at these shapes may run compiled: it reuses a kernel, or one more fits the limit."""
        if self.broken:
            return False
        b, hq, tq, d = query.shape
        signature = (b, hq, bucket(tq), d, key.shape[1], bucket(key.shape[2]), query.dtype, str(query.device), scaling)
        if signature in self.signatures:
            return True
        if len(self.signatures) + 1 >= _recompile_limit():
            _warn_once("flex attention has been compiled for as many input shapes as torch.compile allows")
            return False
        self.signatures.add(signature)
        return True

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if self.broken:
            raise FlexUnavailable("flex attention could not be compiled on this machine")
        if self.compiled is None:
            from torch.nn.attention.flex_attention import flex_attention

            self.compiled = torch.compile(flex_attention, dynamic=False)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as error:  # a compiler failure: this process stops trying to compile
            if not _is_compile_error(error):
                raise
            self.broken = True
            _warn_once(f"flex attention could not be compiled ({type(error).__name__})")
            raise FlexUnavailable(str(error)) from error


def _is_compile_error(error: Exception) -> bool:
    from torch._dynamo.exc import BackendCompilerFailed

    name = type(error).__name__
    return isinstance(error, BackendCompilerFailed) or "Compile" in name or "Inductor" in name


def _recompile_limit() -> int:
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"{reason}; sparse prefill runs the dense masked reference instead (same result, no speed-up)",
        RuntimeWarning,
        stacklevel=4,
    )


_FLEX = _CompiledFlex()


def flex_compilations() -> int:
    """Input signatures flex attention has been compiled for in this process (one compilation each)."""
    return len(_FLEX.signatures)


def compiled_flex_available() -> bool:
    """Whether compiled flex attention runs on this machine (compiles one tiny case the first time)."""
    q = torch.zeros(1, 1, FLEX_BLOCK, 16)
    if not _FLEX.admits(q, q, 1.0):
        return False
    try:
        flex_prefill(q, q, q, PrefillPattern.streaming(1, 1, 1), 1.0)
    except FlexUnavailable:
        return False
    return True


def sparse_prefill(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pattern: PrefillPattern, scaling: float
) -> torch.Tensor:
    """The pattern's attention by the fastest correct route for each kind of head (:func:`head_routes`):
    dense heads through causal SDPA, heads that read only sinks and a recent window through
    :func:`band_prefill`, and the rest through compiled flex attention, else the chunked dense masked
    reference (eager flex attention would materialize the whole score matrix). The flex call always gets
    every head (those routed elsewhere with nothing to read, so no tile of theirs is computed): its input
    shapes, and so its compiled kernel, do not depend on how a layer's heads are split."""
    routes = head_routes(pattern)
    masked = routes.pop("mask", None)
    if masked is not None and not routes:
        return _masked_prefill(query, key, value, pattern, scaling)
    if masked is not None:
        out = _masked_prefill(query, key, value, pattern.keeping(torch.tensor(masked)), scaling)
    else:
        out = torch.empty_like(query)
    group = query.shape[1] // key.shape[1]
    for route, heads in routes.items():
        index = torch.tensor(heads, device=query.device)
        q = query.index_select(1, index)
        k, v = (t.index_select(1, index // group) for t in (key, value))  # one KV head per query head
        if route == "dense":
            part = causal_prefill(q, k, v, scaling)
        else:
            part = band_prefill(q, k, v, int(pattern.sink[heads[0]]), int(pattern.window[heads[0]]), scaling)
        out[:, index] = part
    return out


def _masked_prefill(query, key, value, pattern: PrefillPattern, scaling: float) -> torch.Tensor:
    if _FLEX.admits(query, key, scaling):
        try:
            return flex_prefill(query, key, value, pattern, scaling)
        except FlexUnavailable:
            pass
    return reference_prefill(query, key, value, pattern, scaling)


def head_routes(pattern: PrefillPattern) -> dict[str, list[int]]:
    """Query heads by route: ``dense`` (every causal key), ``band:<sink>,<window>`` (only sinks and a window:
    an A-shape or a streaming head; one route per pair of values), ``mask`` (anything else)."""
    extra = torch.zeros_like(pattern.dense)
    for table in (pattern.vertical, pattern.slash, pattern.blocks):
        if table is not None:
            extra = extra | table.flatten(1).any(1)
    routes: dict[str, list[int]] = {}
    for head in range(pattern.heads):
        sink, window = int(pattern.sink[head]), int(pattern.window[head])
        if bool(pattern.dense[head]):
            route = "dense"
        elif bool(extra[head]) or sink + window == 0:
            route = "mask"
        else:
            route = f"band:{sink},{window}"
        routes.setdefault(route, []).append(head)
    return routes


def causal_prefill(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, chunk: int = 1024
) -> torch.Tensor:
    """Causal attention of ``query [B, H, Tq, D]`` (the last ``Tq`` columns) over ``key``/``value [B, H, S,
    D]`` (one KV head per query head): SDPA's causal kernel when ``Tq = S``, else ``chunk`` queries at a time
    with their causal mask."""
    tq, s = query.shape[2], key.shape[2]
    if tq == s:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    out = torch.empty_like(query)
    for start in range(0, tq, chunk):
        stop = min(start + chunk, tq)
        positions = torch.arange(s - tq + start, s - tq + stop, device=query.device).view(-1, 1)
        mask = torch.arange(s, device=query.device).view(1, -1) <= positions
        out[:, :, start:stop] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:stop], key, value, attn_mask=mask, scale=scaling
        )
    return out


def band_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sink: int,
    window: int,
    scaling: float,
    block: int = 256,
) -> torch.Tensor:
    """A-shape attention (the first ``sink`` keys and the ``window`` most recent, causal) of ``query [B, H,
    Tq, D]`` (the last ``Tq`` columns) over ``key``/``value [B, H, S, D]`` (one KV head per query head),
    ``block`` queries at a time: each block reads only the sinks and the keys its band spans, so the work
    grows with ``Tq x (sink + window + block)``, not ``Tq x S``. Equals :func:`reference_prefill` with every
    head an A-shape of these values. ``sink + window`` must be positive (every query reads a key)."""
    if sink + window <= 0:
        raise ValueError("band_prefill: sink + window must be positive")
    tq, s = query.shape[2], key.shape[2]
    device = query.device
    out = torch.empty_like(query)
    for start in range(0, tq, block):
        stop = min(start + block, tq)
        first, end = s - tq + start, s - tq + stop  # positions of the block's queries: [first, end)
        low = max(0, first - window + 1)  # the oldest key a window of the block reaches
        sinks = min(sink, low)  # sinks left of the band (the others are in it)
        columns = torch.cat([torch.arange(sinks, device=device), torch.arange(low, end, device=device)])
        q_pos = torch.arange(first, end, device=device).view(-1, 1)
        k_pos = columns.view(1, -1)
        mask = (k_pos <= q_pos) & ((k_pos < sink) | (q_pos - k_pos < window))  # [block, keys]
        keys = torch.cat([key[:, :, :sinks], key[:, :, low:end]], dim=2)
        values = torch.cat([value[:, :, :sinks], value[:, :, low:end]], dim=2)
        out[:, :, start:stop] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:stop], keys, values, attn_mask=mask, scale=scaling
        )
    return out


# -- online index estimation (MInference) -----------------------------------------------------------------
def last_query_scores(query: torch.Tensor, key: torch.Tensor, scaling: float, last: int) -> torch.Tensor:
    """``[B, Hq, L, S]`` causal softmax attention of the last ``L = min(last, Tq)`` queries over every key."""
    _b, hq, _tq, _d = query.shape
    s = key.shape[2]
    group = hq // key.shape[1]
    q = query[:, :, -last:].float()
    n = q.shape[2]
    k = key.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhld,bhsd->bhls", q, k) * scaling
    positions = torch.arange(s - n, s, device=query.device).view(-1, 1)
    scores = scores.masked_fill(torch.arange(s, device=query.device).view(1, -1) > positions, float("-inf"))
    return scores.softmax(-1)


def estimate_vertical_slash(
    query: torch.Tensor, key: torch.Tensor, scaling: float, vertical: int, slash: int, last: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's vertical-slash index from the last ``last`` queries: the ``vertical`` key columns and the
    ``slash`` distances back that gather the most of their attention, per query head (summed over the batch,
    as one pattern serves every row). Returns ``[Hq, S]`` bool columns and distances."""
    probs = last_query_scores(query, key, scaling, last)  # [B, H, L, S]
    _b, h, n, s = probs.shape
    columns = probs.sum((0, 2))  # [H, S]
    distance = (torch.arange(s - n, s, device=probs.device).view(-1, 1) - torch.arange(s, device=probs.device)).clamp(
        min=0
    )  # [L, S]
    by_distance = torch.zeros(h, s, device=probs.device).index_add_(1, distance.flatten(), probs.sum(0).reshape(h, -1))
    return _top(columns, vertical), _top(by_distance, slash)


def estimate_blocks(query: torch.Tensor, key: torch.Tensor, scaling: float, keep: int, block: int = 64) -> torch.Tensor:
    """MInference's block-sparse index: queries and keys mean-pooled over blocks of ``block``; each block row
    keeps its ``keep`` blocks of highest pooled attention (the diagonal block always). ``[Hq, QB, KB]`` over
    the key length (query blocks aligned to the keys' end)."""
    b, hq, tq, d = query.shape
    s = key.shape[2]
    group = hq // key.shape[1]
    nb = math.ceil(s / block)
    pooled_k = _pool(key.float().repeat_interleave(group, dim=1), block, nb)  # [B, H, NB, D]
    full_q = query.float().new_zeros(b, hq, s, d)
    full_q[:, :, s - tq :] = query.float()
    pooled_q = _pool(full_q, block, nb)
    scores = torch.einsum("bhqd,bhkd->hqk", pooled_q, pooled_k) * scaling
    causal = torch.arange(nb, device=query.device).view(-1, 1) >= torch.arange(nb, device=query.device)
    scores = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    chosen = _top(scores.reshape(-1, nb), keep).view(hq, nb, nb)
    return (chosen | torch.eye(nb, dtype=torch.bool, device=query.device)) & causal


def _pool(x: torch.Tensor, block: int, blocks: int) -> torch.Tensor:
    b, h, s, d = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, 0, blocks * block - s))
    sums = padded.view(b, h, blocks, block, d).sum(3)
    counts = torch.full((blocks,), block, device=x.device, dtype=x.dtype)
    counts[-1] = s - (blocks - 1) * block
    return sums / counts.view(1, 1, -1, 1)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of each row's ``k`` largest finite entries."""
    k = min(k, scores.shape[-1])
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        top = scores.topk(k, dim=-1)
        chosen.scatter_(-1, top.indices, top.values > float("-inf"))
    return chosen
