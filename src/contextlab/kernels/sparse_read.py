"""Sparse decode reads: Quest's page scores, and one decode query's attention over a gathered set of slots.

Both are what a query-aware sparse read (``quest``, ``tokenselect``, ``recycled``) costs per decode step.
The Triton backends read only the page metadata (for the scores) or only the selected slots (for the
attention: keys and values are gathered in registers, never copied), split over the selected slots and
merged by log-sum-exp (flash-decoding); the references are plain fp32 PyTorch.

Shapes (``G = Hq // H`` query heads per KV head; query head ``j`` reads KV head ``j // G``):

- ``query``: ``[B, Hq, D]``, one decode query per query head.
- page scores: ``kmin``/``kmax`` ``[B, H, P, D]``, each page's elementwise key minimum and maximum (finite:
  the caller masks pages that hold no slot); result ``[B, H, P]`` float32, the largest over the ``G`` query
  heads of Quest's bound ``sum_d max(q_d * kmin_d, q_d * kmax_d)``, never below any real ``q . k`` of the page.
- gathered attention: ``keys``/``values`` ``[B, H, S, D]`` (views of larger buffers are fine), ``indices``
  ``[B, H, K]`` (slots to read, per row and KV head) and ``valid`` ``[B, H, K]`` bool (False: skip that entry;
  so every head may read its own number of slots); results ``out [B, Hq, D]`` float32 and ``lse [B, Hq]``
  float32 (a query that reads nothing gets ``out = 0``, ``lse = -inf``).

Quest: Tang et al., 2024, arXiv 2406.10774. Flash-decoding: Dao, Haziza, Massa, Sizov (2023).
"""

from __future__ import annotations

import torch

from contextlab.kernels._triton import triton_available
from contextlab.kernels.quant_attention import dense_attention_lse

BACKENDS = ("auto", "reference", "triton")


def _check_query(query: torch.Tensor, kv_heads: int, dim: int, batch: int) -> None:
    if query.dim() != 3 or not query.is_floating_point():
        raise ValueError(f"query must be a floating-point [B, Hq, D] tensor; got {query.dtype} {tuple(query.shape)}")
    b, hq, d = query.shape
    if b != batch:
        raise ValueError(f"batch sizes differ: query {b}, cache {batch}")
    if d != dim:
        raise ValueError(f"head dims differ: query {d}, cache {dim}")
    if kv_heads == 0 or hq % kv_heads:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({kv_heads})")


def _backend(backend: str, tensor: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "reference"
    return backend


# -- page scores -------------------------------------------------------------------------------------------
def check_pages(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first problem with the inputs of :func:`page_scores`."""
    if kmin.dim() != 4 or kmin.shape != kmax.shape:
        raise ValueError(
            f"kmin and kmax must be [B, H, P, D] of one shape; got {tuple(kmin.shape)}, {tuple(kmax.shape)}"
        )
    _check_query(query, kmin.shape[1], kmin.shape[3], kmin.shape[0])
    if not query.device == kmin.device == kmax.device:
        raise ValueError(f"devices differ: query {query.device}, kmin {kmin.device}, kmax {kmax.device}")


def page_scores(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``[B, H, P]`` float32: each page's Quest bound, the largest over the query heads of its KV head.

    ``backend``: ``"reference"`` (two fp32 matmuls), ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``)
    or ``"auto"`` (Triton for CUDA tensors when triton imports, else the reference)."""
    check_pages(query, kmin, kmax)
    if _backend(backend, query) == "triton":
        from contextlab.kernels.sparse_read_triton import page_scores_triton

        return page_scores_triton(query, kmin, kmax)
    return page_scores_reference(query, kmin, kmax)


def page_bounds(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's bound per query head: ``query [B, H, G, D]`` against ``kmin``/``kmax [B, H, P, D]`` gives
    ``[B, H, G, P]`` in float32 (``relu(q) . kmax + min(q, 0) . kmin``, the sum of the per-channel maxima)."""
    q = query.float()
    positive = q.clamp(min=0)
    return positive @ kmax.float().transpose(-1, -2) + (q - positive) @ kmin.float().transpose(-1, -2)


def page_scores_reference(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    b, _, d = query.shape
    return page_bounds(query.view(b, kmin.shape[1], -1, d), kmin, kmax).amax(2)


# -- attention over gathered slots ------------------------------------------------------------------------
def check_gather(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor,
    trusted: bool = False,
) -> None:
    """Raise ``ValueError`` naming the first problem with the inputs of :func:`gathered_attention`;
    ``trusted`` skips the range check of the indices (it reads them back: a device sync on CUDA)."""
    if keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(
            f"keys and values must be [B, H, S, D] of one shape; got {tuple(keys.shape)}, {tuple(values.shape)}"
        )
    _check_query(query, keys.shape[1], keys.shape[3], keys.shape[0])
    if indices.dim() != 3 or indices.shape[:2] != keys.shape[:2] or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be an integer [B, H, K] tensor; got {indices.dtype} {tuple(indices.shape)}")
    if valid.shape != indices.shape or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool tensor shaped like indices {tuple(indices.shape)}; got {valid.dtype} "
            f"{tuple(valid.shape)}"
        )
    read = indices.new_empty(0) if trusted else indices[valid]
    if read.numel() and (int(read.min()) < 0 or int(read.max()) >= keys.shape[2]):
        raise ValueError(f"indices of valid entries must lie in [0, {keys.shape[2]}) (the cached slots)")
    if not query.device == keys.device == values.device == indices.device == valid.device:
        raise ValueError("query, keys, values, indices and valid must be on one device")


def gathered_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    *,
    backend: str = "auto",
    trusted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode query per head over the slots ``indices`` selects (where ``valid``): float32 ``out [B, Hq, D]``
    and ``lse [B, Hq]`` (shapes in the module docstring). Backends as in :func:`page_scores`; ``trusted``
    (indices made by contextlab's own policies) skips the range check of the indices."""
    check_gather(query, keys, values, indices, valid, trusted)
    if _backend(backend, query) == "triton":
        from contextlab.kernels.sparse_read_triton import gathered_attention_triton

        return gathered_attention_triton(query, keys, values, indices, valid, scaling, trusted=True)
    return gathered_attention_reference(query, keys, values, indices, valid, scaling)


def gathered_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the selected keys and values, then plain fp32 attention over the valid ones."""
    safe = indices.long().masked_fill(~valid, 0).unsqueeze(-1).expand(*indices.shape, keys.shape[-1])
    return dense_attention_lse(query, keys.gather(2, safe), values.gather(2, safe), valid, scaling)
