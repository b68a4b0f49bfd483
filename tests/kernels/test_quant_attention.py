"""Quantized decode attention: reference vs brute force, Triton (interpreted, CUDA) vs reference, LSE merging,
input checks."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import pytest
import torch

from contextlab.kernels.quant_attention import merge_attention, quantized_attention, quantized_attention_reference
from contextlab.store.codec import BITS, E4M3, Codes, dequantize_keys, dequantize_values, quantize_keys, quantize_values
from tests.kernels.interpreter import HAS_TRITON, run_interpreted

# Every path dequantizes exactly the same codes and computes in fp32; only summation orders differ.
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


@dataclass(frozen=True)
class Case:
    bits: int
    groups: int  # G query heads per KV head
    head_dim: int
    tokens: int  # N
    batch: int = 2
    kv_heads: int = 2
    key_group: int = 8
    value_group: int = 16
    valid_heads: int | None = 1  # Hv; None passes valid=None
    sliced: bool = False  # codes, query and valid are strided views into larger buffers
    garbage: bool = False  # NaN scale/zero on ignored tokens (an uninitialised capacity buffer)
    query_dtype: torch.dtype = torch.float32
    block_n: int | None = 16  # None with splits None: the public API and the launcher's defaults
    splits: int | None = 1
    scales: str = "fp16"  # "e4m3": symmetric codes, float8 scales, no zero points
    every_scale_byte: bool = False  # e4m3: the scales cycle through every non-negative E4M3 number (bytes 0-126)


def _grid() -> dict[str, Case]:
    """Every bits x G x D x N, cycling through the mask, slicing, garbage and split variants."""
    cases = {}
    for i, (bits, groups, dim, tokens) in enumerate(itertools.product(BITS, (1, 4), (32, 64), (0, 8, 40))):
        variant = i % 4  # 4 is coprime with the 3 token counts: each N meets every variant
        cases[f"b{bits}-g{groups}-d{dim}-n{tokens}"] = Case(
            bits,
            groups,
            dim,
            tokens,
            valid_heads=(None, 1, 2, 2)[variant],
            sliced=variant % 2 == 1,
            garbage=variant == 3,
            splits=(1, 2, 3)[(i // 3) % 3],
        )
    return cases


CASES = {
    **_grid(),
    "key-groups-straddle-blocks": Case(4, 2, 64, 60, key_group=12, valid_heads=1, sliced=True, splits=2),
    "gqa-3-heads": Case(3, 3, 32, 48, kv_heads=1, valid_heads=1, garbage=True, splits=2),
    "fp16-query": Case(3, 4, 64, 40, query_dtype=torch.float16, valid_heads=2, sliced=True),
    "bf16-query": Case(2, 1, 32, 40, query_dtype=torch.bfloat16, valid_heads=None),
    "value-group-is-head-dim": Case(8, 2, 32, 32, value_group=32, valid_heads=2, splits=2),
    "head-dim-96": Case(3, 2, 96, 48, value_group=32, valid_heads=2, sliced=True, splits=2),
    "more-splits-than-blocks": Case(4, 4, 32, 40, splits=10, sliced=True),
    "many-splits": Case(2, 4, 64, 256, batch=1, valid_heads=1, garbage=True, sliced=True, splits=5),
    "defaults": Case(4, 1, 32, 136, batch=1, block_n=None, splits=None, valid_heads=1, sliced=True),
    # symmetric codes with float8 scales (kivi:scales=e4m3)
    "e4m3-b4-g4": Case(4, 4, 64, 40, valid_heads=2, sliced=True, splits=2, scales="e4m3"),
    "e4m3-b2-gqa-3-heads": Case(2, 3, 32, 48, kv_heads=1, valid_heads=1, garbage=True, splits=2, scales="e4m3"),
    "e4m3-b8-bf16-query": Case(8, 1, 32, 40, query_dtype=torch.bfloat16, valid_heads=None, scales="e4m3"),
    "e4m3-b3-defaults": Case(3, 2, 32, 136, batch=1, block_n=None, splits=None, valid_heads=1, scales="e4m3"),
    "e4m3-every-scale-byte": Case(4, 2, 32, 64, valid_heads=1, scales="e4m3", every_scale_byte=True),
}


def _split(codes: Codes, start: int, end: int, key_group: int, keys: bool) -> Codes:
    """Tokens ``start..end-1`` of ``codes`` (``start``, ``end`` multiples of ``key_group``)."""
    meta = slice(start // key_group, end // key_group) if keys else slice(start, end)
    zero = None if codes.zero is None else codes.zero[:, :, meta]
    return Codes(codes.packed[:, :, start:end], codes.scale[:, :, meta], zero)


def make_inputs(case: Case, seed: int = 0) -> tuple[tuple, dict]:
    """``(query [B, Hq, D], keys, values, valid [B, Hv, N] | None)`` and the keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    b, h, g, d, n, kg = case.batch, case.kv_heads, case.groups, case.head_dim, case.tokens, case.key_group
    pad = kg if case.sliced else 0  # sliced: capacity buffers hold one key group before and after the N tokens
    cap = n + 2 * pad
    # Per-channel offsets and spreads, as real keys have (the reason KIVI quantizes keys per channel).
    keys = torch.randn(b, h, cap, d, generator=gen) * (0.5 + 2 * torch.rand(d, generator=gen))
    keys += torch.randn(d, generator=gen)
    key_codes = quantize_keys(keys, case.bits, kg, scales=case.scales)
    values = torch.randn(b, h, cap, d, generator=gen)
    value_codes = quantize_values(values, case.bits, case.value_group, scales=case.scales)
    if case.every_scale_byte:  # subnormal, normal and the largest scales, decoded in the kernel from their bytes
        for codes, shift in ((key_codes, 0), (value_codes, 61)):
            raw = codes.scale.view(torch.uint8)
            raw.copy_(((torch.arange(raw.numel()) + shift) % 127).view(raw.shape))
    keys_view = _split(key_codes, pad, pad + n, kg, keys=True)  # [B, H, N, W] views when sliced
    values_view = _split(value_codes, pad, pad + n, kg, keys=False)
    if case.sliced:
        query = torch.randn(h * g, b, d, generator=gen).transpose(0, 1)  # [B, Hq, D], not contiguous
    else:
        query = torch.randn(b, h * g, d, generator=gen)
    valid = None
    if case.valid_heads is not None:
        mask = torch.rand(b, case.valid_heads, cap, generator=gen) > 0.3  # [B, Hv, cap]
        if b > 1:
            mask[1, -1] = False  # one row (every head when Hv == 1) sees no token at all
        valid = mask[:, :, pad : pad + n]
        if case.garbage:
            _poison_ignored(keys_view, values_view, valid, kg)
    kwargs = dict(bits=case.bits, key_group=kg, value_group=case.value_group, scaling=d**-0.5)
    return (query.to(case.query_dtype), keys_view, values_view, valid), kwargs


