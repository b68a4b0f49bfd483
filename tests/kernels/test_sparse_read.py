"""Sparse decode reads: references vs brute force; Triton (interpreted on CPU, and on CUDA) vs the references."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from contextlab.kernels.sparse_read import (
    gathered_attention,
    gathered_attention_reference,
    page_scores,
    page_scores_reference,
)
from tests.kernels.interpreter import HAS_TRITON, run_interpreted

FP32_TOL = dict(rtol=1e-5, atol=1e-5)


@dataclass(frozen=True)
class Case:
    batch: int
    kv_heads: int
    groups: int
    slots: int  # S cached (the buffers hold more: capacity = slots + 7, so inputs are strided views)
    selected: int  # K
    head_dim: int = 16
    dtype: torch.dtype = torch.float32
    index_dtype: torch.dtype = torch.int64
    ragged: bool = True  # each (row, head) reads its own number of entries
    empty_head: bool = False  # one (row, head) reads nothing


CASES = {
    "g1-short": Case(2, 2, 1, 40, 12),
    "g4-ragged": Case(2, 2, 4, 90, 50),
    "g2-splits": Case(1, 3, 2, 700, 600),  # three splits of 256 selected slots
    "odd-dim-int32": Case(2, 1, 3, 64, 33, head_dim=24, index_dtype=torch.int32),
    "bf16-empty-head": Case(2, 2, 2, 80, 40, dtype=torch.bfloat16, empty_head=True),
    "fp16-dense": Case(1, 2, 4, 50, 50, dtype=torch.float16, ragged=False),
}


def make_inputs(case: Case, seed: int = 0):
    """``query [B, Hq, D]``, strided ``keys``/``values [B, H, S, D]``, ``indices``/``valid [B, H, K]`` and the
    page bounds of 8-slot pages ``kmin``/``kmax [B, H, P, D]``."""
    gen = torch.Generator().manual_seed(seed)
    b, h, g, s, k, d = case.batch, case.kv_heads, case.groups, case.slots, case.selected, case.head_dim
    query = (torch.randn(b, h * g, d, generator=gen) * 2).to(case.dtype)
    buffers = (torch.randn(2, b, h, s + 7, d, generator=gen) * 2).to(case.dtype)
    keys, values = buffers[0, :, :, :s], buffers[1, :, :, :s]
    indices = torch.stack([torch.randperm(s, generator=gen)[:k] for _ in range(b * h)]).view(b, h, k)
    counts = torch.randint(1, k + 1, (b, h), generator=gen) if case.ragged else torch.full((b, h), k)
    valid = torch.arange(k).view(1, 1, -1) < counts.unsqueeze(-1)
    if case.empty_head:
        valid[-1, -1] = False
    indices = indices.masked_fill(~valid, -1).to(case.index_dtype)  # unread entries hold garbage
    pages = keys[:, :, : s // 8 * 8].view(b, h, s // 8, 8, d)
    return query, keys, values, indices, valid, pages.amin(3), pages.amax(3), d**-0.5


def brute_pages(query, kmin, kmax) -> torch.Tensor:
    b, hq, _ = query.shape
    h, p = kmin.shape[1], kmin.shape[2]
    g = hq // h
    out = torch.full((b, h, p), float("-inf"), dtype=torch.float64)
    for bi, qh, pi in ((bi, qh, pi) for bi in range(b) for qh in range(hq) for pi in range(p)):
        q = query[bi, qh].double()
        bound = torch.maximum(q * kmin[bi, qh // g, pi].double(), q * kmax[bi, qh // g, pi].double()).sum()
        out[bi, qh // g, pi] = max(out[bi, qh // g, pi], bound)
    return out.float()


def brute_attention(query, keys, values, indices, valid, scaling):
    b, hq, d = query.shape
    g = hq // keys.shape[1]
    out, lse = torch.zeros(b, hq, d, dtype=torch.float64), torch.full((b, hq), float("-inf"), dtype=torch.float64)
    for bi, qh in ((bi, qh) for bi in range(b) for qh in range(hq)):
        slots = indices[bi, qh // g][valid[bi, qh // g]].long()
        if not len(slots):
            continue
        logits = keys[bi, qh // g, slots].double() @ query[bi, qh].double() * scaling
        out[bi, qh] = logits.softmax(0) @ values[bi, qh // g, slots].double()
        lse[bi, qh] = torch.logsumexp(logits, 0)
    return out.float(), lse.float()


@pytest.mark.parametrize("name", list(CASES))
def test_references_match_brute_force(name):
    query, keys, values, indices, valid, kmin, kmax, scaling = make_inputs(CASES[name])
    torch.testing.assert_close(page_scores_reference(query, kmin, kmax), brute_pages(query, kmin, kmax), **FP32_TOL)
    out, lse = gathered_attention_reference(query, keys, values, indices, valid, scaling)
    expected_out, expected_lse = brute_attention(query, keys, values, indices, valid, scaling)
    torch.testing.assert_close(out, expected_out, **FP32_TOL)
    torch.testing.assert_close(lse, expected_lse, **FP32_TOL)


def test_auto_on_cpu_is_the_reference():
    query, keys, values, indices, valid, kmin, kmax, scaling = make_inputs(CASES["g4-ragged"])
    assert torch.equal(page_scores(query, kmin, kmax), page_scores_reference(query, kmin, kmax))
    got = gathered_attention(query, keys, values, indices, valid, scaling)
    want = gathered_attention_reference(query, keys, values, indices, valid, scaling)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


_INTERPRETED_SCRIPT = """
import sys, torch
from tests.kernels.test_sparse_read import CASES, make_inputs
from contextlab.kernels.sparse_read import gathered_attention, page_scores
out = {}
for name, case in CASES.items():
    query, keys, values, indices, valid, kmin, kmax, scaling = make_inputs(case)
    out[name] = (
        page_scores(query, kmin, kmax, backend="triton"),
        *gathered_attention(query, keys, values, indices, valid, scaling, backend="triton"),
    )
