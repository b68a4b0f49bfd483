"""Launcher of the Triton attention column sums: input checks, dtypes, block sizes and grids.

The ``@triton.jit`` bodies live in ``_colsum_triton_kernels.py``, imported on first use so that
``contextlab.kernels`` imports without triton. Triton reads ``TRITON_INTERPRET`` when the kernels are
defined, so to run them on CPU tensors (the interpreter) set ``TRITON_INTERPRET=1`` before the first call.
"""

from __future__ import annotations

import torch

from contextlab.kernels._triton import load_kernels
from contextlab.kernels.colsum import check_inputs

BLOCK_QUERIES = 64
BLOCK_KEYS = 64


def attention_column_sums_triton(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Triton backend of :func:`contextlab.kernels.attention_column_sums` (same shapes and result).

    Runs on CUDA tensors, or on CPU tensors when the kernels were imported under ``TRITON_INTERPRET=1``.
    Raises ``ImportError`` without triton and ``ValueError`` for CPU tensors outside the interpreter.
    """
    check_inputs(queries, keys, valid, chunk=1)
    triton, kernels = load_kernels("contextlab.kernels._colsum_triton_kernels", queries)
    (b, hq, tq, d), h, s = queries.shape, keys.shape[1], keys.shape[2]
    out = torch.zeros(b, h, s, dtype=torch.float32, device=keys.device)
    if tq == 0 or b == 0:
        return out
    dtype = torch.promote_types(queries.dtype, keys.dtype)
    if kernels.INTERPRETED and dtype == torch.bfloat16:
        dtype = torch.float32  # the interpreter's tl.dot returns garbage for bf16 (triton 3.9); exact in fp32
    q, k = queries.to(dtype), keys.to(dtype)
    valid_bytes = valid.to(torch.uint8).expand(b, h, s)  # [B, H, S]; head stride 0 when Hv == 1
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=keys.device)  # [B, Hq, Tq]
    common = dict(
        scale=float(scaling),
        TQ=tq,
        S=s,
        OFFSET=s - tq,
        GROUPS=hq // h,
        HEAD_DIM=d,
        BLOCK_M=BLOCK_QUERIES,
        BLOCK_N=BLOCK_KEYS,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        # fp32 inputs must not be rounded to tf32; 16-bit inputs multiply exactly into fp32 accumulators.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
    strides = (*q.stride(), *k.stride(), *valid_bytes.stride(), *lse.stride()[:2])
    lse_grid = (triton.cdiv(tq, BLOCK_QUERIES), b * hq)
    kernels.row_lse_kernel[lse_grid](q, k, valid_bytes, lse, *strides, QUERY_HEADS=hq, **common)
    sums_grid = (triton.cdiv(s, BLOCK_KEYS), b * h)
    kernels.column_sums_kernel[sums_grid](
        q, k, valid_bytes, lse, out, *strides, *out.stride()[:2], KV_HEADS=h, **common
    )
    return out
