"""Packed integer codes: pack/unpack is exact, and a quantize/dequantize round trip errs by at most half a
quantization step (plus float16 rounding of scale and zero) at every bit width, over random shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contextlab.store.codec import (
    BITS,
    check_bits,
    dequantize_keys,
    dequantize_values,
    pack,
    quantize_keys,
    quantize_values,
    unpack,
    words,
)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim", [16, 30, 64, 128])
def test_pack_unpack_is_exact(bits, dim):
    codes = torch.randint(0, 1 << bits, (2, 3, 5, dim), dtype=torch.int32)
    packed = pack(codes, bits)
    assert packed.shape == (2, 3, 5, words(dim, bits)) and packed.dtype == torch.int32
    assert torch.equal(unpack(packed, bits, dim), codes)


def test_words_per_bit_width():
    assert [words(64, b) for b in BITS] == [4, 7, 8, 16]  # 16, 10, 8, 4 codes per int32 word


def _step_bound(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Half a step, plus what float16 rounding of the scale and zero can add across the code range."""
    magnitude = x.abs().amax() + 1.0
    return scale.float().amax() / 2 + 2e-3 * magnitude


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    groups=st.integers(1, 4),
    group=st.sampled_from([4, 8, 16, 32]),
    dim_groups=st.integers(1, 4),
    heads=st.integers(1, 3),
    spread=st.floats(0.01, 20.0),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_is_bounded(bits, groups, group, dim_groups, heads, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    n, d = groups * group, dim_groups * group
    x = torch.randn(2, heads, n, d, generator=gen) * spread
    keys = quantize_keys(x, bits, group)
    values = quantize_values(x, bits, group)
    assert keys.scale.shape == (2, heads, n // group, d) and values.scale.shape == (2, heads, n, d // group)
    back_k = dequantize_keys(keys, bits, group, d)
    back_v = dequantize_values(values, bits, group, d)
    assert (back_k - x).abs().max() <= _step_bound(x, keys.scale, keys.zero)
    assert (back_v - x).abs().max() <= _step_bound(x, values.scale, values.zero)


def test_error_halves_with_each_extra_bit():
    x = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    errors = [(dequantize_keys(quantize_keys(x, b, 32), b, 32, 64) - x).abs().mean().item() for b in BITS]
    assert errors[0] > 1.7 * errors[1] > 1.7**2 * errors[2] and errors[2] > 8 * errors[3]


def test_constant_groups_read_back_exactly():
    x = torch.full((1, 1, 32, 32), 0.75)
    assert torch.equal(dequantize_keys(quantize_keys(x, 2, 32), 2, 32, 32), x)
    assert torch.equal(dequantize_values(quantize_values(x, 2, 32), 2, 32, 32), x)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 8, got 5"):
        check_bits(5)
    with pytest.raises(ValueError, match="groups of 32 tokens; got 40 tokens"):
        quantize_keys(torch.zeros(1, 1, 40, 64), 4, 32)
    with pytest.raises(ValueError, match="group size 48 does not divide the head dimension 64"):
        quantize_values(torch.zeros(1, 1, 4, 64), 4, 48)


def test_padding_does_not_widen_a_key_group():
    x = torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(0))
    padded = x.clone()
    padded[:, :, :3] = 100.0  # three padding tokens with huge keys
    valid = torch.ones(1, 1, 8, dtype=torch.bool)
    valid[..., :3] = False
    masked = quantize_keys(padded, 4, 8, valid)
    lo, hi = x[:, :, 3:].amin(2), x[:, :, 3:].amax(2)
    assert torch.allclose(masked.zero[:, :, 0].float(), lo, atol=1e-3)
    assert torch.allclose((masked.zero + 15 * masked.scale)[:, :, 0].float(), hi, atol=1e-2)
    empty = quantize_keys(padded, 4, 8, torch.zeros_like(valid))
    assert torch.equal(empty.scale, torch.zeros_like(empty.scale)) and torch.equal(empty.zero, empty.scale)
