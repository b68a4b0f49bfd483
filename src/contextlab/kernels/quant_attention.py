"""Decode attention read straight from a quantized KV cache: one query per head against packed integer codes.

The cache holds keys and values in the format of :mod:`contextlab.store.codec` (KIVI-style asymmetric min/max
codes: keys per channel over groups of ``key_group`` tokens, values per token over groups of ``value_group``
channels, codes packed into int32 words along the head dim). The Triton backend dequantizes each block of
tokens in registers and folds it into an online softmax, so the dequantized cache never exists in memory;
long caches are split over the token axis and the partial results merged by their log-sum-exp
(flash-decoding). The reference dequantizes the whole cache with the codec and does plain fp32 math.

Shapes (``G = Hq // H`` query heads per KV head; query head ``j`` reads KV head ``j // G``, as in transformers):

- ``query``: ``[B, Hq, D]``, one decode query per query head (fp32, fp16 or bf16).
- ``keys``, ``values``: :class:`~contextlab.store.codec.Codes` of ``N`` tokens, ``packed`` ``[B, H, N, W]``
  int32; keys' ``scale``/``zero`` ``[B, H, N / key_group, D]``, values' ``[B, H, N, D / value_group]``.
  Symmetric codes (``scales="e4m3"``): float8 E4M3 ``scale`` and ``zero = None``, on both.
  They may be views sliced along dim 2 from larger capacity buffers: every path honours strides.
- ``valid``: ``[B, 1 | H, N]`` bool (False: the token is ignored) or None (all valid).
- results: ``out [B, Hq, D]`` float32, the softmax-weighted sum of dequantized values, and ``lse [B, Hq]``
  float32, the natural log-sum-exp of the scaled logits over valid tokens. A row that sees no valid token
  gets ``out = 0`` and ``lse = -inf``, so that :func:`merge_attention` can combine it with other parts.

KIVI: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv 2402.02750.
Flash-decoding: Dao, Haziza, Massa, Sizov, "Flash-Decoding for long-context inference" (2023).
"""

from __future__ import annotations

import torch

from contextlab.kernels._triton import triton_available
from contextlab.store.codec import E4M3, Codes, check_bits, dequantize_keys, dequantize_values, words

BACKENDS = ("auto", "reference", "triton")


def check_inputs(
    query: torch.Tensor,
    keys: Codes,
    values: Codes,
    valid: torch.Tensor | None,
    bits: int,
    key_group: int,
    value_group: int,
) -> None:
    """Raise ``ValueError`` naming the first problem with the shapes, dtypes or devices of the inputs."""
    check_bits(bits)
    if query.dim() != 3:
        raise ValueError(f"query must be [B, Hq, D]; got {tuple(query.shape)}")
    if not query.is_floating_point():
        raise ValueError(f"query must be floating point; got {query.dtype}")
    b, hq, d = query.shape
    for name, codes in (("keys", keys), ("values", values)):
        if codes.packed.dim() != 4 or codes.packed.dtype != torch.int32:
            raise ValueError(
                f"{name}.packed must be an int32 [B, H, N, W] tensor; got {codes.packed.dtype} "
                f"{tuple(codes.packed.shape)}"
            )
        if codes.zero is None:
            if codes.scale.dtype != E4M3:
                raise ValueError(f"{name} without zero points (symmetric codes) need float8 E4M3 scales")
        elif not (codes.scale.is_floating_point() and codes.zero.is_floating_point()):
            raise ValueError(f"{name}.scale and {name}.zero must be floating point")
    if (keys.zero is None) != (values.zero is None):
        raise ValueError("keys and values must both have zero points (float16 scales) or neither (float8 scales)")
    if keys.packed.shape != values.packed.shape:
        raise ValueError(
            f"keys and values hold different code shapes: {tuple(keys.packed.shape)} and {tuple(values.packed.shape)}"
        )
    bk, h, n, w = keys.packed.shape
    if bk != b:
        raise ValueError(f"batch sizes differ: query {b}, keys {bk}")
    if h == 0 or hq % h != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    if w != words(d, bits):
        raise ValueError(f"head dim {d} at {bits} bits packs into {words(d, bits)} int32 words; the codes hold {w}")
    if key_group < 1 or n % key_group != 0:
        raise ValueError(f"the number of tokens N ({n}) must be a multiple of key_group ({key_group})")
    if value_group < 1 or d % value_group != 0:
        raise ValueError(f"value_group ({value_group}) must divide the head dim ({d})")
    key_meta, value_meta = (b, h, n // key_group, d), (b, h, n, d // value_group)
    for name, codes, shape in (("keys", keys, key_meta), ("values", values, value_meta)):
        zero_shape = shape if codes.zero is None else tuple(codes.zero.shape)
        if tuple(codes.scale.shape) != shape or zero_shape != shape:
            raise ValueError(
                f"{name}.scale and {name}.zero must be {list(shape)}; got {tuple(codes.scale.shape)} and {zero_shape}"
            )
    if valid is not None:
        if valid.dim() != 3 or valid.shape[0] != b or valid.shape[1] not in (1, h) or valid.shape[2] != n:
            raise ValueError(f"valid must be [B={b}, 1 or H={h}, N={n}]; got {tuple(valid.shape)}")
        if valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor; got {valid.dtype}")
    tensors = [query, keys.packed, keys.scale, values.packed, values.scale]
    tensors += [t for t in (keys.zero, values.zero) if t is not None]
    devices = {t.device for t in [*tensors, *([] if valid is None else [valid])]}
    if len(devices) > 1:
        raise ValueError(f"inputs are on different devices: {sorted(map(str, devices))}")


def quantized_attention(
    query: torch.Tensor,
    keys: Codes,
    values: Codes,
    valid: torch.Tensor | None,
    *,
    bits: int,
    key_group: int,
    value_group: int,
    scaling: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, D], lse [B, Hq])`` float32: decode attention of ``query`` over the quantized cache
    (shapes in the module docstring).

    ``backend``: ``"reference"`` (codec dequantization, then plain fp32 math), ``"triton"`` (fused kernel;
    CUDA, or CPU under ``TRITON_INTERPRET=1``), or ``"auto"`` (Triton for CUDA tensors when triton imports,
    else the reference).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    check_inputs(query, keys, values, valid, bits, key_group, value_group)
    if backend == "auto":
        backend = "triton" if query.is_cuda and triton_available() else "reference"
    if backend == "reference":
        return quantized_attention_reference(
            query, keys, values, valid, bits=bits, key_group=key_group, value_group=value_group, scaling=scaling
        )
    from contextlab.kernels.quant_attention_triton import quantized_attention_triton

    return quantized_attention_triton(
        query, keys, values, valid, bits=bits, key_group=key_group, value_group=value_group, scaling=scaling
    )


