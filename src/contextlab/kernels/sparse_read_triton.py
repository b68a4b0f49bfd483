"""Launchers of the Triton sparse decode reads: checks, block sizes, grids, and the merge of the splits.

The ``@triton.jit`` bodies live in ``_sparse_read_triton_kernels.py``, imported on first use so that
``contextlab.kernels`` imports without triton; set ``TRITON_INTERPRET=1`` before the first call to run them
on CPU tensors (Triton's interpreter).
"""

from __future__ import annotations

import torch

from contextlab.kernels._triton import load_kernels
from contextlab.kernels.sparse_read import check_gather, check_pages

KERNELS = "contextlab.kernels._sparse_read_triton_kernels"
BLOCK_PAGES = 64
BLOCK_SLOTS = 32
SLOTS_PER_SPLIT = 256  # selected slots per program before the read is split (flash-decoding)


def page_scores_triton(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Triton backend of :func:`contextlab.kernels.sparse_read.page_scores` (same shapes and result)."""
    check_pages(query, kmin, kmax)
    triton, kernels = load_kernels(KERNELS, query)
    (b, hq, d), (_, h, p, _) = query.shape, kmin.shape
    out = torch.empty(b, h, p, dtype=torch.float32, device=query.device)
    if b == 0 or p == 0:
        return out
    grid = (triton.cdiv(p, BLOCK_PAGES), b * h)
    kernels.page_scores_kernel[grid](
        query, kmin, kmax, out,
        *query.stride(), *kmin.stride(), *kmax.stride(), *out.stride(),
        P=p, KV_HEADS=h, GROUPS=hq // h, HEAD_DIM=d,
        BLOCK_P=BLOCK_PAGES, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip
    return out


def gathered_attention_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    trusted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of :func:`contextlab.kernels.sparse_read.gathered_attention` (same shapes and result)."""
    check_gather(query, keys, values, indices, valid, trusted)
    triton, kernels = load_kernels(KERNELS, query)
    (b, hq, d), h, k = query.shape, keys.shape[1], indices.shape[2]
    splits = max(1, triton.cdiv(k, SLOTS_PER_SPLIT))
    per_split = triton.cdiv(triton.cdiv(max(k, 1), splits), BLOCK_SLOTS) * BLOCK_SLOTS
    parts = torch.zeros(b, hq, splits, d, dtype=torch.float32, device=query.device)
    lse = torch.full((b, hq, splits), float("-inf"), dtype=torch.float32, device=query.device)
    if b and k:
        ok = valid.to(torch.uint8)
        groups = hq // h
        kernels.gathered_attention_kernel[(b * h, splits)](
            query, keys, values, indices, ok, parts, lse,
            *query.stride(), *keys.stride(), *values.stride(), *indices.stride(), *ok.stride(),
            *parts.stride(), *lse.stride(),
            scale=float(scaling), K=k, PER_SPLIT=per_split, KV_HEADS=h, GROUPS=groups, HEAD_DIM=d,
            BLOCK_G=max(2, triton.next_power_of_2(groups)), BLOCK_N=BLOCK_SLOTS,
            BLOCK_D=max(16, triton.next_power_of_2(d)),
        )  # fmt: skip
    return merge_splits(parts, lse)


def merge_splits(parts: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``parts [..., S, D]`` and ``lse [..., S]`` of disjoint splits -> ``out [..., D]``, ``lse [...]``; a split
    with ``lse = -inf`` (it read nothing) contributes nothing."""
    total = torch.logsumexp(lse, dim=-1)  # -inf where no split read anything
    base = torch.where(torch.isfinite(total), total, 0.0)
    weight = torch.exp(lse - base[..., None])  # 0 for empty splits
    out = torch.where(weight[..., None] > 0, weight[..., None] * parts, 0.0).sum(-2)
    return out, total
