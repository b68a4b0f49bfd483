"""Launcher of the fused dequantize + decode attention kernel: input checks, dtypes, block sizes, splits, grids.

The ``@triton.jit`` bodies live in ``_quant_attention_triton_kernels.py``, imported on first use so that
``contextlab.kernels`` imports without triton. Triton reads ``TRITON_INTERPRET`` when the kernels are
defined, so to run them on CPU tensors (the interpreter) set ``TRITON_INTERPRET=1`` before the first call.
"""

from __future__ import annotations

import torch

from contextlab.kernels._triton import load_kernels
from contextlab.kernels.quant_attention import check_inputs
from contextlab.store.codec import Codes, per_word

# Register budget of one step: at most this many elements in each [BLOCK_N, D] tile (codes, scale, zero of
# keys and values) and in the [G, BLOCK_N, D] broadcast products. Chosen from ptxas register counts on sm_90
# (no spills up to G = 8, D = 128), not from timings: wider tiles spilled hundreds of bytes to the stack.
TILE_ELEMENTS, PRODUCT_ELEMENTS = 2048, 8192
MIN_BLOCK_N, MAX_BLOCK_N = 16, 64
# Above this many product elements a step runs on 8 warps (fewer registers per thread, no spills).
SMALL_STEP = 1024
# Split the token axis until about this many programs per streaming multiprocessor are in flight, but give
# each split at least this many blocks so that its fixed cost (query load, partial write) stays small.
PROGRAMS_PER_SM = 2
MIN_BLOCKS_PER_SPLIT = 4


def quantized_attention_triton(
    query: torch.Tensor,
    keys: Codes,
    values: Codes,
    valid: torch.Tensor | None,
    *,
    bits: int,
    key_group: int,
    value_group: int,
    scaling: float,
    block_n: int | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of :func:`contextlab.kernels.quant_attention.quantized_attention` (same shapes and
    results). ``block_n``: tokens per step (a power of two, >= 16); ``splits``: programs per (batch row,
    KV head) along the token axis (clamped to the number of blocks). Both default to a heuristic.

    Runs on CUDA tensors, or on CPU tensors when the kernels were imported under ``TRITON_INTERPRET=1``.
    Raises ``ImportError`` without triton and ``ValueError`` for CPU tensors outside the interpreter.
    """
    check_inputs(query, keys, values, valid, bits, key_group, value_group)
    triton, kernels = load_kernels("contextlab.kernels._quant_attention_triton_kernels", query)
    (b, hq, d), (h, n) = query.shape, keys.packed.shape[1:3]
    g = hq // h
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=query.device)
    lse = torch.full((b, hq), float("-inf"), dtype=torch.float32, device=query.device)
    if n == 0 or b == 0 or hq == 0:
        return out, lse
    block_g, block_d = triton.next_power_of_2(g), triton.next_power_of_2(d)
    if block_n is None:
        block_n = max(MIN_BLOCK_N, min(MAX_BLOCK_N, TILE_ELEMENTS // block_d, PRODUCT_ELEMENTS // (block_g * block_d)))
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16; got {block_n}")
    blocks = triton.cdiv(n, block_n)
    if splits is None:
        splits = _default_splits(query.device, b * h, blocks)
    blocks_per_split = triton.cdiv(blocks, max(1, min(splits, blocks)))
    splits = triton.cdiv(blocks, blocks_per_split)  # no split left without tokens

    query, keys, values = _kernel_dtypes(query, keys, values, kernels.INTERPRETED)
    symmetric = keys.zero is None
    if symmetric:  # float8 scales as their bytes (decoded in the kernel); the zero arguments are unused
        keys = Codes(keys.packed, keys.scale.view(torch.uint8), keys.scale.view(torch.uint8))
        values = Codes(values.packed, values.scale.view(torch.uint8), values.scale.view(torch.uint8))
    # A bool tensor reinterpreted as bytes (no copy, strides kept); broadcast over heads by a zero stride.
    mask = valid.view(torch.uint8).expand(b, h, n) if valid is not None else out
    mask_strides = mask.stride() if valid is not None else (0, 0, 0)
    if splits == 1:
        part_out, part_lse = out.view(b, hq, 1, d), lse.view(b, hq, 1)  # [B, Hq, 1, D], [B, Hq, 1]: final
    else:
        part_out = torch.empty(b, hq, splits, d, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(b, hq, splits, dtype=torch.float32, device=query.device)
    strides = (
        *query.stride(),
        *keys.packed.stride(),
        *keys.scale.stride(),
        *keys.zero.stride(),
        *values.packed.stride(),
        *values.scale.stride(),
        *values.zero.stride(),
        *mask_strides,
        *part_out.stride(),
        *part_lse.stride(),
    )
    kernels.quantized_decode_kernel[(b * h, splits)](
        query,
        keys.packed,
        keys.scale,
        keys.zero,
        values.packed,
        values.scale,
        values.zero,
        mask,
        part_out,
        part_lse,
        *strides,
        float(scaling),
        n,
        h,
        g,
        d,
        key_group,
        value_group,
        blocks_per_split * block_n,
        BITS=bits,
        PER_WORD=per_word(bits),
        HAS_VALID=valid is not None,
        SYMMETRIC=symmetric,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4 if block_g * block_n * block_d <= SMALL_STEP else 8,
    )
    if splits > 1:
        kernels.combine_splits_kernel[(b * hq,)](
            part_out,
            part_lse,
            out,
            lse,
            *part_out.stride(),
            *part_lse.stride(),
            *out.stride(),
            *lse.stride(),
            hq,
            splits,
            d,
            BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_D=block_d,
        )
    return out, lse


def _default_splits(device: torch.device, rows: int, blocks: int) -> int:
    """Splits per (batch row, KV head): enough programs to fill the GPU (``rows = B * H`` is often below the
    number of SMs at decode), each with at least ``MIN_BLOCKS_PER_SPLIT`` blocks; 1 off CUDA."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = -(-PROGRAMS_PER_SM * sms // rows)
    return max(1, min(wanted, blocks // MIN_BLOCKS_PER_SPLIT))


def _kernel_dtypes(
    query: torch.Tensor, keys: Codes, values: Codes, interpreted: bool
) -> tuple[torch.Tensor, Codes, Codes]:
    """Inputs as the kernel loads them: every float is converted to fp32 in registers, except that the
    interpreter (numpy, no bfloat16) gets bf16 tensors converted to fp32 beforehand."""
    if not interpreted:
        return query, keys, values

    def fp32_if_bf16(x: torch.Tensor | None) -> torch.Tensor | None:
        return x.float() if x is not None and x.dtype == torch.bfloat16 else x

    return (
        fp32_if_bf16(query),
        Codes(keys.packed, fp32_if_bf16(keys.scale), fp32_if_bf16(keys.zero)),
        Codes(values.packed, fp32_if_bf16(values.scale), fp32_if_bf16(values.zero)),
    )
