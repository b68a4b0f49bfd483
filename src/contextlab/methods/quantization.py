"""KV-cache quantization: methods that choose a quantized store (they take the storage role, so they
compose with eviction and position remaps: ``snapkv:0.5+kivi:4``, ``adakv:0.75+kivi:2``).

The store (:mod:`contextlab.store.quantized`) holds old slots as packed integer codes with float16 scales
and zero points and keeps the newest ``residual`` slots in full precision; eviction runs first, on
full-precision keys, and quantization applies to what is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from contextlab.methods.base import STORAGE, Method, param
from contextlab.methods.positions import Rope
from contextlab.store import DenseStore, MemoryTracker
from contextlab.store.mixed import MixedStore
from contextlab.store.quantized import QuantizedStore, QuantSpec

LEVELS_HELP = (
    "'uniform': codes evenly spaced between a group's min and max; 'normal': Lloyd-Max levels for a "
    "min/max-normalized group of Gaussian entries, denser near the middle (KVQuant's non-uniform datatype, "
    "fixed instead of calibrated); with scales=e4m3, the normal law's Lloyd-Max levels in units of the scale"
)
FIT_HELP = (
    "with scales=e4m3: 'absmax' (the scale covers the group's largest magnitude, nothing clipped) or 'mse' "
    "(the float8 scale, from the largest magnitude down to 40% of it, with the smallest squared error)"
)
ROTATE_HELP = (
    "'none', or 'hadamard': keys and values quantized in a Hadamard-rotated basis of the head dimension "
    "(QuaRot), rotated back when read; needs a power-of-two head dimension"
)
SINK_HELP = (
    "first valid tokens kept exact, outside their key group's range (attention sinks; IntactKV, arXiv 2403.01241)"
)


@dataclass(frozen=True, eq=False)
class KIVI(Method):
    """KIVI: keys quantized per channel over groups of ``group`` tokens, values per token over groups of
    ``group`` channels, asymmetric min/max codes; the newest ``residual`` tokens stay in full precision and
    are quantized a group at a time as they age (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit
    Quantization for KV Cache", arXiv 2402.02750; the paper uses group 32 and residual 128).

    Bytes per cached element: ``bits`` plus, on average over keys and values, ``16 / group + 16 /
    value_group`` bits of float16 scales and zero points (5 bits at 4 bits / group 32; 4.375 with
    ``group=128`` on a 64-dim head, whose values then take one scale per token), plus the full-precision
    window. ``value_group`` defaults to ``min(group, head dim)``, so a key group longer than the head works.

    ``scales="e4m3"`` trades KIVI's asymmetric codes for symmetric ones with one float8 scale per group and no
    zero point (the 8-bit shared block scale of the microscaling formats, Rouhani et al., arXiv 2310.10537):
    ``8 / group + 8 / value_group`` bits of metadata instead of ``32 / group + 32 / value_group`` on average
    over keys and values, so 4.25 bits per element at 4 bits / group 32 (0.266 of bf16) and 2.25 at 2 bits
    (0.141), at the cost of a coarser grid for channels whose range is off-centre (KIVI's keys). The fused
    decode kernel reads either layout.

    ``sink=S`` keeps the first ``S`` valid tokens' keys and values exact and out of their key group's range
    (the "preserve first N" of IntactKV, Liu et al., arXiv 2403.01241, and KVSink, arXiv 2508.04257): the
    first token is the attention sink of most LLMs and its keys are outliers in many channels. Not part of
    KIVI, so off by default here; ``S * (2 * D * itemsize + 4)`` bytes per head.

    ``levels="normal"`` places the codes non-uniformly: between each group's min and max (see ``kvquant``),
    or with ``scales="e4m3"`` on the normal law's Lloyd-Max levels in units of the scale;
    ``rotate="hadamard"`` quantizes keys and values after multiplying them by the orthonormal Hadamard
    matrix of the head dimension (and multiplies the read-back by it again), which spreads outlier channels
    over all channels (QuaRot, Ashkboos et al., arXiv 2404.00456). Neither is part of KIVI; codes with
    either are read through a dequantized copy rather than the fused kernel.

    ``fit="mse"`` (with ``scales="e4m3"``) picks each group's float8 scale for the smallest squared error,
    clipping the group's extremes, instead of covering its largest magnitude; with ``levels="normal"`` the
    codes sit on the normal law's Lloyd-Max levels. In the Hadamard basis, where entries are near-Gaussian,
    ``kivi:bits=2,scales=e4m3,sink=1,levels=normal,rotate=hadamard,fit=mse`` holds 2.25 bits per element
    (0.141 of bf16 before the full-precision window) at a KJV perplexity delta of +0.99 on SmolLM2-135M,
    against +6.5 with unclipped uniform levels (``benchmarks/quantization.py``); but clipping spends the
    extremes that retrieval reads: on the 4K single needle it finds 1 of the 13 needles full attention finds
    (4 bits with normal levels and ``fit="mse"``: 11 of 13; uniform levels with ``absmax``: 13), hence
    ``absmax`` stays the default. Uniform levels with
    ``fit="mse"`` keep the fused kernel's layout."""

    name = "kivi"
    paper = "https://arxiv.org/abs/2402.02750"
    roles: ClassVar[frozenset[str]] = frozenset({STORAGE})
    positional: ClassVar[str | None] = "bits"
    bits: int = param("bits per code: 2, 3, 4 or 8", 4)
    group: int = param("tokens per key scale; also channels per value scale unless value_group is set", 32)
    value_group: int | None = param("channels per value scale (must divide the head dim); None = min(group, dim)", None)
    residual: int = param("newest tokens kept in full precision", 128)
    scales: str = param(
        "'fp16': asymmetric codes, float16 scale and zero per group (KIVI); 'e4m3': symmetric codes, one float8 "
        "scale per group (a quarter of the metadata)",
        "fp16",
    )
    sink: int = param(SINK_HELP, 0)
    levels: str = param(LEVELS_HELP, "uniform")
    rotate: str = param(ROTATE_HELP, "none")
    fit: str = param(FIT_HELP, "absmax")

    def __post_init__(self) -> None:
        self.spec()  # validates

    def spec(self) -> QuantSpec:
        return QuantSpec(
            self.bits,
            self.group,
            self.residual,
            value_group=self.value_group,
            scales=self.scales,
            sink=self.sink,
            levels=self.levels,
            rotate=self.rotate,
            fit=self.fit,
        )

    def make_store(self, tracker: MemoryTracker, rope: Rope | None = None) -> DenseStore:
        return QuantizedStore(self.spec(), tracker, rope)


@dataclass(frozen=True, eq=False)
class KVQuant(Method):
    """KVQuant's training-free parts: keys quantized per channel BEFORE RoPE (pre-RoPE keys have stable
    per-channel ranges; rotary mixing spreads them), values per token, and a dense-and-sparse split that
    keeps the ``outliers`` fraction of each group's entries (the largest deviations) in float16 so they do not
    stretch the quantization range (Hooper et al., "KVQuant: Towards 10 Million Context Length LLM Inference
    with KV Cache Quantization", arXiv 2401.18079; "< 0.1 perplexity degradation with 3-bit").

    Keys are cached post-RoPE by the model; when slots are quantized they are rotated back to position 0,
    and rotated forward again when read (exact up to float32 rounding).

    Non-uniform levels (``levels="normal"``, the default): the paper's third part is a non-uniform datatype,
    k-means centroids fitted per layer offline to sensitivity-weighted calibration activations. Here the
    ``2**bits`` levels between each group's min and max are the Lloyd-Max levels of a min/max-normalized
    group of Gaussian entries (a fixed table per bit width and group size, no calibration; the normal-law
    grid is QLoRA's NormalFloat idea, arXiv 2305.14314), denser near the middle where most entries lie. On
    SmolLM2-135M at 3 bits they take the KJV perplexity delta from +0.134 (uniform) to +0.091, and at 2 bits
    from +1.38 to +1.16 (``benchmarks/quantization.py``, 12 windows); fitting the levels to each layer's own
    prompt keys and values (plain k-means, no sensitivity weights) did worse than this fixed table in a
    six-window diagnostic (+0.071 against +0.037; uniform +0.082). Not implemented: offline per-channel
    scales (ranges here are per group of ``group`` tokens, computed online) and Q-Norm. Like ``kivi``, the
    newest ``residual`` tokens stay in full precision.
    The first ``sink`` valid tokens (default 1, the attention sink) keep exact keys and values and stay out of
    their group's range (IntactKV, arXiv 2403.01241; the "preserve first N" baseline that KVSink, arXiv
    2508.04257, compares against on KVQuant): on SmolLM2-135M at 3 bits this takes the perplexity delta
    from +0.19 to +0.13 (``benchmarks/quantization.py``). Reads go through a dequantized copy (the fused
    decode kernel reads post-RoPE codes without outliers)."""

    name = "kvquant"
    paper = "https://arxiv.org/abs/2401.18079"
    roles: ClassVar[frozenset[str]] = frozenset({STORAGE})
    positional: ClassVar[str | None] = "bits"
    bits: int = param("bits per code: 2, 3, 4 or 8", 3)
    group: int = param("tokens per key scale; also channels per value scale unless value_group is set", 32)
    value_group: int | None = param("channels per value scale (must divide the head dim); None = min(group, dim)", None)
    residual: int = param("newest tokens kept in full precision", 128)
    outliers: float = param("fraction of entries per group kept in float16 (dense-and-sparse)", 0.01)
    sink: int = param(SINK_HELP, 1)
    levels: str = param(LEVELS_HELP, "normal")
    rotate: str = param(ROTATE_HELP, "none")

    def __post_init__(self) -> None:
        self.spec()

    def spec(self) -> QuantSpec:
        return QuantSpec(
            self.bits,
            self.group,
            self.residual,
            self.outliers,
            pre_rope=True,
            value_group=self.value_group,
            sink=self.sink,
            levels=self.levels,
            rotate=self.rotate,
        )

    @property
    def needs_rope(self) -> bool:
        return True

    def make_store(self, tracker: MemoryTracker, rope: Rope | None = None) -> DenseStore:
        return QuantizedStore(self.spec(), tracker, rope)


@dataclass(frozen=True, eq=False)
class ZipCache(Method):
    """ZipCache: mixed precision by saliency. Tokens are ranked by their normalized attention (attention
    received from probe queries divided by how many probes could see them, so causal masking does not
    favour early tokens); the ``salient`` share of each batch of quantized tokens keeps ``high`` bits, the
    rest ``low`` bits. Keys use the channel-separable token-wise quantizer (channels divided by
    ``sqrt(max |k|)`` over ``group`` tokens, then each token quantized over its channels); values per token
    over ``group`` channels (He et al., "ZipCache: Accurate and Efficient KV Cache Quantization with Salient
    Token Identification", arXiv 2405.14256; "4.98x" compression, "0.38%" drop on GSM8k with Mistral-7B).

    Probes: the last 5% and a random 5% of each forward's queries (at least 32 each). Decode tokens are
    scored by each new query over the full-precision window only (cheaper than the paper's periodic
    re-scoring). ``salient=0.4`` is our default (about 3.2 bits per element at 4/2 bits, the paper's ~5x)."""

    name = "zipcache"
    paper = "https://arxiv.org/abs/2405.14256"
    roles: ClassVar[frozenset[str]] = frozenset({STORAGE})
    high: int = param("bits of salient tokens", 4)
    low: int = param("bits of the other tokens", 2)
    salient: float = param("share of tokens kept at high precision", 0.4)
    keys: str = param(
        "key quantizer: 'tokenwise' (the paper's channel-separable token-wise) or 'channel' (KIVI-style per "
        "channel over groups of each tier's tokens; salient tokens then chosen a group at a time)",
        "tokenwise",
    )
    group: int = param("tokens per key channel normalizer; also channels per value scale unless value_group", 32)
    value_group: int | None = param("channels per value scale (must divide the head dim); None = min(group, dim)", None)
    residual: int = param("newest tokens kept in full precision", 128)

    def __post_init__(self) -> None:
        if self.keys not in ("tokenwise", "channel"):
            raise ValueError(f"keys must be 'tokenwise' or 'channel', got {self.keys!r}")
        self.spec()

    def spec(self) -> QuantSpec:
        return QuantSpec(
            self.high,
            self.group,
            self.residual,
            value_group=self.value_group,
            low_bits=self.low,
            salient=self.salient,
            tokenwise_keys=self.keys == "tokenwise",
        )

    def make_store(self, tracker: MemoryTracker, rope: Rope | None = None) -> DenseStore:
        return MixedStore(self.spec(), tracker, rope)
