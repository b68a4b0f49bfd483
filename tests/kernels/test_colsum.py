"""Attention column sums: reference vs brute force, fast torch path and Triton (interpreted, CUDA) vs reference."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from contextlab.kernels import attention_column_sums, attention_column_sums_reference
from contextlab.kernels.colsum import attention_column_sums_torch
from tests.kernels.interpreter import HAS_TRITON, run_interpreted

# Every path computes in fp32 from the same (possibly 16-bit) inputs, so fp32 tolerances apply.
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


@dataclass(frozen=True)
class Case:
    batch: int
    kv_heads: int
    groups: int
    slots: int  # S
    queries: int  # Tq
    valid_heads: int  # Hv
    dtype: torch.dtype = torch.float32
    left_padding: int = 0  # invalid first slots of the last batch row
    holes: bool = False  # random invalid slots per row and head (as after eviction)
    garbage: bool = False  # NaN in the queries and keys of invalid slots (an unused, uninitialised cache)
    head_dim: int = 16


CASES = {
    "left-pad-g2": Case(2, 2, 2, 40, 40, 1, left_padding=7),
    "holes-per-head-g4": Case(2, 2, 4, 50, 23, 2, holes=True, garbage=True),
    "bf16-g1-short-tq": Case(3, 1, 1, 33, 7, 1, dtype=torch.bfloat16, left_padding=30),
    "fp16-holes-pad": Case(2, 3, 2, 45, 45, 3, dtype=torch.float16, left_padding=10, holes=True),
    "all-valid-g4": Case(1, 1, 4, 64, 64, 1),
    "bf16-pad-garbage": Case(2, 1, 4, 96, 61, 1, dtype=torch.bfloat16, left_padding=40, garbage=True),
    "one-query": Case(2, 2, 2, 20, 1, 1, left_padding=3),
}


def make_inputs(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Random ``queries [B, Hq, Tq, D]``, ``keys [B, H, S, D]``, ``valid [B, Hv, S]`` and a scaling."""
    gen = torch.Generator().manual_seed(seed)
    b, h, g, s, tq, d = case.batch, case.kv_heads, case.groups, case.slots, case.queries, case.head_dim
    queries = torch.randn(b, h * g, tq, d, generator=gen) * 2
    keys = torch.randn(b, h, s, d, generator=gen) * 2
    valid = torch.ones(b, case.valid_heads, s, dtype=torch.bool)
    valid[-1, :, : case.left_padding] = False
    if case.holes:
        valid &= torch.rand(b, case.valid_heads, s, generator=gen) > 0.3
    if case.garbage:
        keys[~valid.expand(b, h, s)] = float("nan")
        queries.view(b, h, g, tq, d)[~valid[:, :, None, s - tq :].expand(b, h, g, tq)] = float("nan")
    return queries.to(case.dtype), keys.to(case.dtype), valid, d**-0.5