def _poison_ignored(keys: Codes, values: Codes, valid: torch.Tensor, key_group: int) -> None:
    """NaN scale/zero on every ignored token's values and on key groups whose tokens are all ignored (float8
    scales: the byte 0x7F, E4M3's NaN)."""
    b, h, n = keys.packed.shape[:3]
    ignored = ~valid.expand(b, h, n)  # [B, H, N]
    ignored_groups = ignored.reshape(b, h, n // key_group, key_group).all(dim=-1)  # [B, H, N / key_group]
    for codes, where in ((values, ignored), (keys, ignored_groups)):
        if codes.zero is None:
            codes.scale.view(torch.uint8)[where] = 0x7F
        else:
            codes.scale[where] = float("nan")
            codes.zero[where] = float("nan")


def brute_force(query, keys, values, valid, *, bits, key_group, value_group, scaling):
    """Float64, one query head at a time, softmax over exactly its valid tokens of the dequantized cache."""
    (b, hq, d), h = query.shape, keys.packed.shape[1]
    k = dequantize_keys(keys, bits, key_group, d).double()  # [B, H, N, D]
    v = dequantize_values(values, bits, value_group, d).double()
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq), float("-inf"), dtype=torch.float64)
    for bi, j in itertools.product(range(b), range(hq)):
        kv = j // (hq // h)
        seen = torch.arange(k.shape[2]) if valid is None else valid[bi, min(kv, valid.shape[1] - 1)].nonzero()[:, 0]
        if len(seen) == 0:
            continue
        logits = k[bi, kv, seen] @ query[bi, j].double() * scaling  # [n]
        lse[bi, j] = torch.logsumexp(logits, dim=0)
        out[bi, j] = logits.softmax(dim=0) @ v[bi, kv, seen]
    return out.float(), lse.float()


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_brute_force(name):
    inputs, kwargs = make_inputs(CASES[name])
    out, lse = quantized_attention_reference(*inputs, **kwargs)
    expected_out, expected_lse = brute_force(*inputs, **kwargs)
    assert out.dtype == lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(lse, expected_lse, **FP32_TOL)
    torch.testing.assert_close(out, expected_out, **FP32_TOL)


