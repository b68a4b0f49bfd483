"""Triton bodies of the quantized decode attention (launcher: ``quant_attention_triton.py``).

Decomposition (flash-decoding): program ``(b * H + h, split)`` owns KV head ``h`` of batch row ``b`` and the
``G`` query heads that read it, over one contiguous range of token blocks. It loads the packed int32 codes
and float16 scale/zero of a block of ``BLOCK_N`` tokens, unpacks and dequantizes them in registers (never
in memory), and folds them into an online softmax for all ``G`` heads at once, so each code is read once
per step whatever ``G``. Each split writes its normalised partial output and log-sum-exp;
:func:`combine_splits_kernel` merges the splits of one query head by their log-sum-exp.

Channel ``d`` of a token lives in word ``d // PER_WORD`` at bit ``(d % PER_WORD) * BITS``; each channel
loads its word (neighbouring channels hit the same cache line), shifts and masks. Keys read their
scale/zero row ``token // KEY_GROUP``, so a block need not align with key groups. With G <= 8 the logits
are tiny mat-vecs, computed as broadcast products and sums in fp32 rather than ``tl.dot`` (which would pad
``G`` to 16 rows and, in fp32, not use tensor cores anyway).

With ``SYMMETRIC`` (``scales="e4m3"`` codes) each group has one float8 E4M3 scale and no zero point: the
launcher passes the scales as their bytes, decoded here with integer arithmetic (:func:`e4m3_to_float`, so
the interpreter, which has no float8, runs the same code), and a code reads back as
``(code - 2**(BITS-1) + 0.5) * scale``; the zero pointer is then unused.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton decides at decoration time, from this variable, whether the kernels below run interpreted (on CPU).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@triton.jit
def e4m3_to_float(byte):
    """Float32 value of float8 E4M3 (``fn``) bytes held in int32, sign ignored (scales are non-negative):
    ``(8 + mantissa) * 2**(exponent - 10)``, or ``mantissa * 2**-9`` for subnormals (exponent 0)."""
    exponent = (byte >> 3) & 15
    mantissa = (byte & 7).to(tl.float32)
    normal = (8.0 + mantissa) * tl.exp2((exponent - 10).to(tl.float32))
    return tl.where(exponent > 0, normal, mantissa * 0.001953125)


@triton.jit
def dequantize_tile(codes, scale_ptrs, zero_ptrs, mask, MIDDLE, SYMMETRIC: tl.constexpr):
    """Float32 values of a tile of integer ``codes``: ``code * scale + zero`` (float16 scale and zero at
    ``scale_ptrs`` / ``zero_ptrs``), or with ``SYMMETRIC`` ``(code - MIDDLE) * scale`` (float8 scale bytes at
    ``scale_ptrs``; ``zero_ptrs`` unused)."""
    if SYMMETRIC:
        scale_bytes = tl.load(scale_ptrs, mask=mask, other=0).to(tl.int32)
        return (codes.to(tl.float32) - MIDDLE) * e4m3_to_float(scale_bytes)
    scale = tl.load(scale_ptrs, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zero_ptrs, mask=mask, other=0.0).to(tl.float32)
    return codes.to(tl.float32) * scale + zero


@triton.jit
def quantized_decode_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, valid_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kcb, stride_kch, stride_kcn, stride_kcw,
    stride_ksb, stride_ksh, stride_ksn, stride_ksd,
    stride_kzb, stride_kzh, stride_kzn, stride_kzd,
    stride_vcb, stride_vch, stride_vcn, stride_vcw,
    stride_vsb, stride_vsh, stride_vsn, stride_vsd,
    stride_vzb, stride_vzh, stride_vzn, stride_vzd,
    stride_mb, stride_mh, stride_mn,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    scale, N, KV_HEADS, GROUPS, HEAD_DIM, KEY_GROUP, VALUE_GROUP, TOKENS_PER_SPLIT,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, HAS_VALID: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Partial ``out[b, hq, split, :]`` and ``lse[b, hq, split]`` of the ``G`` query heads of KV head ``h``
    over tokens ``split * TOKENS_PER_SPLIT ..`` (``out = 0``, ``lse = -inf`` where no token is valid)."""
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = (bh // KV_HEADS).to(tl.int64), (bh % KV_HEADS).to(tl.int64)  # int64: capacity buffers are large
    heads = tl.arange(0, BLOCK_G)  # [G] index within the group
    dims = tl.arange(0, BLOCK_D)  # [D]
    head_ok, dim_ok = heads < GROUPS, dims < HEAD_DIM
    hq = h * GROUPS + heads  # [G] query head
    q = tl.load(
        q_ptr + b * stride_qb + hq[:, None] * stride_qh + dims[None, :] * stride_qd,
        mask=head_ok[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(tl.float32)  # [G, D]
    word = dims // PER_WORD  # [D] word holding each channel's code
    shift = (dims % PER_WORD) * BITS  # [D] its bit offset
    value_meta = dims // VALUE_GROUP  # [D] scale/zero column of each channel's value group
    kc_row = kc_ptr + b * stride_kcb + h * stride_kch
    ks_row = ks_ptr + b * stride_ksb + h * stride_ksh
    kz_row = kz_ptr + b * stride_kzb + h * stride_kzh
    vc_row = vc_ptr + b * stride_vcb + h * stride_vch
    vs_row = vs_ptr + b * stride_vsb + h * stride_vsh
    vz_row = vz_ptr + b * stride_vzb + h * stride_vzh
    valid_row = valid_ptr + b * stride_mb + h * stride_mh

    MIDDLE = (1 << (BITS - 1)) - 0.5  # symmetric codes: the code that reads back as 0 (between two levels)
    row_max = tl.full([BLOCK_G], -1.0e30, tl.float32)  # finite start: no (-inf) - (-inf) on empty blocks
    row_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    first = split * TOKENS_PER_SPLIT
    last = tl.minimum(first + TOKENS_PER_SPLIT, N)
    for start in range(first, last, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)  # [N]
        token_ok = tokens < last
        tile_ok = token_ok[:, None] & dim_ok[None, :]  # [N, D]
        # Keys: per-channel scale/zero of the token's key group.
        key_words = tl.load(kc_row + tokens[:, None] * stride_kcn + word[None, :] * stride_kcw, mask=tile_ok, other=0)
        # Mask after the (arithmetic) shift: at 8 bits the top code sits in the sign bit.
        key_codes = (key_words >> shift[None, :]) & ((1 << BITS) - 1)  # [N, D]
        groups = tokens // KEY_GROUP  # [N]
        k_meta = groups[:, None] * stride_ksn + dims[None, :] * stride_ksd  # [N, D] scale offsets
        k_zero = groups[:, None] * stride_kzn + dims[None, :] * stride_kzd
        k = dequantize_tile(key_codes, ks_row + k_meta, kz_row + k_zero, tile_ok, MIDDLE, SYMMETRIC)  # [N, D]
        logits = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, N]
        attend = token_ok
        if HAS_VALID:
            attend = attend & (tl.load(valid_row + tokens * stride_mn, mask=token_ok, other=0) != 0)
        # where (not an additive mask): ignored tokens may hold garbage scales that dequantize to NaN.
        logits = tl.where(attend[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))  # [G]
        rescale = tl.exp(row_max - new_max)  # [G]
        probs = tl.exp(logits - new_max[:, None])  # [G, N]; 0 on ignored tokens
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        # Values: per-token scale/zero of the channel's value group.
        value_words = tl.load(vc_row + tokens[:, None] * stride_vcn + word[None, :] * stride_vcw, mask=tile_ok, other=0)
        value_codes = (value_words >> shift[None, :]) & ((1 << BITS) - 1)  # [N, D]
        v_meta = tokens[:, None] * stride_vsn + value_meta[None, :] * stride_vsd
        v_zero = tokens[:, None] * stride_vzn + value_meta[None, :] * stride_vzd
        v = dequantize_tile(value_codes, vs_row + v_meta, vz_row + v_zero, tile_ok, MIDDLE, SYMMETRIC)  # [N, D]
        v = tl.where(attend[:, None], v, 0.0)  # a zero probability times a NaN garbage value is still NaN
        acc = acc * rescale[:, None] + tl.sum(probs[:, :, None] * v[None, :, :], axis=1)  # [G, D]
        row_max = new_max

    seen = row_sum > 0
    denominator = tl.where(seen, row_sum, 1.0)
    out = tl.where(seen[:, None], acc / denominator[:, None], 0.0)  # [G, D]
    lse = tl.where(seen, row_max + tl.log(denominator), float("-inf"))  # [G]
    tl.store(
        out_ptr + b * stride_ob + hq[:, None] * stride_oh + split * stride_os + dims[None, :] * stride_od,
        out,
        mask=head_ok[:, None] & dim_ok[None, :],
    )
    tl.store(lse_ptr + b * stride_lb + hq * stride_lh + split * stride_ls, lse, mask=head_ok)


@triton.jit
def combine_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_qb, stride_qh, stride_qs,
    stride_ob, stride_oh, stride_od,
    stride_lb, stride_lh,
    QUERY_HEADS, SPLITS, HEAD_DIM,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``out[b, hq]`` and ``lse[b, hq]`` from the ``SPLITS`` partials of query head ``hq``, weighted by
    ``exp(lse_split - lse)``; a split that saw no token (``-inf``) weighs 0."""
    bq = tl.program_id(0)
    b, hq = (bq // QUERY_HEADS).to(tl.int64), (bq % QUERY_HEADS).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)  # [S]
    dims = tl.arange(0, BLOCK_D)  # [D]
    split_ok, dim_ok = splits < SPLITS, dims < HEAD_DIM
    part_lse = tl.load(
        part_lse_ptr + b * stride_qb + hq * stride_qh + splits * stride_qs, mask=split_ok, other=float("-inf")
    )  # [S]
    top = tl.max(part_lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: weights exp(-inf) = 0, no NaN
    weights = tl.exp(part_lse - top)  # [S]
    total = tl.sum(weights, axis=0)
    part_out = tl.load(
        part_out_ptr + b * stride_pb + hq * stride_ph + splits[:, None] * stride_ps + dims[None, :] * stride_pd,
        mask=split_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [S, D]; empty splits wrote zeros
    seen = total > 0
    denominator = tl.where(seen, total, 1.0)
    out = tl.sum(weights[:, None] * part_out, axis=0) / denominator  # [D]
    lse = tl.where(seen, top + tl.log(denominator), float("-inf"))
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + dims * stride_od, out, mask=dim_ok)
    tl.store(lse_ptr + b * stride_lb + hq * stride_lh, lse)
