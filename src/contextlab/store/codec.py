"""Integer codes for keys and values: asymmetric min/max quantization, packed into int32 words.

The layout every quantized path shares (store, PyTorch reference, Triton kernel, saved caches):

- A value ``x`` of a group becomes ``code = round((x - zero) / scale)`` clamped to ``[0, 2**bits - 1]``, with
  ``zero = min`` and ``scale = (max - min) / (2**bits - 1)`` of the group, both stored in float16; reading
  gives ``code * scale + zero`` (computed in float32). A constant group has ``scale = 0`` and reads back
  exactly as its ``zero`` (up to float16 rounding).
- Codes are packed along the head dimension into int32 words, ``32 // bits`` codes per word (16 at 2 bits,
  10 at 3 bits, 8 at 4 bits, 4 at 8 bits); channel ``d`` lives in word ``d // per_word`` at bit
  ``(d % per_word) * bits``. No code straddles a word, so 3-bit codes waste 2 bits per word.
- Keys are quantized per channel over ``group`` consecutive tokens (KIVI: key outliers are channel-wise):
  ``scale``/``zero`` ``[B, H, N / group, D]``. Values are quantized per token over ``group`` consecutive
  channels: ``scale``/``zero`` ``[B, H, N, D / group]``. Codes are ``[B, H, N, ceil(D / per_word)]``.

KIVI: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv 2402.02750.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16


def per_word(bits: int) -> int:
    """Codes packed into one int32 word."""
    return 32 // bits


def words(dim: int, bits: int) -> int:
    """int32 words holding ``dim`` codes."""
    return -(-dim // per_word(bits))


def check_bits(bits) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes [..., D]`` (integers in ``[0, 2**bits)``) as int32 words ``[..., ceil(D / per_word)]``."""
    check_bits(bits)
    n, d = per_word(bits), codes.shape[-1]
    w = words(d, bits)
    padded = torch.zeros(*codes.shape[:-1], w * n, dtype=torch.int32, device=codes.device)
    padded[..., :d] = codes
    shifts = torch.arange(n, device=codes.device, dtype=torch.int32) * bits  # [per_word]
    # Bits never overlap, so summing the shifted codes is an OR; int32 wraps into the sign bit at 8 bits.
    return (padded.view(*codes.shape[:-1], w, n) << shifts).sum(-1, dtype=torch.int32)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 ``[..., W]`` to codes ``[..., dim]`` (int32)."""
    check_bits(bits)
    n = per_word(bits)
    shifts = torch.arange(n, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., W, per_word]
    return codes.flatten(-2)[..., :dim]


@dataclass
class Codes:
    """Packed codes of one tensor with their float16 ``scale``/``zero`` (see module docstring)."""

    packed: torch.Tensor  # [B, H, N, W] int32
    scale: torch.Tensor  # keys: [B, H, N / group, D]; values: [B, H, N, D / group]
    zero: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes + self.zero.nbytes


def _minmax_codes(
    x: torch.Tensor, bits: int, dim: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of ``x`` with min/max taken over ``dim`` (kept as size 1) among ``valid`` entries (a group with
    none reads back as 0); scale and zero in float16."""
    levels = (1 << bits) - 1
    x = x.float()
    if valid is None:
        low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    else:
        low = x.masked_fill(~valid, float("inf")).amin(dim, keepdim=True)
        high = x.masked_fill(~valid, float("-inf")).amax(dim, keepdim=True)
        empty = low > high
        low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
    zero = low.to(SCALE_DTYPE)
    scale = ((high - low) / levels).to(SCALE_DTYPE)
    s, z = scale.float(), zero.float()
    # A constant group (scale 0) gets code 0; dividing by 1 there avoids 0/0.
    codes = torch.where(s > 0, ((x - z) / torch.where(s > 0, s, 1.0)).round(), 0.0).clamp(0, levels)
    return codes.to(torch.int32), scale, zero


def quantize_keys(keys: torch.Tensor, bits: int, group: int, valid: torch.Tensor | None = None) -> Codes:
    """Per-channel codes of ``keys [B, H, N, D]`` over groups of ``group`` tokens (``N % group == 0``).
    ``valid [B, 1 | H, N]``: tokens that set each group's range (padding must not widen it)."""
    b, h, n, d = keys.shape
    if n % group:
        raise ValueError(f"keys are quantized in groups of {group} tokens; got {n} tokens")
    grouped = keys.reshape(b, h, n // group, group, d)
    mask = None if valid is None else valid.reshape(b, -1, n // group, group, 1)  # [B, 1 | H, N/g, g, 1]
    # codes [B, H, N/g, g, D]; scale and zero [B, H, N/g, 1, D]
    codes, scale, zero = _minmax_codes(grouped, bits, dim=3, valid=mask)
    return Codes(pack(codes.reshape(b, h, n, d), bits), scale.squeeze(3), zero.squeeze(3))


def quantize_values(values: torch.Tensor, bits: int, group: int) -> Codes:
    """Per-token codes of ``values [B, H, N, D]`` over groups of ``group`` channels (``D % group == 0``)."""
    b, h, n, d = values.shape
    if d % group:
        raise ValueError(f"group size {group} does not divide the head dimension {d}")
    grouped = values.reshape(b, h, n, d // group, group)
    codes, scale, zero = _minmax_codes(grouped, bits, dim=4)  # codes [B, H, N, D/g, g]; scale [B, H, N, D/g, 1]
    return Codes(pack(codes.reshape(b, h, n, d), bits), scale.squeeze(4), zero.squeeze(4))


def dequantize_keys(codes: Codes, bits: int, group: int, dim: int) -> torch.Tensor:
    """Float32 keys ``[B, H, N, D]`` from per-channel codes."""
    q = unpack(codes.packed, bits, dim).float()  # [B, H, N, D]
    b, h, n, d = q.shape
    scale = codes.scale.float().repeat_interleave(group, dim=2)  # [B, H, N, D]
    zero = codes.zero.float().repeat_interleave(group, dim=2)
    return (q * scale + zero).view(b, h, n, d)


def dequantize_values(codes: Codes, bits: int, group: int, dim: int) -> torch.Tensor:
    """Float32 values ``[B, H, N, D]`` from per-token codes."""
    q = unpack(codes.packed, bits, dim).float()
    scale = codes.scale.float().repeat_interleave(group, dim=3)  # [B, H, N, D]
    zero = codes.zero.float().repeat_interleave(group, dim=3)
    return q * scale + zero