def quantized_attention_reference(
    query: torch.Tensor,
    keys: Codes,
    values: Codes,
    valid: torch.Tensor | None,
    *,
    bits: int,
    key_group: int,
    value_group: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Readable reference for :func:`quantized_attention`: dequantize the whole cache, then a masked fp32
    softmax. Memory ``O(B * H * N * D)`` in fp32."""
    check_inputs(query, keys, values, valid, bits, key_group, value_group)
    (b, hq, d), (h, n) = query.shape, keys.packed.shape[1:3]
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=query.device)
    lse = torch.full((b, hq), float("-inf"), dtype=torch.float32, device=query.device)
    if n == 0 or b == 0:
        return out, lse
    k = dequantize_keys(keys, bits, key_group, d)  # [B, H, N, D]
    v = dequantize_values(values, bits, value_group, d)  # [B, H, N, D]
    q = query.float().reshape(b, h, hq // h, d)  # [B, H, G, D]
    logits = torch.einsum("bhgd,bhnd->bhgn", q, k) * scaling  # [B, H, G, N]
    if valid is not None:
        # masked_fill (not an additive mask): ignored tokens may hold garbage scales that dequantize to NaN.
        logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
        v = v.masked_fill(~valid[..., None], 0.0)  # no NaN * 0 from garbage values of ignored tokens
    lse = torch.logsumexp(logits, dim=-1)  # [B, H, G]; -inf where no token is valid
    seen = torch.isfinite(lse)
    probs = torch.exp(logits - torch.where(seen, lse, 0.0)[..., None])  # rows that see nothing: exp(-inf) = 0
    out = torch.einsum("bhgn,bhnd->bhgd", probs, v)  # [B, H, G, D]
    return out.reshape(b, hq, d), lse.reshape(b, hq)  # [B, Hq, D], [B, Hq]


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint token sets into the attention over their union.

    ``out_*``: ``[..., D]``, ``lse_*``: ``[...]``; returns float32 ``(out [..., D], lse [...])``. A side with
    ``lse = -inf`` (it saw no token) contributes nothing, whatever its ``out``; both sides ``-inf`` give
    ``out = 0`` and ``lse = -inf``.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:-1] != lse_a.shape:
        raise ValueError(
            f"expected out [..., D] and lse [...] of equal shapes on both sides; got out {tuple(out_a.shape)} and "
            f"{tuple(out_b.shape)}, lse {tuple(lse_a.shape)} and {tuple(lse_b.shape)}"
        )
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)  # -inf only where both sides are -inf
    base = torch.where(torch.isfinite(lse), lse, 0.0)  # avoids (-inf) - (-inf) = NaN
    weight_a, weight_b = torch.exp(lse_a - base), torch.exp(lse_b - base)  # [...]
    # where (not a product) so that a -inf side's out, possibly NaN or garbage, is never read.
    part_a = torch.where(weight_a[..., None] > 0, weight_a[..., None] * out_a.float(), 0.0)
    part_b = torch.where(weight_b[..., None] > 0, weight_b[..., None] * out_b.float(), 0.0)
    return part_a + part_b, lse


def dense_attention_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-precision part of a decode step, in the form :func:`merge_attention` takes: ``query
    [B, Hq, D]`` over ``keys``/``values [B, H, T, D]`` (``valid [B, 1 | H, T]`` or None); returns float32
    ``out [B, Hq, D]`` and ``lse [B, Hq]`` (-inf and 0 where no token is valid)."""
    (b, hq, d), h = query.shape, keys.shape[1]
    q = query.float().reshape(b, h, hq // h, d)  # [B, H, G, D]
    logits = torch.einsum("bhgd,bhtd->bhgt", q, keys.float()) * scaling  # [B, H, G, T]
    if valid is not None:
        logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, H, G]
    probs = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("bhgt,bhtd->bhgd", probs, values.float())  # [B, H, G, D]
    return out.reshape(b, hq, d), lse.reshape(b, hq)