def test_auto_on_cpu_is_the_reference():
    inputs, kwargs = make_inputs(CASES["b4-g4-d64-n40"])
    got = quantized_attention(*inputs, **kwargs)
    expected = quantized_attention_reference(*inputs, **kwargs)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def run_triton(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backend on ``case``: through the public API for the default blocks and splits, else the
    launcher with the case's ``block_n`` and ``splits``."""
    inputs, kwargs = make_inputs(case)
    if case.block_n is None and case.splits is None:
        return quantized_attention(*inputs, **kwargs, backend="triton")
    from contextlab.kernels.quant_attention_triton import quantized_attention_triton

    return quantized_attention_triton(*inputs, **kwargs, block_n=case.block_n, splits=case.splits)


_INTERPRETED_SCRIPT = """
import sys, torch
from tests.kernels.test_quant_attention import CASES, run_triton
torch.save({name: run_triton(case) for name, case in CASES.items()}, sys.argv[1])
"""


@pytest.fixture(scope="module")
def interpreted_triton_results(tmp_path_factory) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every case through the Triton kernel under ``TRITON_INTERPRET=1``, in a fresh interpreter: triton reads
    the variable when the kernels are defined, which this process may already have done."""
    return run_interpreted(tmp_path_factory, "quant_attention", _INTERPRETED_SCRIPT)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreted_matches_reference(interpreted_triton_results, name):
    inputs, kwargs = make_inputs(CASES[name])
    expected_out, expected_lse = quantized_attention_reference(*inputs, **kwargs)
    out, lse = interpreted_triton_results[name]
    assert out.dtype == lse.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(lse, expected_lse, **FP32_TOL)
    torch.testing.assert_close(out, expected_out, **FP32_TOL)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "0", reason="the interpreter runs CPU tensors")
def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter():
    inputs, kwargs = make_inputs(CASES["b4-g4-d64-n40"])
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        quantized_attention(*inputs, **kwargs, backend="triton")


@pytest.mark.parametrize("cut", [0, 8, 16, 40])
@pytest.mark.parametrize("mask", ["holes", "left-empty", "right-empty"])
def test_merging_two_token_ranges_equals_attention_over_their_union(cut, mask):
    (query, keys, values, valid), kwargs = make_inputs(Case(4, 4, 32, 40, valid_heads=2, garbage=True))
    valid = valid.clone()
    if mask == "left-empty":
        valid[..., :cut] = False  # the first part sees nothing: lse_a = -inf everywhere
    elif mask == "right-empty":
        valid[..., cut:] = False
    kg, n = kwargs["key_group"], keys.packed.shape[2]
    part_a = quantized_attention_reference(
        query, _split(keys, 0, cut, kg, True), _split(values, 0, cut, kg, False), valid[..., :cut], **kwargs
    )
    part_b = quantized_attention_reference(
        query, _split(keys, cut, n, kg, True), _split(values, cut, n, kg, False), valid[..., cut:], **kwargs
    )
    out, lse = merge_attention(*part_a, *part_b)
    expected_out, expected_lse = quantized_attention_reference(query, keys, values, valid, **kwargs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(lse, expected_lse, **FP32_TOL)
    torch.testing.assert_close(out, expected_out, **FP32_TOL)


def test_merging_ignores_the_out_of_an_empty_side():
    out = torch.randn(3, 4)
    lse = torch.tensor([0.5, float("-inf"), float("-inf")])
    garbage = torch.full((3, 4), float("nan"))
    empty = torch.full((3,), float("-inf"))
    both_orders = (merge_attention(out, lse, garbage, empty), merge_attention(garbage, empty, out, lse))
    for merged_out, merged_lse in both_orders:
        torch.testing.assert_close(merged_lse, lse, rtol=0, atol=0)
        torch.testing.assert_close(merged_out[0], out[0], **FP32_TOL)
        assert (merged_out[1:] == 0).all()  # both sides empty: out 0, lse -inf, no NaN


def test_merging_mismatched_shapes_raises_value_error():
    with pytest.raises(ValueError, match="equal shapes"):
        merge_attention(torch.zeros(2, 4), torch.zeros(2), torch.zeros(3, 4), torch.zeros(3))


def _scale_rows(codes: Codes, rows: int) -> Codes:
    return Codes(codes.packed, codes.scale[:, :, :rows], codes.zero[:, :, :rows])


def _symmetric(codes: Codes, scale_dtype: torch.dtype = E4M3) -> Codes:
    return Codes(codes.packed, codes.scale.to(scale_dtype), None)


# Each entry turns valid inputs (query, keys, values, valid, kwargs) into bad ones.
BAD_INPUTS = {
    r"query must be \[B, Hq, D\]": lambda q, k, v, m, kw: ((q[0], k, v, m), kw),
    "query must be floating point": lambda q, k, v, m, kw: ((q.long(), k, v, m), kw),
    "batch sizes differ": lambda q, k, v, m, kw: ((q[:1], k, v, m[:1]), kw),
    "multiple of KV heads": lambda q, k, v, m, kw: ((q[:, :3], k, v, m), kw),
    "packs into 2 int32 words; the codes hold 4": lambda q, k, v, m, kw: ((q[..., :16], k, v, m), kw),
    "bits must be one of": lambda q, k, v, m, kw: ((q, k, v, m), {**kw, "bits": 5}),
    r"tokens N \(40\) must be a multiple of key_group \(16\)": lambda q, k, v, m, kw: (
        (q, k, v, m),
        {**kw, "key_group": 16},
    ),
    r"value_group \(24\) must divide": lambda q, k, v, m, kw: ((q, k, v, m), {**kw, "value_group": 24}),
    "different code shapes": lambda q, k, v, m, kw: ((q, k, Codes(v.packed[:, :, :32], v.scale, v.zero), m), kw),
    r"keys.scale and keys.zero must be \[2, 2, 5, 32\]": lambda q, k, v, m, kw: ((q, _scale_rows(k, 4), v, m), kw),
    "values.packed must be an int32": lambda q, k, v, m, kw: ((q, k, Codes(v.packed.long(), v.scale, v.zero), m), kw),
    r"valid must be \[B=2, 1 or H=2, N=40\]": lambda q, k, v, m, kw: ((q, k, v, m[..., :30]), kw),
    "valid must be a bool": lambda q, k, v, m, kw: ((q, k, v, m.float()), kw),
    "both have zero points": lambda q, k, v, m, kw: ((q, _symmetric(k), v, m), kw),
    "need float8 E4M3 scales": lambda q, k, v, m, kw: ((q, _symmetric(k, torch.float16), _symmetric(v), m), kw),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_inputs_raise_value_error_naming_the_problem(problem, backend):
    inputs, kwargs = make_inputs(Case(4, 4, 32, 40, valid_heads=1))
    bad_inputs, bad_kwargs = BAD_INPUTS[problem](*inputs, kwargs)
    with pytest.raises(ValueError, match=problem):
        quantized_attention(*bad_inputs, **bad_kwargs, backend=backend)


def test_bad_backend_raises_value_error():
    inputs, kwargs = make_inputs(CASES["b4-g4-d32-n40"])
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        quantized_attention(*inputs, **kwargs, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(("bits", "scales"), [(2, "fp16"), (4, "fp16"), (4, "e4m3")])
def test_cuda_real_shapes_match_the_reference_without_materialising_the_cache(bits, scales):
    """One Llama-3-8B-like layer at 32K tokens: B=1, H=8, G=4, D=128, codes sliced from larger buffers."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from contextlab.kernels.quant_attention_triton import quantized_attention_triton

    b, h, g, d, n, group, cap = 1, 8, 4, 128, 32768, 32, 32768 + 512
    gen = torch.Generator(device="cuda").manual_seed(0)
    keys = quantize_keys(torch.randn(b, h, cap, d, device="cuda", generator=gen), bits, group, scales=scales)
    values = quantize_values(torch.randn(b, h, cap, d, device="cuda", generator=gen), bits, group, scales=scales)
    keys = _split(keys, group, group + n, group, True)  # [B, H, N, W] views into capacity buffers
    values = _split(values, group, group + n, group, False)
    query = torch.randn(b, h * g, d, device="cuda", generator=gen).bfloat16()
    valid = torch.ones(b, 1, cap, dtype=torch.bool, device="cuda")[..., group : group + n]
    valid[..., :300] = False  # left padding
    kwargs = dict(bits=bits, key_group=group, value_group=group, scaling=d**-0.5)
    expected_out, expected_lse = quantized_attention_reference(query, keys, values, valid, **kwargs)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, lse = quantized_attention(query, keys, values, valid, **kwargs, backend="triton")
    torch.cuda.synchronize()
    dequantized_bytes = 2 * b * h * n * d * 4  # fp32 keys and values
    assert torch.cuda.max_memory_allocated() - before < dequantized_bytes / 64
    tol = dict(rtol=1e-4, atol=1e-5)  # 32K-term fp32 sums in another order (and FMA contraction)
    torch.testing.assert_close(lse, expected_lse, **tol)
    torch.testing.assert_close(out, expected_out, **tol)
    one_split = quantized_attention_triton(query, keys, values, valid, **kwargs, splits=1)
    torch.testing.assert_close(one_split[1], expected_lse, **tol)
    torch.testing.assert_close(one_split[0], expected_out, **tol)
