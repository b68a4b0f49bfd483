"""Triton bodies of the sparse decode reads (launcher: ``sparse_read_triton.py``).

:func:`page_scores_kernel`: one program per tile of pages of one (row, KV head); it loads the tile's key
minima and maxima once and takes, over the ``G`` query heads of the KV head, the largest Quest bound.
:func:`gathered_attention_kernel`: one program per (row, KV head, split of the selected slots); it loads the
``G`` queries of the KV head once, gathers each block of selected keys and values by index straight from the
cache buffers, and folds them into an online softmax; each split writes its partial output and log-sum-exp
(merged by the launcher).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton decides at decoration time, from this variable, whether the kernels below run interpreted (on CPU).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@triton.jit
def page_scores_kernel(
    q_ptr, lo_ptr, hi_ptr, out_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_lb, stride_lh, stride_lp, stride_ld,
    stride_hb, stride_hh, stride_hp, stride_hd,
    stride_ob, stride_oh, stride_op,
    P, KV_HEADS, GROUPS, HEAD_DIM,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``out[b, h, p] = max_g sum_d max(q[g, d] * lo[p, d], q[g, d] * hi[p, d])``."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // KV_HEADS).to(tl.int64), bh % KV_HEADS
    pages = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    dims = tl.arange(0, BLOCK_D)
    page_ok, dim_ok = pages < P, dims < HEAD_DIM
    both = page_ok[:, None] & dim_ok[None, :]
    lo = tl.load(
        lo_ptr + b * stride_lb + h * stride_lh + pages[:, None] * stride_lp + dims[None, :] * stride_ld,
        mask=both,
        other=0.0,
    ).to(tl.float32)
    hi = tl.load(
        hi_ptr + b * stride_hb + h * stride_hh + pages[:, None] * stride_hp + dims[None, :] * stride_hd,
        mask=both,
        other=0.0,
    ).to(tl.float32)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for g in range(GROUPS):
        q = tl.load(q_ptr + b * stride_qb + (h * GROUPS + g) * stride_qh + dims * stride_qd, mask=dim_ok, other=0.0)
        q = q.to(tl.float32)[None, :]
        best = tl.maximum(best, tl.sum(tl.maximum(q * lo, q * hi), axis=1))
    tl.store(out_ptr + b * stride_ob + h * stride_oh + pages * stride_op, best, mask=page_ok)


@triton.jit
def gathered_attention_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, ok_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ib, stride_ih, stride_ik,
    stride_ob_, stride_oh_, stride_ok_,
    stride_rb, stride_rh, stride_rs, stride_rd,
    stride_eb, stride_eh, stride_es,
    scale, K, PER_SPLIT, KV_HEADS, GROUPS, HEAD_DIM,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Partial attention of the ``G`` queries of KV head ``h`` over selected entries
    ``[split * PER_SPLIT, (split + 1) * PER_SPLIT)``: ``out[b, hq, split]`` and ``lse[b, hq, split]``."""
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = (bh // KV_HEADS).to(tl.int64), bh % KV_HEADS
    gs, dims = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    g_ok, dim_ok = gs < GROUPS, dims < HEAD_DIM
    heads = h * GROUPS + gs
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
        mask=g_ok[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = split * PER_SPLIT
    for first in range(start, start + PER_SPLIT, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        in_range = cols < K
        ok = tl.load(ok_ptr + b * stride_ob_ + h * stride_oh_ + cols * stride_ok_, mask=in_range, other=0) != 0
        ok = ok & in_range
        slot = tl.load(idx_ptr + b * stride_ib + h * stride_ih + cols * stride_ik, mask=ok, other=0).to(tl.int64)
        rows = ok[:, None] & dim_ok[None, :]
        k = tl.load(
            k_ptr + b * stride_kb + h * stride_kh + slot[:, None] * stride_ks + dims[None, :] * stride_kd,
            mask=rows,
            other=0.0,
        ).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, N]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a query that saw nothing yet stays at 0
        alpha = tl.exp(m - base)
        p = tl.exp(s - base[:, None])
        v = tl.load(
            v_ptr + b * stride_vb + h * stride_vh + slot[:, None] * stride_vs + dims[None, :] * stride_vd,
            mask=rows,
            other=0.0,
        ).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        total = total * alpha + tl.sum(p, axis=1)
        m = m_new
    seen = total > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, total, 1.0)[:, None], 0.0)
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(
        out_ptr + b * stride_rb + heads[:, None] * stride_rh + split * stride_rs + dims[None, :] * stride_rd,
        out,
        mask=g_ok[:, None] & dim_ok[None, :],
    )
    tl.store(lse_ptr + b * stride_eb + heads * stride_eh + split * stride_es, lse, mask=g_ok)
