"""Triton bodies of the attention column sums (launcher: ``colsum_triton.py``).

Two passes, nothing ``Tq x S`` materialised. Pass 1 (:func:`row_lse_kernel`): each program owns a tile of
queries of one query head and computes their log-sum-exp over visible keys with an online max/sum.
Pass 2 (:func:`column_sums_kernel`): each program owns a tile of keys of one KV head, loops over the ``G``
query heads of the group and the query tiles that can see its keys, and accumulates
``exp(q.k * scale - lse)`` column sums in registers, so no atomics are needed.

Query ``j`` sits at slot ``OFFSET + j`` (``OFFSET = S - Tq``) and sees key slots ``s <= OFFSET + j``.
``valid`` is read through strides, so a broadcast ``[B, 1, S]`` mask is passed with a zero head stride.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton decides at decoration time, from this variable, whether the kernels below run interpreted (on CPU).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@triton.jit
def row_lse_kernel(
    q_ptr, k_ptr, valid_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs,
    stride_lb, stride_lh,
    scale, TQ, S, OFFSET, QUERY_HEADS, GROUPS, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``lse[b, hq, j]`` over the valid keys query ``j`` can see; ``-inf`` where it sees none."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, hq = (bh // QUERY_HEADS).to(tl.int64), bh % QUERY_HEADS
    h = hq // GROUPS
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [M] query index
    dims = tl.arange(0, BLOCK_D)
    q_slots = OFFSET + rows
    q = tl.load(
        q_ptr + b * stride_qb + hq * stride_qh + rows[:, None] * stride_qt + dims[None, :] * stride_qd,
        mask=(rows[:, None] < TQ) & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )  # [M, D]
    row_max = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite start: no (-inf) - (-inf) on empty rows
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    last_slot = tl.minimum(OFFSET + (tile + 1) * BLOCK_M, S)
    for start in range(0, last_slot, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [N] key slot
        k = tl.load(
            k_ptr + b * stride_kb + h * stride_kh + cols[:, None] * stride_ks + dims[None, :] * stride_kd,
            mask=(cols[:, None] < S) & (dims[None, :] < HEAD_DIM),
            other=0.0,
        )  # [N, D]
        key_ok = tl.load(valid_ptr + b * stride_vb + h * stride_vh + cols * stride_vs, mask=cols < S, other=0)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [M, N]
        allowed = (cols[None, :] <= q_slots[:, None]) & (key_ok[None, :] != 0)
        logits = tl.where(allowed, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        row_max = new_max
    seen = row_sum > 0
    lse = tl.where(seen, row_max + tl.log(tl.where(seen, row_sum, 1.0)), float("-inf"))
    tl.store(lse_ptr + b * stride_lb + hq * stride_lh + rows, lse, mask=rows < TQ)


@triton.jit
def column_sums_kernel(
    q_ptr, k_ptr, valid_ptr, lse_ptr, out_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    scale, TQ, S, OFFSET, KV_HEADS, GROUPS, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``out[b, h, s]``: attention key ``s`` received, summed over queries, averaged over the group."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // KV_HEADS).to(tl.int64), bh % KV_HEADS
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [N] key slot
    dims = tl.arange(0, BLOCK_D)
    k = tl.load(
        k_ptr + b * stride_kb + h * stride_kh + cols[:, None] * stride_ks + dims[None, :] * stride_kd,
        mask=(cols[:, None] < S) & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )  # [N, D]
    valid_row = valid_ptr + b * stride_vb + h * stride_vh
    key_ok = tl.load(valid_row + cols * stride_vs, mask=cols < S, other=0) != 0
    totals = tl.zeros([BLOCK_N], tl.float32)
    # Queries before slot tile * BLOCK_N cannot see any key of this tile (causality).
    first_tile = tl.maximum(tile * BLOCK_N - OFFSET, 0) // BLOCK_M
    for g in range(0, GROUPS):
        hq = h * GROUPS + g
        for start in range(first_tile * BLOCK_M, TQ, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)  # [M] query index
            in_range = rows < TQ
            q = tl.load(
                q_ptr + b * stride_qb + hq * stride_qh + rows[:, None] * stride_qt + dims[None, :] * stride_qd,
                mask=in_range[:, None] & (dims[None, :] < HEAD_DIM),
                other=0.0,
            )  # [M, D]
            lse = tl.load(lse_ptr + b * stride_lb + hq * stride_lh + rows, mask=in_range, other=0.0)
            query_ok = tl.load(valid_row + (OFFSET + rows) * stride_vs, mask=in_range, other=0) != 0
            logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [M, N]
            allowed = (cols[None, :] <= OFFSET + rows[:, None]) & key_ok[None, :] & (query_ok & in_range)[:, None]
            # Masking before exp keeps -inf lse rows (queries that see nothing) and future keys finite.
            probs = tl.exp(tl.where(allowed, logits - lse[:, None], float("-inf")))
            totals += tl.sum(probs, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + cols, totals / GROUPS, mask=cols < S)