torch.save(out, sys.argv[1])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case through the Triton kernels under ``TRITON_INTERPRET=1`` in a fresh interpreter."""
    return run_interpreted(tmp_path_factory, "sparse_read", _INTERPRETED_SCRIPT)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreted_matches_the_references(interpreted, name):
    query, keys, values, indices, valid, kmin, kmax, scaling = make_inputs(CASES[name])
    scores, out, lse = interpreted[name]
    torch.testing.assert_close(scores, page_scores_reference(query, kmin, kmax), **FP32_TOL)
    want_out, want_lse = gathered_attention_reference(query, keys, values, indices, valid, scaling)
    torch.testing.assert_close(out, want_out, **FP32_TOL)
    torch.testing.assert_close(lse, want_lse, **FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_triton_matches_the_references_at_real_shapes(dtype):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    case = Case(2, 8, 4, 32768, 2048, head_dim=128, dtype=dtype)
    query, keys, values, indices, valid, kmin, kmax, scaling = (
        x.cuda() if isinstance(x, torch.Tensor) else x for x in make_inputs(case)
    )
    torch.testing.assert_close(
        page_scores(query, kmin, kmax, backend="triton"), page_scores_reference(query, kmin, kmax), rtol=1e-4, atol=1e-3
    )
    got = gathered_attention(query, keys, values, indices, valid, scaling, backend="triton")
    want = gathered_attention_reference(query, keys, values, indices, valid, scaling)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


BAD = {
    "query must be a floating-point": lambda q, k, v, i, ok: (q.long(), k, v, i, ok),
    "batch sizes differ": lambda q, k, v, i, ok: (q[:1], k, v, i, ok),
    "head dims differ": lambda q, k, v, i, ok: (q[..., :8], k, v, i, ok),
    "multiple of KV heads": lambda q, k, v, i, ok: (q[:, :3], k, v, i, ok),
    "indices must be an integer": lambda q, k, v, i, ok: (q, k, v, i.float(), ok),
    "valid must be a bool": lambda q, k, v, i, ok: (q, k, v, i, ok.long()),
    r"must lie in \[0, 90\)": lambda q, k, v, i, ok: (q, k, v, i.masked_fill(ok, 90), ok),
    "one shape": lambda q, k, v, i, ok: (q, k, v[:, :, :5], i, ok),
}


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_inputs_raise_value_error_naming_the_problem(problem):
    query, keys, values, indices, valid, _, _, scaling = make_inputs(CASES["g4-ragged"])
    with pytest.raises(ValueError, match=problem):
        gathered_attention(*BAD[problem](query, keys, values, indices, valid), scaling)
    with pytest.raises(ValueError, match="unknown backend"):
        gathered_attention(query, keys, values, indices, valid, scaling, backend="cuda")
