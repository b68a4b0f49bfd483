"""Integer codes for keys and values: asymmetric min/max quantization, packed into int32 words.

The layout every quantized path shares (store, PyTorch reference, Triton kernel, saved caches):

- A value ``x`` of a group becomes ``code = round((x - zero) / scale)`` clamped to ``[0, 2**bits - 1]``, with
  ``zero = min`` and ``scale = (max - min) / (2**bits - 1)`` of the group, both stored in float16; reading
  gives ``code * scale + zero`` (computed in float32). A constant group has ``scale = 0`` and reads back
  exactly as its ``zero`` (up to float16 rounding).
- With ``scales="e4m3"`` a group is instead quantized symmetrically with one float8 (E4M3) scale and no zero
  point: ``code = round(x / scale - 0.5) + 2**(bits-1)``, clamped to ``[0, 2**bits - 1]``, reads back as
  ``(code - 2**(bits-1) + 0.5) * scale`` (a mid-rise quantizer: all ``2**bits`` levels are used, placed
  symmetrically about 0). ``scale = max |x| / (2**(bits-1) - 0.5)`` rounded up to the next E4M3 number, so no
  entry is clipped; its 8 bits per group instead of 32 take the metadata of a 32-wide group from 1 bit to
  0.25 bits per element (the shared 8-bit block scale of the microscaling formats, Rouhani et al.,
  "Microscaling Data Formats for Deep Learning", arXiv 2310.10537). A group whose ``max |x|`` needs a scale
  beyond E4M3's 448 is refused (``ValueError``).
- With ``scales="e4m3"`` and ``fit="mse"`` each group's scale is instead the candidate whose codes give the
  group the smallest squared error: the unclipped scale above, and 100% down to 40% of it in steps of 5%,
  each rounded to the nearest E4M3 number (neighbouring steps may round to the same number; a group of
  tiny entries may get scale 0 and read back as 0, when that errs least). Entries beyond the outer level
  are clipped to it. At 2 bits an unclipped grid spends its four levels on the group's extremes: on
  SmolLM2's rotated keys and values the fitted scale takes the KJV perplexity delta of 2-bit float8-scaled
  codes from +6.5 to +1.14, and to +0.99 with the normal levels below (``benchmarks/quantization.py``),
  though the latter loses the 4K needle that the clipped extremes carried (1 of 13 found). Clipping for the smallest
  error is the rounding-range search of weight quantizers (e.g. OmniQuant's learnable clipping, Shao et al.,
  arXiv 2308.13137, done here by a grid search per group at store time).
- With ``levels="normal"`` and asymmetric codes the ``2**bits`` codes of a group stand for non-uniformly
  spaced levels between its min and max: ``code`` reads back as ``table[code] * scale + zero``, where
  ``table`` (in code units, ``table[0] = 0`` and ``table[-1] = 2**bits - 1``, denser near the middle) holds
  the Lloyd-Max levels of a min/max-normalized group of ``n`` Gaussian entries (``n`` = the group's entries:
  ``group`` tokens for a key channel, the value group's channels for a value). A value takes the nearest
  level. The table is a function of ``(bits, n)`` only (:func:`level_table`), computed on first use and
  never stored with the codes. Non-uniform datatypes are KVQuant's (Hooper et al., arXiv 2401.18079, which
  calibrates one per layer; a fixed normal-derived grid is the NormalFloat idea of QLoRA, Dettmers et al.,
  arXiv 2305.14314): activations are bell-shaped, so levels spent near the group's middle cut the error
  where most entries lie, while the exact endpoints keep the extremes.
- With ``levels="normal"`` and symmetric codes (``scales="e4m3"``) the levels are the Lloyd-Max quantizer of
  the standard normal law in units of the scale (at 2 bits: +-0.453 and +-1.510), the table written in code
  units (the level plus ``2**(bits-1) - 0.5``) so the mid-rise formula above reads it back. They suit
  Gaussian-like entries (the Hadamard basis makes them so) with a fitted scale (``fit="mse"``); with
  ``fit="absmax"`` the outer level lands on the group's largest magnitude, far from where most entries lie.
- Codes are packed along the head dimension into int32 words, ``32 // bits`` codes per word (16 at 2 bits,
  10 at 3 bits, 8 at 4 bits, 4 at 8 bits); channel ``d`` lives in word ``d // per_word`` at bit
  ``(d % per_word) * bits``. No code straddles a word, so 3-bit codes waste 2 bits per word.
- Keys are quantized per channel over ``group`` consecutive tokens (KIVI: key outliers are channel-wise):
  ``scale``/``zero`` ``[B, H, N / group, D]``. Values are quantized per token over ``group`` consecutive
  channels: ``scale``/``zero`` ``[B, H, N, D / group]``. Codes are ``[B, H, N, ceil(D / per_word)]``.

KIVI: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv 2402.02750.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16
SCALE_FORMATS = ("fp16", "e4m3")  # asymmetric with float16 scale and zero | symmetric with a float8 scale
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
LEVELS = ("uniform", "normal")  # where a group's 2**bits codes sit between its min and max
FITS = ("absmax", "mse")  # how a symmetric group's float8 scale is chosen (module docstring)
MSE_FRACTIONS = tuple(1.0 - 0.05 * i for i in range(13))  # fit="mse": candidate scales, shares of the unclipped one


def per_word(bits: int) -> int:
    """Codes packed into one int32 word."""
    return 32 // bits


def words(dim: int, bits: int) -> int:
    """int32 words holding ``dim`` codes."""
    return -(-dim // per_word(bits))


def check_bits(bits) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")


def check_scales(scales) -> None:
    if scales not in SCALE_FORMATS:
        raise ValueError(f"scales must be one of {', '.join(SCALE_FORMATS)}, got {scales!r}")


def check_levels(levels) -> None:
    if levels not in LEVELS:
        raise ValueError(f"levels must be one of {', '.join(LEVELS)}, got {levels!r}")


def check_fit(fit) -> None:
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")


@functools.cache
def _gaussian_levels(bits: int) -> tuple[float, ...]:
    """The Lloyd-Max levels of the standard normal law for ``2**bits`` levels, ascending, in standard
    deviations: Lloyd's iteration on the exact law (each level the mean of the normal law between the
    midpoints around it, ``(pdf(a) - pdf(b)) / (cdf(b) - cdf(a))``), from the law's quantiles at
    ``(i + 0.5) / 2**bits``, until no level moves by 1e-10: 2 to 4 bits converge (float32-equal to the
    published tables). Lloyd's iteration crawls at 256 levels: at 8 bits it stops after 20,000 steps with
    its outermost levels up to 0.035 standard deviations from the fixed point (still ascending and
    symmetric: a valid, slightly sub-optimal grid)."""
    count = 1 << bits
    levels = torch.special.ndtri((torch.arange(count, dtype=torch.float64) + 0.5) / count)
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    for _ in range(20_000):
        edges = torch.cat([-inf, (levels[1:] + levels[:-1]) / 2, inf])
        pdf = torch.exp(-(edges**2) / 2) / (2 * torch.pi) ** 0.5
        cdf = torch.special.ndtr(edges)
        new = (pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1])
        moved = float((new - levels).abs().max())
        levels = new
        if moved < 1e-10:
            break
    return tuple(levels.tolist())


@functools.cache
def _normal_levels(bits: int, n: int) -> tuple[float, ...]:
    """Lloyd-Max levels (code units) for the entries of min/max-normalized groups of ``n`` i.i.d. standard
    normal values, the two ends pinned at 0 and ``2**bits - 1`` (every group holds its own min and max).

    The groups are deterministic: ``m`` unscrambled Sobol points in ``n`` dimensions (the all-zero first point
    dropped) mapped through the normal quantile function, so the table is the same on every machine. Lloyd's
    iteration (each level the mean of the entries nearest to it) runs until no level moves by 1e-7."""
    top = (1 << bits) - 1
    if n < 3:  # every entry is its group's min or max: only the ends are ever used
        return tuple(float(c) for c in range(top + 1))
    m = max(256, (1 << 18) // n)
    points = torch.quasirandom.SobolEngine(n, scramble=False).draw(m + 1, dtype=torch.float64)[1:]
    x = torch.special.ndtri(points)  # [m, n]
    low, high = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    t = ((x - low) / (high - low)).flatten() * top
    t = torch.cat([t, top - t])  # the normal law is symmetric: so are its levels
    levels = torch.arange(top + 1, dtype=torch.float64)
    for _ in range(500):
        nearest = torch.bucketize(t, (levels[1:] + levels[:-1]) / 2)
        count = torch.bincount(nearest, minlength=top + 1)
        mean = torch.zeros(top + 1, dtype=torch.float64).index_add_(0, nearest, t) / count.clamp(min=1)
        new = torch.where(count > 0, mean, levels)
        new[0], new[-1] = 0.0, float(top)
        moved = float((new - levels).abs().max())
        levels = new
        if moved < 1e-7:
            break
    return tuple(levels.tolist())


def level_table(levels: str, bits: int, n: int, device=None, scales: str = "fp16") -> torch.Tensor | None:
    """The float32 table ``code -> level`` (code units) of ``levels`` for groups of ``n`` entries coded with
    ``scales`` (asymmetric fp16: min/max-normalized levels; symmetric e4m3: the normal law's levels, for any
    ``n``); None for uniform levels (a code reads as itself)."""
    check_levels(levels)
    check_bits(bits)
    check_scales(scales)
    if levels == "uniform":
        return None
    if scales == "e4m3":
        shift = (1 << (bits - 1)) - 0.5
        return torch.tensor([v + shift for v in _gaussian_levels(bits)], dtype=torch.float32, device=device)
    return torch.tensor(_normal_levels(bits, n), dtype=torch.float32, device=device)


ROTATIONS = ("none", "hadamard")  # a basis change of the head dimension before quantization


def check_rotate(rotate) -> None:
    if rotate not in ROTATIONS:
        raise ValueError(f"rotate must be one of {', '.join(ROTATIONS)}, got {rotate!r}")


def check_hadamard_dim(dim: int) -> None:
    """Refuse a head dimension the Sylvester-Hadamard construction cannot reach (not a power of two)."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(
            f"rotate=hadamard needs a power-of-two head dimension, got {dim}; use rotate=none for this model"
        )