def brute_force(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """Float64, one query at a time, softmax over exactly the keys it may see."""
    (b, hq, tq, _), h, s = queries.shape, keys.shape[1], keys.shape[2]
    g, offset = hq // h, s - tq
    out = torch.zeros(b, h, s, dtype=torch.float64)
    for bi, qh, j in ((bi, qh, j) for bi in range(b) for qh in range(hq) for j in range(tq)):
        head_valid = valid[bi, min(qh // g, valid.shape[1] - 1)]  # [S]
        if not head_valid[offset + j]:
            continue
        seen = head_valid[: offset + j + 1].nonzero().flatten()
        logits = keys[bi, qh // g, seen].double() @ queries[bi, qh, j].double() * scaling
        out[bi, qh // g, seen] += logits.softmax(dim=0) / g
    return out


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("chunk", [1, 5, 512])
def test_reference_matches_brute_force(name, chunk):
    inputs = make_inputs(CASES[name])
    expected = brute_force(*inputs).float()
    torch.testing.assert_close(attention_column_sums_reference(*inputs, chunk=chunk), expected, **FP32_TOL)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("chunk", [1, 5, 16, 512])
def test_torch_path_matches_reference(name, chunk):
    inputs = make_inputs(CASES[name])
    expected = attention_column_sums_reference(*inputs)
    torch.testing.assert_close(attention_column_sums_torch(*inputs, chunk=chunk), expected, **FP32_TOL)


def test_auto_on_cpu_is_the_torch_path():
    inputs = make_inputs(CASES["left-pad-g2"])
    torch.testing.assert_close(attention_column_sums(*inputs), attention_column_sums_torch(*inputs), rtol=0, atol=0)


def test_each_query_hands_out_one_unit_of_attention():
    queries, keys, valid, scaling = make_inputs(CASES["holes-per-head-g4"])
    sums = attention_column_sums(queries, keys, valid, scaling)
    b, h, s = sums.shape
    valid_queries = valid.expand(b, h, s)[..., s - queries.shape[2] :].sum(dim=-1).float()  # [B, H]
    torch.testing.assert_close(sums.sum(dim=-1), valid_queries, **FP32_TOL)
    assert (sums[~valid.expand(b, h, s)] == 0).all()


_INTERPRETED_SCRIPT = """
import sys, torch
from tests.kernels.test_colsum import CASES, make_inputs
from contextlab.kernels import attention_column_sums
torch.save({n: attention_column_sums(*make_inputs(c), backend="triton") for n, c in CASES.items()}, sys.argv[1])
"""


@pytest.fixture(scope="module")
def interpreted_triton_results(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Every case through the Triton kernels under ``TRITON_INTERPRET=1``, in a fresh interpreter: triton
    reads the variable when the kernels are defined, which this process may already have done."""
    return run_interpreted(tmp_path_factory, "colsum", _INTERPRETED_SCRIPT)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreted_matches_reference(interpreted_triton_results, name):
    expected = attention_column_sums_reference(*make_inputs(CASES[name]))
    torch.testing.assert_close(interpreted_triton_results[name], expected, **FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("valid_heads", [1, 4])
def test_cuda_bf16_error_within_twice_plain_pytorch(valid_heads, backend):
    """Accept a backend when its error against an fp32 reference is at most twice that of plain PyTorch
    (a bf16 masked softmax) on the same bf16 inputs."""
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    case = Case(2, 4, 2, 700, 600, valid_heads, left_padding=90, holes=True, head_dim=64)
    queries, keys, valid, scaling = (x.cuda() if isinstance(x, torch.Tensor) else x for x in make_inputs(case))
    expected = attention_column_sums_reference(queries, keys, valid, scaling)
    q16, k16 = queries.bfloat16(), keys.bfloat16()
    plain = _plain_bf16_column_sums(q16, k16, valid, scaling)
    got = attention_column_sums(q16, k16, valid, scaling, backend=backend)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max() <= 2 * (plain - expected).abs().max() + 1e-5


def _plain_bf16_column_sums(queries, keys, valid, scaling) -> torch.Tensor:
    (b, hq, tq, _), h, s = queries.shape, keys.shape[1], keys.shape[2]
    g = hq // h
    allowed = torch.ones(tq, s, dtype=torch.bool, device=keys.device).tril(s - tq) & valid[:, :, None]  # [B, Hv, Tq, S]
    allowed = allowed.repeat_interleave(g, dim=1) if valid.shape[1] > 1 else allowed
    logits = queries @ keys.repeat_interleave(g, dim=1).transpose(-1, -2) * scaling  # [B, Hq, Tq, S] bf16
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    probs = probs.masked_fill(~allowed.diagonal(s - tq, dim1=-2, dim2=-1)[..., None], 0.0)
    return probs.sum(dim=2).view(b, h, g, s).float().mean(dim=2)


BAD_INPUTS = {
    "expected queries": lambda q, k, v: (q[0], k, v),
    "batch sizes differ": lambda q, k, v: (q, k[:1], v),
    "head dims differ": lambda q, k, v: (q[..., :8], k, v),
    "multiple of KV heads": lambda q, k, v: (q[:, :3], k, v),
    "more queries": lambda q, k, v: (q, k[:, :, :30], v[..., :30]),
    r"valid must be \[B, 1 or H": lambda q, k, v: (q, k, v.expand(2, 3, 40)),
    "bool": lambda q, k, v: (q, k, v.float()),
    "floating point": lambda q, k, v: (q.long(), k, v),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bad_inputs_raise_value_error_naming_the_problem(problem, backend):
    queries, keys, valid, scaling = make_inputs(CASES["left-pad-g2"])
    with pytest.raises(ValueError, match=problem):
        attention_column_sums(*BAD_INPUTS[problem](queries, keys, valid), scaling, backend=backend)


def test_bad_backend_and_chunk_raise_value_error():
    queries, keys, valid, scaling = make_inputs(CASES["left-pad-g2"])
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        attention_column_sums(queries, keys, valid, scaling, backend="cuda")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        attention_column_sums(queries, keys, valid, scaling, chunk=0)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "0", reason="the interpreter runs CPU tensors")
def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention_column_sums(*make_inputs(CASES["left-pad-g2"]), backend="triton")


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("chunk", [5, 512])
def test_fused_attention_and_column_sums_match_sdpa_and_the_reference(name, chunk):
    """H2O on CPU takes the attention output and the column sums from one pass; both must be exact."""
    from contextlab.kernels.colsum import attention_and_column_sums

    case = CASES[name]
    queries, keys, valid, scaling = make_inputs(case)
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(keys.shape, generator=gen).to(case.dtype)
    if case.garbage:
        values[~valid.expand(keys.shape[:3])] = float("nan")
    out, sums = attention_and_column_sums(queries, keys, values, valid, scaling, chunk=chunk)
    torch.testing.assert_close(sums, attention_column_sums_reference(queries, keys, valid, scaling), **FP32_TOL)
    b, hq, tq, _ = queries.shape
    h, s = keys.shape[1:3]
    g = hq // h
    slots = torch.arange(s)
    allowed = (slots[None, :] <= (slots[s - tq :, None])) & valid[:, :, None, :]  # [B, Hv, Tq, S]
    clean = valid.expand(b, h, s)[..., None]
    reference = torch.nn.functional.scaled_dot_product_attention(
        queries.float().nan_to_num(),
        keys.float().masked_fill(~clean, 0).repeat_interleave(g, 1),
        values.float().masked_fill(~clean, 0).repeat_interleave(g, 1),
        attn_mask=allowed.repeat_interleave(g, 1) if allowed.shape[1] > 1 else allowed,
        scale=scaling,
    )
    real = valid.expand(b, h, s)[:, :, s - tq :].repeat_interleave(g, 1)  # [B, Hq, Tq]: rows that matter
    assert out.dtype == values.dtype and torch.isfinite(out.float()).all()
    tol = FP32_TOL if case.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float()[real], reference[real], **tol)
