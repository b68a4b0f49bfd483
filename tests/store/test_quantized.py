"""The quantized store: old slots become codes a group at a time, the newest ``residual`` stay exact,
reads give back the dequantized codes, bytes count codes + scales + the full-precision window, eviction
after quantization re-quantizes what it keeps, and the buffers stay bounded while decoding."""

from __future__ import annotations

import pytest
import torch

from contextlab.methods.positions import Rope, rotate
from contextlab.store import MemoryTracker
from contextlab.store.codec import (
    dequantize_keys,
    dequantize_values,
    hadamard,
    level_table,
    quantize_keys,
    quantize_values,
    words,
)
from contextlab.store.quantized import QuantizedStore, QuantSpec

B, H, D = 2, 3, 16


def _tokens(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, D, generator=gen), torch.randn(B, H, n, D, generator=gen)


def _filled(spec: QuantSpec, n: int, tracker: MemoryTracker | None = None) -> tuple[QuantizedStore, tuple]:
    store = QuantizedStore(spec, tracker)
    keys, values = _tokens(n)
    store.reserve(n)
    store.append(keys, values)
    store.settle()
    return store, (keys, values)


def _expected_bytes(spec: QuantSpec, quantized: int, tail: int, itemsize: int = 4) -> int:
    """Bytes of one all-heads group: codes, float16 scale + zero of keys (per group of tokens) and values
    (per group of channels), or one float8 scale each with ``scales="e4m3"``, and the full-precision tail."""
    codes = 2 * quantized * words(D, spec.bits) * 4
    per_group = 2 * 2 if spec.scales == "fp16" else 1
    scales = per_group * (quantized // spec.group * D + quantized * D // spec.group)
    return B * H * (codes + scales + tail * 2 * D * itemsize)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_prompt_is_quantized_in_whole_groups_beyond_the_residual(bits):
    spec = QuantSpec(bits=bits, group=8, residual=12)
    store, (keys, values) = _filled(spec, 50)
    g = store.groups[0]
    assert g.quantized == 32 and g.tail == 18 and g.length == 50  # 50 - 12 = 38 -> 4 whole groups of 8
    k, v = g.used()
    expect_k = dequantize_keys(quantize_keys(keys[:, :, :32], bits, 8), bits, 8, D)
    expect_v = dequantize_values(quantize_values(values[:, :, :32], bits, 8), bits, 8, D)
    assert torch.equal(k[:, :, :32], expect_k) and torch.equal(v[:, :, :32], expect_v)
    assert torch.equal(k[:, :, 32:], keys[:, :, 32:]) and torch.equal(v[:, :, 32:], values[:, :, 32:])
    assert store.used_bytes() == _expected_bytes(spec, 32, 18)


@pytest.mark.parametrize("bits", [2, 4])
def test_float8_scales_hold_a_quarter_of_the_metadata_and_read_back_their_codes(bits):
    spec = QuantSpec(bits=bits, group=8, residual=12, scales="e4m3")
    store, (keys, values) = _filled(spec, 50)
    g = store.groups[0]
    kc, vc = g.prefix.codes()
    assert kc.zero is None and vc.zero is None and kc.scale.dtype == torch.float8_e4m3fn
    k, v = g.used()
    expect_k = dequantize_keys(quantize_keys(keys[:, :, :32], bits, 8, scales="e4m3"), bits, 8, D)
    expect_v = dequantize_values(quantize_values(values[:, :, :32], bits, 8, scales="e4m3"), bits, 8, D)
    assert torch.equal(k[:, :, :32], expect_k) and torch.equal(v[:, :, :32], expect_v)
    assert torch.equal(k[:, :, 32:], keys[:, :, 32:])
    assert store.used_bytes() == _expected_bytes(spec, 32, 18)
    # the same slots with float16 scale + zero points: four times the metadata, the same codes
    fp16 = _filled(QuantSpec(bits=bits, group=8, residual=12), 50)[0]
    float8_scales = B * H * (32 // 8 * D + 32 * D // 8)
    assert fp16.used_bytes() - store.used_bytes() == 3 * float8_scales


@pytest.mark.parametrize("levels", ["uniform", "normal"])
def test_fitted_float8_scales_code_and_read_at_the_bytes_of_unclipped_ones(levels):
    spec = QuantSpec(bits=2, group=8, residual=12, scales="e4m3", levels=levels, fit="mse")
    store, (keys, values) = _filled(spec, 50)
    g = store.groups[0]
    assert g.prefix.direct_read == (levels == "uniform")  # uniform codes keep the fused kernel's layout
    table = level_table(levels, 2, 8, scales="e4m3")
    k, v = g.used()
    codes = quantize_keys(keys[:, :, :32], 2, 8, scales="e4m3", table=table, fit="mse")
    expect_v = quantize_values(values[:, :, :32], 2, 8, scales="e4m3", table=table, fit="mse")
    assert torch.equal(k[:, :, :32], dequantize_keys(codes, 2, 8, D, table))
    assert torch.equal(v[:, :, :32], dequantize_values(expect_v, 2, 8, D, table))
    assert torch.equal(k[:, :, 32:], keys[:, :, 32:])
    assert store.used_bytes() == _expected_bytes(spec, 32, 18)  # the same bytes as unclipped float8 scales
    unclipped = _filled(QuantSpec(bits=2, group=8, residual=12, scales="e4m3", levels=levels), 50)[0]
    err = [(s.groups[0].used()[0][:, :, :32] - keys[:, :, :32]).pow(2).sum() for s in (store, unclipped)]
    assert err[0] < err[1]


@pytest.mark.parametrize("pre_rope", [False, True])
def test_normal_levels_code_and_read_with_the_same_tables_at_the_same_bytes(pre_rope):
    spec = QuantSpec(bits=3, group=8, residual=12, levels="normal", pre_rope=pre_rope)
    store = QuantizedStore(spec, rope=_rope())
    keys, values = _tokens(50)
    store.reserve(50)
    store.append(keys, values)
    store.settle()
    g = store.groups[0]
    assert not g.prefix.direct_read  # the fused kernel reads uniform codes only
    k, v = g.used()
    table = level_table("normal", 3, 8)
    at_zero = rotate(keys[:, :, :32], -torch.arange(32).expand(B, H, 32), _rope()) if pre_rope else keys[:, :, :32]
    expect_k = dequantize_keys(quantize_keys(at_zero, 3, 8, table=table), 3, 8, D, table)
    if pre_rope:
        expect_k = rotate(expect_k, torch.arange(32).expand(B, H, 32), _rope())
    expect_v = dequantize_values(quantize_values(values[:, :, :32], 3, 8, table=table), 3, 8, D, table)
    assert torch.allclose(k[:, :, :32], expect_k, atol=1e-5) and torch.equal(v[:, :, :32], expect_v)
    assert torch.equal(k[:, :, 32:], keys[:, :, 32:])
    uniform = QuantizedStore(QuantSpec(bits=3, group=8, residual=12, pre_rope=pre_rope), rope=_rope())
    uniform.reserve(50)
    uniform.append(keys, values)
    uniform.settle()
    assert store.used_bytes() == uniform.used_bytes()  # the table is a function of the spec, never stored
    assert not torch.equal(uniform.groups[0].used()[1][:, :, :32], v[:, :, :32])


@pytest.mark.parametrize("pre_rope", [False, True])
def test_hadamard_rotation_codes_the_rotated_basis_and_reads_back_in_the_models(pre_rope):
    spec = QuantSpec(bits=2, group=8, residual=12, rotate="hadamard", pre_rope=pre_rope, outliers=0.01 * pre_rope)
    store = QuantizedStore(spec, rope=_rope())
    keys, values = _tokens(50)
    keys[:, :, :, 5] *= 30.0  # an outlier channel, as in real keys
    store.append(keys, values)
    store.settle()
    g = store.groups[0]
    assert not g.prefix.direct_read
    k, v = g.used()
    h, n = hadamard(D), torch.arange(32).expand(B, H, 32)
    at_zero = rotate(keys[:, :, :32], -n, _rope()) if pre_rope else keys[:, :, :32]
    expect_k = dequantize_keys(quantize_keys(at_zero @ h, 2, 8, outliers=spec.outliers), 2, 8, D) @ h
    if pre_rope:
        expect_k = rotate(expect_k, n, _rope())
    expect_v = dequantize_values(quantize_values(values[:, :, :32] @ h, 2, 8, outliers=spec.outliers), 2, 8, D) @ h
    assert torch.allclose(k[:, :, :32], expect_k, atol=1e-4) and torch.allclose(v[:, :, :32], expect_v, atol=1e-5)
    assert torch.equal(k[:, :, 32:], keys[:, :, 32:]) and torch.equal(v[:, :, 32:], values[:, :, 32:])
    plain = QuantizedStore(
        QuantSpec(bits=2, group=8, residual=12, pre_rope=pre_rope, outliers=spec.outliers), rope=_rope()
    )
    plain.append(keys, values)
    plain.settle()
    assert store.used_bytes() == plain.used_bytes()  # the basis follows from the head dimension: no bytes


def test_hadamard_rotation_needs_a_power_of_two_head():
    store = QuantizedStore(QuantSpec(group=8, rotate="hadamard"))
    keys = torch.randn(1, 1, 4, 24)
    with pytest.raises(ValueError, match="rotate=hadamard needs a power-of-two head dimension, got 24"):
        store.append(keys, keys)


def test_a_prompt_within_the_residual_is_kept_exactly():
    store, (keys, values) = _filled(QuantSpec(bits=2, group=8, residual=64), 50)
    k, v = store.groups[0].used()
    assert store.groups[0].prefix is None and torch.equal(k, keys) and torch.equal(v, values)


def test_decoding_quantizes_a_group_at_a_time_and_keeps_the_buffers_bounded():
    spec = QuantSpec(bits=4, group=8, residual=8)
    tracker = MemoryTracker()
    store, _ = _filled(spec, 40, tracker)
    keys, values = _tokens(100, seed=1)
    store.reserve(140)
    for i in range(100):
        store.append(keys[:, :, i : i + 1], values[:, :, i : i + 1])
        store.settle()
        g = store.groups[0]
        assert spec.residual <= g.tail < spec.residual + spec.group and g.quantized % spec.group == 0
        assert g.capacity <= store.window + 64  # never the whole sequence in full precision
    assert g.length == 140 and g.quantized == 128
    k, _ = g.used()
    assert torch.equal(k[:, :, -12:], keys[:, :, -12:])  # the newest residual + partial group are exact
    assert tracker.current == store.nbytes()
    assert store.used_bytes() == _expected_bytes(spec, 128, 12)


def test_eviction_after_quantization_keeps_the_chosen_slots_and_requantizes():
    spec = QuantSpec(bits=8, group=8, residual=8)
    store, _ = _filled(spec, 48)
    before = store.view()
    keep = torch.arange(0, 48, 2).expand(B, H, -1)  # every other slot
    store.keep(keep, torch.ones_like(keep, dtype=torch.bool))
    store.settle()
    after = store.view()
    assert after.length == 24 and store.groups[0].quantized == 16
    assert torch.equal(after.positions.expand(B, H, -1), keep)
    # Kept slots read back within one more 8-bit step of what they read before.
    assert (after.keys - before.keys[:, :, ::2]).abs().max() < 0.05
    assert torch.equal(after.values[:, :, -8:], before.values[:, :, -16::2])  # still in full precision


def test_ragged_heads_each_quantize_their_own_slots():
    spec = QuantSpec(bits=4, group=8, residual=4)
    store, _ = _filled(spec, 40)
    counts = torch.tensor([40, 20, 12])
    idx = torch.stack([torch.arange(40) for _ in range(H)])  # [H, 40]
    kept = torch.arange(40).view(1, -1) < counts.view(-1, 1)
    store.keep(idx.expand(B, H, -1), kept.expand(B, H, -1))
    store.settle()
    assert sorted((g.num_heads, g.length, g.quantized) for g in store.groups) == [(1, 12, 8), (1, 20, 16), (1, 40, 32)]
    view = store.view()
    assert (view.valid.expand(B, H, -1).sum(-1)[0] == counts).all()


def test_padding_validity_travels_into_the_codes():
    spec = QuantSpec(bits=4, group=8, residual=0)
    store = QuantizedStore(spec)
    keys, values = _tokens(16)
    store.append(keys, values)
    valid = torch.ones(B, 16, dtype=torch.bool)
    valid[1, :5] = False  # row 1 is left-padded
    store.mark_new(16, valid, None)
    store.settle()
    assert store.groups[0].tail == 0 and torch.equal(store.view().valid[:, 0], valid)
    assert torch.equal(store.view().positions[1, 0, 5:], torch.arange(11))


def test_batch_reordering_moves_the_codes():
    store, _ = _filled(QuantSpec(bits=4, group=8, residual=8), 40)
    before = store.view().keys
    store.map_batch(lambda t: t.flip(0))
    assert torch.equal(store.view().keys, before.flip(0))


def test_crop_cannot_reach_quantized_slots():
    store, _ = _filled(QuantSpec(bits=4, group=8, residual=8), 40)
    store.fresh = 40  # as if nothing had been evicted since the prompt
    with pytest.raises(ValueError, match="already quantized"):
        store.crop(20)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bits=5), "bits must be one of 2, 3, 4, 8, got 5"),
        (dict(group=0), "group must be an integer >= 1, got 0"),
        (dict(residual=-1), "residual must be an integer >= 0, got -1"),
        (dict(scales="fp8"), "scales must be one of fp16, e4m3, got 'fp8'"),
        (dict(scales="e4m3", outliers=0.01), "scales=e4m3 is implemented for plain per-group codes"),
        (dict(levels="nf"), "levels must be one of uniform, normal, got 'nf'"),
        (dict(levels="normal", low_bits=2), "levels=normal is implemented for codes of one precision tier"),
        (dict(fit="l2"), "fit must be one of absmax, mse, got 'l2'"),
        (dict(fit="mse"), "fit=mse chooses float8 scales: it needs scales=e4m3"),
        (dict(rotate="random"), "rotate must be one of none, hadamard, got 'random'"),
        (dict(rotate="hadamard", low_bits=2), "rotate=hadamard is implemented for one precision tier"),
    ],
)
def test_bad_specs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_group_must_divide_the_head_dimension():
    store = QuantizedStore(QuantSpec(group=12))
    with pytest.raises(ValueError, match="group 12 does not divide the head dimension 16"):
        store.append(*_tokens(4))