def hadamard(dim: int, device=None) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order ``dim`` (a power of two), float32: symmetric and its
    own inverse. Multiplying a head's keys or values by it before quantization spreads a channel's outliers
    over every channel (QuaRot, Ashkboos et al., arXiv 2404.00456), and multiplying the read-back by it again
    undoes the change of basis exactly (up to float32 rounding)."""
    check_hadamard_dim(dim)
    h = torch.ones(1, 1, dtype=torch.float32, device=device)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / dim**0.5


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
    """Packed codes of one tensor with their float16 ``scale``/``zero`` (see module docstring), and optional
    full-precision outliers (KVQuant's dense-and-sparse split): per key group of ``group`` tokens or per
    value token, ``outlier_index`` (int16, flat index within the group's ``group x D`` or the token's ``D``
    entries) and ``outlier_value`` (float16), ``[B, H, N / group | N, count]``."""

    packed: torch.Tensor  # [B, H, N, W] int32
    scale: torch.Tensor  # keys: [B, H, N / group, D]; values: [B, H, N, D / group]
    zero: torch.Tensor | None = None  # None: symmetric codes with a float8 scale (``scales="e4m3"``)
    outlier_index: torch.Tensor | None = None
    outlier_value: torch.Tensor | None = None

    def fields(self) -> dict[str, torch.Tensor]:
        names = ("packed", "scale", "zero", "outlier_index", "outlier_value")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.fields().values())


def _minmax_codes(
    x: torch.Tensor, bits: int, dim: int, valid: torch.Tensor | None = None, table: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of ``x`` with min/max taken over ``dim`` (kept as size 1) among ``valid`` entries (a group with
    none reads back as 0); scale and zero in float16. ``table``: non-uniform levels (code units), each entry
    taking the nearest."""
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
    units = torch.where(s > 0, (x - z) / torch.where(s > 0, s, 1.0), 0.0)
    codes = units.round().clamp(0, levels) if table is None else _nearest_level(units, table)
    return codes.to(torch.int32), scale, zero


def round_up_e4m3(x: torch.Tensor) -> torch.Tensor:
    """The smallest float8 E4M3 numbers ``>= x`` (``x`` float32, ``0 <= x <= 448``)."""
    near = x.to(E4M3)
    low = near.float() < x
    # A non-negative E4M3 number's bits read as uint8 grow with its value: +1 is the next number up.
    up = (near.view(torch.uint8) + low.to(torch.uint8)).view(E4M3)
    return up


def _symmetric_codes(
    x: torch.Tensor,
    bits: int,
    dim: int,
    valid: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    fit: str = "absmax",
) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Symmetric codes of ``x`` over ``dim`` (kept as size 1) among ``valid`` entries with a float8 E4M3
    scale (module docstring): mid-rise uniform levels, or ``table`` (code units); the scale unclipped
    (``fit="absmax"``, rounded up) or the candidate with the smallest squared error (``fit="mse"``)."""
    half = 1 << (bits - 1)
    top = half - 0.5 if table is None else float(table[-1]) - (half - 0.5)  # the outer level, in scale units
    x = x.float()
    mag = x.abs() if valid is None else x.abs().masked_fill(~valid, 0.0)
    wanted = mag.amax(dim, keepdim=True) / top
    if bool((wanted > E4M3_MAX).any()):
        raise ValueError(
            f"a group's largest magnitude ({float(wanted.max()) * top:.4g}) needs a scale above "
            f"float8 E4M3's {E4M3_MAX:g}; use scales=fp16 for this model"
        )
    scale = round_up_e4m3(wanted)
    s = scale.float()
    codes = _symmetric_nearest(x, s, half, table)
    if fit == "absmax":
        return codes, scale, None
    best = _squared_error(x, codes, s, bits, dim, valid, table)
    for share in MSE_FRACTIONS[1:]:
        candidate = (wanted * share).to(E4M3)  # nearest E4M3 number; clipping is the point here
        s = candidate.float()
        c = _symmetric_nearest(x, s, half, table)
        err = _squared_error(x, c, s, bits, dim, valid, table)
        better = err < best
        scale = torch.where(better, candidate, scale)
        codes = torch.where(better, c, codes)
        best = torch.minimum(err, best)
    return codes, scale, None


def _symmetric_nearest(x: torch.Tensor, s: torch.Tensor, half: int, table: torch.Tensor | None) -> torch.Tensor:
    """Each entry's nearest symmetric level with scale ``s`` (a zero scale: the code nearest 0)."""
    ratio = torch.where(s > 0, x / torch.where(s > 0, s, 1.0), 0.0)  # in scale units
    if table is None:
        return ((ratio - 0.5).round() + half).clamp(0, 2 * half - 1).to(torch.int32)
    return _nearest_level(ratio + (half - 0.5), table).to(torch.int32)  # the table is in code units


def _nearest_level(units: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The code of ``table``'s level nearest to each of ``units`` (code units)."""
    return torch.bucketize(units, ((table[1:] + table[:-1]) / 2).to(units.device))


def _squared_error(x, codes, s, bits: int, dim: int, valid, table) -> torch.Tensor:
    """Per-group sum over ``dim`` of the squared error of ``codes`` read back with scale ``s``."""
    err = (_dequantize(_as_levels(codes, table), s, None, bits) - x) ** 2
    if valid is not None:
        err = err.masked_fill(~valid, 0.0)
    return err.sum(dim, keepdim=True)


def _codes(x, bits: int, dim: int, valid, scales: str, table: torch.Tensor | None = None, fit: str = "absmax"):
    check_fit(fit)
    if scales == "e4m3":
        return _symmetric_codes(x, bits, dim, valid, table, fit)
    if fit != "absmax":
        raise ValueError(f"fit={fit} chooses float8 scales of symmetric codes (scales=e4m3)")
    return _minmax_codes(x, bits, dim, valid, table)


def _levels_of(packed: torch.Tensor, bits: int, dim: int, table: torch.Tensor | None) -> torch.Tensor:
    """Unpacked codes as float32 levels in code units (the codes themselves for uniform levels)."""
    return _as_levels(unpack(packed, bits, dim), table)


def _as_levels(codes: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """Integer codes as float32 levels in code units (the codes themselves for uniform levels)."""
    return codes.float() if table is None else table.to(codes.device)[codes.long()]


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``q`` (float levels in code units) read back with ``scale``/``zero`` already expanded to its shape."""
    if zero is None:
        return (q - ((1 << (bits - 1)) - 0.5)) * scale
    return q * scale + zero


def outlier_count(fraction: float, entries: int) -> int:
    """Outliers kept per group of ``entries`` values (at least one when ``fraction > 0``)."""
    return 0 if fraction <= 0 else max(1, round(fraction * entries))


def _outliers(flat: torch.Tensor, score: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` entries of each row of ``flat [..., E]`` with the highest ``score``: their index (int16)
    and float16 value."""
    index = score.topk(count, dim=-1).indices  # [..., count]
    return index.to(torch.int16), flat.gather(-1, index).to(SCALE_DTYPE)


def _not_outliers(shape: torch.Size, index: torch.Tensor, device) -> torch.Tensor:
    keep = torch.ones(*shape, dtype=torch.bool, device=device)
    return keep.scatter(-1, index.long(), False)


def quantize_keys(
    keys: torch.Tensor,
    bits: int,
    group: int,
    valid: torch.Tensor | None = None,
    outliers: float = 0.0,
    scales: str = "fp16",
    table: torch.Tensor | None = None,
    fit: str = "absmax",
) -> Codes:
    """Per-channel codes of ``keys [B, H, N, D]`` over groups of ``group`` tokens (``N % group == 0``).
    ``valid [B, 1 | H, N]``: tokens that set each group's range (padding must not widen it). ``outliers``:
    fraction of each group's entries kept apart in float16 (the largest deviations from their channel's mean
    over the group, in channel standard deviations); they do not widen the range either. ``scales`` and
    ``table`` (non-uniform levels, :func:`level_table`) and ``fit`` (how float8 scales are chosen): see the
    module docstring."""
    b, h, n, d = keys.shape
    if n % group:
        raise ValueError(f"keys are quantized in groups of {group} tokens; got {n} tokens")
    grouped = keys.float().reshape(b, h, n // group, group, d)
    mask = None if valid is None else valid.reshape(b, valid.shape[1], n // group, group, 1)  # [B, 1 | H, N/g, g, 1]
    count, index, value = outlier_count(outliers, group * d), None, None
    if count:
        mean, std = grouped.mean(3, keepdim=True), grouped.std(3, keepdim=True, correction=0)
        score = ((grouped - mean).abs() / (std + 1e-6)).reshape(b, h, n // group, group * d)
        if mask is not None:
            score = score.masked_fill(~mask.expand(b, h, -1, -1, d).reshape(score.shape), -1.0)
        index, value = _outliers(grouped.reshape(score.shape), score, count)  # [B, H, N/g, count]
        inliers = _not_outliers(score.shape, index, keys.device).view(grouped.shape)
        mask = inliers if mask is None else inliers & mask
    # codes [B, H, N/g, g, D]; scale and zero [B, H, N/g, 1, D]
    codes, scale, zero = _codes(grouped, bits, 3, mask, scales, table, fit)
    zero = None if zero is None else zero.squeeze(3)
    return Codes(pack(codes.reshape(b, h, n, d), bits), scale.squeeze(3), zero, index, value)


def quantize_values(
    values: torch.Tensor,
    bits: int,
    group: int,
    outliers: float = 0.0,
    scales: str = "fp16",
    table: torch.Tensor | None = None,
    fit: str = "absmax",
) -> Codes:
    """Per-token codes of ``values [B, H, N, D]`` over groups of ``group`` channels (``D % group == 0``);
    ``outliers``: fraction of each token's entries kept apart in float16 (largest deviations from the token's
    mean, in standard deviations); ``table``: non-uniform levels (:func:`level_table`); ``fit``: how float8
    scales are chosen (module docstring)."""
    b, h, n, d = values.shape
    if d % group:
        raise ValueError(f"group size {group} does not divide the head dimension {d}")
    flat = values.float()
    count, index, value, mask = outlier_count(outliers, d), None, None, None
    if count:
        score = (flat - flat.mean(-1, keepdim=True)).abs() / (flat.std(-1, keepdim=True, correction=0) + 1e-6)
        index, value = _outliers(flat, score, count)  # [B, H, N, count]
        mask = _not_outliers(flat.shape, index, values.device).view(b, h, n, d // group, group)
    grouped = flat.reshape(b, h, n, d // group, group)
    codes, scale, zero = _codes(grouped, bits, 4, mask, scales, table, fit)  # codes [B, H, N, D/g, g]
    zero = None if zero is None else zero.squeeze(4)
    return Codes(pack(codes.reshape(b, h, n, d), bits), scale.squeeze(4), zero, index, value)


def dequantize_keys(codes: Codes, bits: int, group: int, dim: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 keys ``[B, H, N, D]`` from per-channel codes (``table``: the levels they were coded with)."""
    q = _levels_of(codes.packed, bits, dim, table)  # [B, H, N, D]
    b, h, n, d = q.shape
    scale = codes.scale.float().repeat_interleave(group, dim=2)  # [B, H, N, D]
    zero = None if codes.zero is None else codes.zero.float().repeat_interleave(group, dim=2)
    out = _dequantize(q, scale, zero, bits)
    if codes.outlier_index is not None:
        flat = out.view(b, h, n // group, group * d)  # [B, H, N/g, g*D]
        flat.scatter_(-1, codes.outlier_index.long(), codes.outlier_value.float())
    return out


def dequantize_values(codes: Codes, bits: int, group: int, dim: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 values ``[B, H, N, D]`` from per-token codes (``table``: the levels they were coded with)."""
    q = _levels_of(codes.packed, bits, dim, table)
    scale = codes.scale.float().repeat_interleave(group, dim=3)  # [B, H, N, D]
    zero = None if codes.zero is None else codes.zero.float().repeat_interleave(group, dim=3)
    out = _dequantize(q, scale, zero, bits)
    if codes.outlier_index is not None:
        out.scatter_(-1, codes.outlier_index.long(), codes.outlier_value.float())
    return out
