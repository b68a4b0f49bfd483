"""Sparse prefill patterns: the token mask against hand-drawn cases, the tile map against the token mask, flex
attention against the dense masked reference (eager here; compiled when this machine can compile), and
MInference's online index estimation on planted structure."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contextlab.kernels.sparse_prefill import (
    PrefillPattern,
    _CompiledFlex,
    active_blocks,
    band_prefill,
    bucket,
    compiled_flex_available,
    estimate_blocks,
    estimate_vertical_slash,
    flex_prefill,
    full_blocks,
    head_routes,
    reference_prefill,
    sparse_prefill,
    token_mask,
)


def _pattern(heads: int, **kw) -> PrefillPattern:
    zeros = torch.zeros(heads, dtype=torch.long)
    base = {"dense": torch.zeros(heads, dtype=torch.bool), "sink": zeros, "window": zeros}
    return PrefillPattern(**(base | kw))


def _drawn(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "x" for c in row] for row in rows])


def test_a_shape_reads_the_sinks_and_a_local_band():
    mask = token_mask(_pattern(1, sink=torch.tensor([1]), window=torch.tensor([2])), 6, 6)[0]
    assert torch.equal(
        mask,
        _drawn(
            [
                "x.....",
                "xx....",
                "xxx...",
                "x.xx..",
                "x..xx.",
                "x...xx",
            ]
        ),
    )


def test_vertical_columns_slash_distances_and_blocks():
    vertical = torch.zeros(1, 6, dtype=torch.bool)
    vertical[0, 2] = True
    slash = torch.zeros(1, 6, dtype=torch.bool)
    slash[0, 4] = True
    mask = token_mask(_pattern(1, vertical=vertical, slash=slash), 6, 6)[0]
    assert torch.equal(
        mask,
        _drawn(
            [
                "......",
                "......",
                "..x...",
                "..x...",
                "x.x...",
                ".xx...",
            ]
        ),
    )
    blocks = torch.tensor([[[True, False, False], [False, False, False], [False, True, False]]])
    mask = token_mask(_pattern(1, blocks=blocks, block=2), 4, 6)[0]  # the last 4 queries
    assert torch.equal(mask, _drawn(["......", "......", "..xx..", "..xx.."]) | _drawn(["......"] * 4))
    dense = token_mask(_pattern(1, dense=torch.tensor([True])), 3, 5)[0]
    assert torch.equal(dense, _drawn(["xxx..", "xxxx.", "xxxxx"]))


def _random_pattern(gen: torch.Generator, heads: int, s: int, block: int) -> PrefillPattern:
    nb = math.ceil(s / block)
    return PrefillPattern(
        dense=torch.rand(heads, generator=gen) < 0.2,
        sink=torch.randint(0, 5, (heads,), generator=gen),
        window=torch.randint(0, s // 3 + 1, (heads,), generator=gen),
        vertical=torch.rand(heads, s, generator=gen) < 0.05,
        slash=torch.rand(heads, s, generator=gen) < 0.05,
        blocks=torch.rand(heads, nb, nb, generator=gen) < 0.1,
        block=block,
    )


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), s=st.integers(1, 70), q=st.integers(1, 70), size=st.sampled_from([4, 8, 16]))
def test_the_tile_map_never_misses_a_read_key_and_is_exact_for_bands_and_diagonals(seed, s, q, size):
    """Sinks, windows and slash distances are placed exactly; a vertical column or a pattern block may mark a
    tile where its only reads would be above the diagonal (a tile computed in vain, never one missed)."""
    q = min(q, s)
    pattern = _random_pattern(torch.Generator().manual_seed(seed), 3, s, block=5)

    def tiles_of(p: PrefillPattern) -> torch.Tensor:
        mask = token_mask(p, q, s)  # [H, q, s]
        qt, kt = math.ceil(q / size), math.ceil(s / size)
        padded = torch.nn.functional.pad(mask, (0, kt * size - s, 0, qt * size - q))
        return padded.view(3, qt, size, kt, size).any(4).any(2)

    got = active_blocks(pattern, q, s, size)
    assert not bool((tiles_of(pattern) & ~got).any())
    # a tile called full is read whole: every query of it reads every key of it
    full = full_blocks(pattern, q, s, size)
    mask = torch.nn.functional.pad(token_mask(pattern, q, s), (0, math.ceil(s / size) * size - s, 0, 0))
    mask = torch.nn.functional.pad(mask, (0, 0, 0, math.ceil(q / size) * size - q))
    whole = mask.view(3, math.ceil(q / size), size, math.ceil(s / size), size).all(4).all(2)
    assert not bool((full & ~whole).any()) and not bool((full & ~got).any())
    pattern.vertical = pattern.blocks = None
    assert torch.equal(active_blocks(pattern, q, s, size), tiles_of(pattern))


def _qkv(gen, b, hq, hkv, tq, s, d):
    return (
        torch.randn(b, hq, tq, d, generator=gen),
        torch.randn(b, hkv, s, d, generator=gen),
        torch.randn(b, hkv, s, d, generator=gen),
    )


def test_every_head_dense_is_causal_attention():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(gen, 2, 4, 2, 50, 50, 8)
    dense = _pattern(4, dense=torch.ones(4, dtype=torch.bool))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.3)
    torch.testing.assert_close(reference_prefill(q, k, v, dense, 0.3, chunk=16), expected)
    torch.testing.assert_close(flex_prefill(q, k, v, dense, 0.3, compiled=False), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("tq", "s"), [(300, 300), (130, 300), (1, 260)])
def test_flex_matches_the_dense_masked_reference(tq, s):
    gen = torch.Generator().manual_seed(tq + s)
    q, k, v = _qkv(gen, 1, 6, 2, tq, s, 16)
    pattern = _random_pattern(gen, 6, s, block=64)
    pattern.sink[:] = torch.clamp(pattern.sink, min=1)  # every query reads something
    expected = reference_prefill(q, k, v, pattern, 0.25, chunk=64)
    got = flex_prefill(q, k, v, pattern, 0.25, compiled=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("tq", "s"), [(256, 256), (70, 300), (300, 300)])
def test_compiled_flex_matches_the_reference_where_this_machine_compiles(tq, s):
    """Compiled flex runs at power-of-two padded lengths (300 -> 512): the padding changes nothing."""
    if not compiled_flex_available():
        pytest.skip("torch.compile cannot build flex attention on this machine")
    gen = torch.Generator().manual_seed(5 + tq)
    q, k, v = _qkv(gen, 1, 4, 2, tq, s, 16)
    pattern = _random_pattern(gen, 4, s, block=64)
    pattern.sink[:] = 1
    torch.testing.assert_close(
        flex_prefill(q, k, v, pattern, 0.25), reference_prefill(q, k, v, pattern, 0.25), atol=1e-4, rtol=1e-4
    )


def test_compiled_lengths_are_powers_of_two_of_at_least_one_tile():
    assert [bucket(n) for n in (1, 128, 129, 4096, 4097, 40000)] == [128, 128, 256, 4096, 8192, 65536]


def test_past_the_compile_limit_sparse_prefill_takes_the_reference(monkeypatch):
    """torch.compile runs a function eagerly past its recompile limit, and eager flex attention materializes
    every score: a new input shape past the limit goes to the chunked reference instead."""
    from contextlab.kernels import sparse_prefill as module

    flex = _CompiledFlex()
    monkeypatch.setattr(module, "_FLEX", flex)
    monkeypatch.setattr(module, "_recompile_limit", lambda: 3)
    monkeypatch.setattr(module, "flex_prefill", _refuse)
    gen = torch.Generator().manual_seed(2)
    q, k, v = _qkv(gen, 1, 2, 1, 40, 40, 8)
    assert flex.admits(q, k, 0.5) and flex.admits(q[:, :, :30], k[:, :, :30], 0.5)  # one bucket: one kernel
    assert flex.admits(*_qkv(gen, 1, 2, 1, 200, 200, 8)[:2], 0.5)  # a second kernel
    q, k, v = _qkv(gen, 1, 2, 1, 300, 300, 8)
    module._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="as many input shapes as torch.compile allows"):
        assert not flex.admits(q, k, 0.5)  # a third kernel would reach the limit
    pattern = PrefillPattern.streaming(2, 1, 4)
    torch.testing.assert_close(sparse_prefill(q, k, v, pattern, 0.5), reference_prefill(q, k, v, pattern, 0.5))


def test_the_full_pattern_reads_every_earlier_key_and_equals_causal_attention():
    pattern = PrefillPattern.full(3)
    assert torch.equal(token_mask(pattern, 5, 7), torch.ones(5, 7, dtype=torch.bool).tril(2).expand(3, 5, 7))
    q, k, v = _qkv(torch.Generator().manual_seed(3), 1, 3, 3, 20, 20, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5)
    torch.testing.assert_close(reference_prefill(q, k, v, pattern, 0.5), expected, rtol=1e-5, atol=1e-5)


def _refuse(*args, **kwargs):
    raise AssertionError("flex attention must not run past the compile limit")


def test_vertical_slash_estimation_finds_a_planted_column_and_distance():
    gen = torch.Generator().manual_seed(7)
    s, d = 200, 16
    k = torch.randn(1, 1, s, d, generator=gen) * 0.1
    q = torch.randn(1, 2, s, d, generator=gen) * 0.1
    target = torch.randn(d, generator=gen)
    k[0, 0, 37] = target * 2  # every late query looks at key 37 ...
    for p in range(s - 64, s):  # ... and at the key 9 positions back, through a direction of its own
        own = torch.randn(d, generator=gen)
        q[0, :, p] = target + own
        k[0, 0, p - 9] = own * 2
    vertical, slash = estimate_vertical_slash(q, k, 1.0, vertical=3, slash=3, last=64)
    assert vertical.shape == slash.shape == (2, s)
    assert bool(vertical[:, 37].all()) and int(vertical.sum()) == 6
    assert bool(slash[:, 9].all()) and int(slash.sum()) == 6


def test_block_estimation_keeps_the_diagonal_and_at_most_its_budget_per_row():
    gen = torch.Generator().manual_seed(9)
    q, k, _ = _qkv(gen, 2, 4, 2, 300, 300, 8)
    blocks = estimate_blocks(q, k, 0.3, keep=2, block=64)
    nb = math.ceil(300 / 64)
    assert blocks.shape == (4, nb, nb)
    assert bool(blocks.diagonal(dim1=1, dim2=2).all())
    assert not bool(blocks.triu(1).any())  # causal
    assert int(blocks.sum(-1).max()) <= 3


def _mixed_pattern(gen: torch.Generator, hq: int, s: int) -> PrefillPattern:
    """Dense heads, A-shape heads (two different settings) and heads with columns, diagonals and blocks."""
    kind = torch.arange(hq) % 4  # 0 dense, 1 and 2 A-shapes, 3 masked
    nb = math.ceil(s / 64)
    masked = (kind == 3).view(-1, 1)
    return PrefillPattern(
        dense=kind == 0,
        sink=torch.where(kind == 1, 3, torch.where(kind == 2, 0, 2)),
        window=torch.where(kind == 1, 17, torch.where(kind == 2, s // 3 + 1, 5)),
        vertical=(torch.rand(hq, s, generator=gen) < 0.05) & masked,
        slash=(torch.rand(hq, s, generator=gen) < 0.05) & masked,
        blocks=(torch.rand(hq, nb, nb, generator=gen) < 0.1) & masked.view(-1, 1, 1),
        block=64,
    )


@pytest.mark.parametrize(
    ("hq", "hkv", "tq", "s"), [(8, 2, 300, 300), (4, 4, 97, 520), (8, 1, 1, 130), (4, 2, 600, 600)]
)
def test_heads_split_by_route_give_the_reference(hq, hkv, tq, s, monkeypatch):
    """Dense heads through causal SDPA, A-shape heads through the band routine, the rest through the masked
    route (here the reference: compiled flex has its own parity test, and each shape would compile anew):
    together the same attention as the dense masked reference, for every head."""
    from contextlab.kernels import sparse_prefill as module

    monkeypatch.setattr(module._FLEX, "broken", True)
    gen = torch.Generator().manual_seed(hq * tq + s)
    q, k, v = _qkv(gen, 2, hq, hkv, tq, s, 16)
    pattern = _mixed_pattern(gen, hq, s)
    routes = head_routes(pattern)
    assert routes["dense"] == list(range(0, hq, 4)) and routes["mask"] == list(range(3, hq, 4))
    assert routes["band:3,17"] == list(range(1, hq, 4)) and routes[f"band:0,{s // 3 + 1}"] == list(range(2, hq, 4))
    expected = reference_prefill(q, k, v, pattern, 0.25, chunk=64)
    torch.testing.assert_close(sparse_prefill(q, k, v, pattern, 0.25), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("sink", "window", "tq", "s"), [(4, 16, 300, 300), (0, 1, 50, 50), (40, 3, 77, 200), (2, 900, 300, 300)]
)
def test_the_band_routine_is_an_a_shape(sink, window, tq, s):
    gen = torch.Generator().manual_seed(sink + window + s)
    q, k, v = _qkv(gen, 1, 3, 3, tq, s, 8)
    pattern = PrefillPattern.streaming(3, sink, window)
    got = band_prefill(q, k, v, sink, window, 0.5, block=32)
    torch.testing.assert_close(got, reference_prefill(q, k, v, pattern, 0.5), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="sink \\+ window must be positive"):
        band_prefill(q, k, v, 0, 0, 0.5)


def test_a_pattern_keeping_some_heads_gives_the_others_nothing_to_read():
    gen = torch.Generator().manual_seed(4)
    pattern = _mixed_pattern(gen, 8, 100)
    kept = pattern.keeping(torch.tensor([3, 7]))
    mask = token_mask(kept, 100, 100)
    assert not bool(mask[[0, 1, 2, 4, 5, 6]].any())
    assert torch.equal(mask[[3, 7]], token_mask(pattern, 100, 100)[[3, 7]])