def _rope(d: int = D) -> Rope:
    return Rope(1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float) / d)))


def test_pre_rope_keys_are_quantized_at_position_zero_and_read_back_rotated():
    # Keys whose pre-RoPE value is the same at every position: constant per channel before RoPE, so a
    # pre-RoPE group is exact at any bit width, while post-RoPE (KIVI) groups spread over the rotation.
    rope, n = _rope(), 48
    base = torch.tensor([0.5, -1.25, 2.0, 0.75] * (D // 4)).view(1, 1, 1, D).expand(B, H, n, D)
    keys = rotate(base, torch.arange(n).view(1, 1, n), rope)
    values = torch.zeros(B, H, n, D)
    errors = {}
    for pre_rope in (True, False):
        store = QuantizedStore(QuantSpec(bits=2, group=16, residual=0, pre_rope=pre_rope), rope=rope)
        store.append(keys, values)
        store.settle()
        assert store.groups[0].quantized == n
        errors[pre_rope] = (store.view().keys - keys).abs().max().item()
    assert errors[True] < 1e-5 < 0.1 < errors[False]


def test_pre_rope_positions_follow_padding_and_eviction():
    rope = _rope()
    spec = QuantSpec(bits=8, group=8, residual=0, pre_rope=True)
    store = QuantizedStore(spec, rope=rope)
    pos = torch.tensor([[0] * 4 + list(range(20)), list(range(24))])  # row 0 has four padding slots
    base = torch.randn(B, H, 1, D).expand(B, H, 24, D)
    keys = rotate(base, pos.view(B, 1, 24), rope)
    store.append(keys, torch.zeros_like(keys))
    valid = torch.ones(B, 24, dtype=torch.bool)
    valid[0, :4] = False
    store.mark_new(24, valid, None)
    store.settle()
    view = store.view()
    assert (view.keys - keys)[:, :, :].masked_select(view.valid[..., None]).abs().max() < 0.05
    keep = torch.arange(8, 24).expand(B, H, -1)  # evict the oldest slots: explicit positions from now on
    store.keep(keep, torch.ones_like(keep, dtype=torch.bool))
    store.settle()
    assert (store.view().keys - keys[:, :, 8:]).abs().max() < 0.05


def test_outliers_are_kept_apart_and_do_not_stretch_the_range():
    keys, values = _tokens(32)
    keys[0, 1, 5, 3] = 50.0  # one huge entry
    values[1, 2, 7, 9] = -40.0
    plain = QuantizedStore(QuantSpec(bits=3, group=16, residual=0))
    sparse = QuantizedStore(QuantSpec(bits=3, group=16, residual=0, outliers=0.01))
    for store in (plain, sparse):
        store.append(keys, values)
        store.settle()
    k_plain, _ = plain.groups[0].used()
    k_sparse, v_sparse = sparse.groups[0].used()
    assert k_sparse[0, 1, 5, 3] == 50.0 and v_sparse[1, 2, 7, 9] == -40.0  # float16 holds them exactly
    # The rest of the spiked key channel keeps its resolution only with the outlier set apart.
    rest = torch.ones(16, dtype=torch.bool)
    rest[5] = False
    err_plain = (k_plain[0, 1, :16, 3] - keys[0, 1, :16, 3])[rest].abs().max()
    err_sparse = (k_sparse[0, 1, :16, 3] - keys[0, 1, :16, 3])[rest].abs().max()
    assert err_sparse < err_plain / 5
    key_count, value_count = 3, 1  # round(1% of 16 x 16), at least one of 16 channels
    extra = B * H * 4 * (2 * key_count + 32 * value_count)  # int16 index + float16 value each
    assert sparse.used_bytes() - plain.used_bytes() == extra


def test_a_key_group_longer_than_the_head_gives_values_one_scale_per_token():
    spec = QuantSpec(bits=4, group=32, residual=0)  # D = 16: values grouped over all 16 channels
    store, _ = _filled(spec, 64)
    prefix = store.groups[0].prefix
    assert prefix.channels == 16 and prefix.buffers["value.scale"].shape[-1] == 1
    assert prefix.buffers["key.scale"].shape[2] * 32 == prefix.capacity
    split = QuantizedStore(QuantSpec(bits=4, group=32, residual=0, value_group=4))
    split.append(*_tokens(64))
    split.settle()
    assert split.groups[0].prefix.buffers["value.scale"].shape[-1] == 4
    assert split.used_bytes() - store.used_bytes() == B * H * 64 * 2 * 2 * 3  # three more scale+zero pairs


def _with_loud_first_token(n: int, scale: float = 50.0) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = _tokens(n)
    keys[:, :, 0] *= scale  # an attention sink: an outlier in every channel
    values[:, :, 0] *= scale
    return keys, values


def test_sink_slots_stay_exact_and_out_of_their_key_groups_range():
    keys, values = _with_loud_first_token(40)
    errors = {}
    for sink in (0, 1):
        store = QuantizedStore(QuantSpec(bits=4, group=8, residual=8, sink=sink))
        store.append(keys, values)
        store.settle()
        k, v = store.groups[0].used()
        if sink:
            assert torch.equal(k[:, :, 0], keys[:, :, 0]) and torch.equal(v[:, :, 0], values[:, :, 0])
            assert (store.groups[0].prefix.sink_slots == 0).all()
        errors[sink] = (k[:, :, 1:8] - keys[:, :, 1:8]).abs().max()  # the sink's key group, without it
    # without the sink in the range, the group's step is about 50 times finer
    assert errors[1] < errors[0] / 10
    expect = dequantize_keys(quantize_keys(keys[:, :, 8:32], 4, 8), 4, 8, D)
    assert torch.equal(k[:, :, 8:32], expect)  # later groups are untouched


def test_sink_slots_count_their_exact_bytes():
    spec = QuantSpec(bits=4, group=8, residual=12, sink=2)
    store = _filled(spec, 50)[0]
    assert store.used_bytes() == _expected_bytes(spec, 32, 18) + B * H * 2 * (2 * D * 4 + 4)


def test_sinks_skip_left_padding_even_across_appends():
    spec = QuantSpec(bits=4, group=8, residual=0, sink=2)
    store = QuantizedStore(spec)
    keys, values = _tokens(24)
    valid = torch.ones(B, 24, dtype=torch.bool)
    valid[1, :11] = False  # row 1: its first valid slot is 11, in the second group
    for start in (0, 8, 16):  # three forwards of 8 slots, each quantized after it
        store.append(keys[:, :, start : start + 8], values[:, :, start : start + 8])
        store.mark_new(8, valid[:, start : start + 8], None)
        store.settle()
    prefix = store.groups[0].prefix
    assert prefix.sink_slots[0].tolist() == [[0, 1]] * H and prefix.sink_slots[1].tolist() == [[11, 12]] * H
    k, v = store.groups[0].used()
    for row, slots in ((0, [0, 1]), (1, [11, 12])):
        assert torch.equal(k[row, :, slots], keys[row, :, slots]) and torch.equal(
            v[row, :, slots], values[row, :, slots]
        )


def test_sinks_follow_batch_reordering_and_a_saved_prefix():
    store = QuantizedStore(QuantSpec(bits=4, group=8, residual=8, sink=1))
    keys, values = _with_loud_first_token(40)
    store.append(keys, values)
    store.settle()
    before = store.view().keys
    store.map_batch(lambda t: t.flip(0))
    assert torch.equal(store.view().keys, before.flip(0))
    meta, tensors = store.export()
    again = QuantizedStore(QuantSpec(bits=4, group=8, residual=8, sink=1))
    again.restore(meta, tensors)
    assert torch.equal(again.view().keys, store.view().keys) and again.used_bytes() == store.used_bytes()
    other = QuantizedStore(QuantSpec(bits=4, group=8, residual=8, sink=2))
    with pytest.raises(ValueError, match="saved slots hold 1 exact sink slots; this method keeps 2"):
        other.restore(meta, tensors)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sink=-1), "sink must be an integer >= 0, got -1"),
        (dict(sink=True), "sink must be an integer >= 0, got True"),
        (dict(sink=1, low_bits=2), "exact sink slots are implemented for one precision tier"),
    ],
)
def test_bad_sink_counts_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_codes_take_int16_positions_and_widen_them_with_the_buffers():
    spec = QuantSpec(bits=8, group=8, residual=8)
    tracker = MemoryTracker()
    store, _ = _filled(spec, 48, tracker)
    keep = torch.arange(0, 48, 2).expand(B, H, -1)
    store.keep(keep, torch.ones_like(keep, dtype=torch.bool))
    store.settle()
    prefix = store.groups[0].prefix
    assert prefix.positions.dtype == torch.int16 and store.groups[0].positions.dtype == torch.int16
    keys, values = _tokens(8, seed=5)
    store.append(keys, values)
    far = torch.arange(40_000, 40_008).expand(B, 8)
    store.mark_new(8, None, far, largest=40_007)
    store.settle()  # the newest slots push 8 older ones into the codes
    assert store.groups[0].positions.dtype == torch.int32 and prefix.positions.dtype == torch.int32
    assert torch.equal(store.view().positions.expand(B, H, -1), torch.cat([keep, far[:, None].expand(B, H, 8)], -1))
    assert tracker.current == store.nbytes()
