"""The dense store: in-place growth, honest bytes, eviction that compacts and gives memory back."""

from __future__ import annotations

import math

import pytest
import torch

from contextlab.store import DenseStore, MemoryTracker


def _tokens(n: int, b: int = 2, h: int = 3, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen)


def test_ten_thousand_appends_reallocate_logarithmically_and_match_cat():
    store = DenseStore(growth=1.5)
    keys, values = _tokens(10_000)
    for i in range(10_000):
        store.append(keys[:, :, i : i + 1], values[:, :, i : i + 1])
    k, v = store.groups[0].used()
    assert torch.equal(k, keys) and torch.equal(v, values)  # the torch.cat reference is the input itself
    assert store.reallocations <= math.ceil(math.log(10_000) / math.log(1.5)) + 1  # 24 for 10,000 tokens
    assert store.reallocations >= 10  # it does grow (a store that preallocated everything would not)


def test_reserve_plans_the_first_allocation_and_then_never_reallocates():
    store = DenseStore()
    store.reserve(100)
    keys, values = _tokens(100)
    store.append(keys[:, :, :60], values[:, :, :60])
    for i in range(60, 100):
        store.append(keys[:, :, i : i + 1], values[:, :, i : i + 1])
    assert store.reallocations == 0 and store.groups[0].capacity == 100


def test_nbytes_counts_capacity_and_used_bytes_count_slots():
    tracker = MemoryTracker()
    store = DenseStore(tracker)
    store.reserve(10)
    keys, values = _tokens(4)
    store.append(keys, values)
    per_slot = 2 * 2 * 3 * 4 * 4  # K and V, [B=2, H=3, D=4] fp32
    assert store.nbytes() == 10 * per_slot and store.used_bytes() == 4 * per_slot
    assert tracker.current == store.nbytes()
    store.mark_new(4, torch.tensor([[False, True, True, True]] * 2), torch.arange(4).expand(2, 4))
    assert store.nbytes() == 10 * per_slot + 2 * 10  # a validity byte per row and slot once padding appears
    assert tracker.current == store.nbytes()


def _every_fourth_kept(tracker: MemoryTracker) -> tuple[DenseStore, torch.Tensor, torch.Tensor]:
    """A store of 400 tokens (1 row, 2 heads) that kept every fourth slot (head 1 shifted by one), with room
    for 10 more: the store, the prompt's keys and the kept indices ``[1, 2, 100]``."""
    store = DenseStore(tracker)
    keys, values = _tokens(400, b=1, h=2)
    store.append(keys, values)
    indices = torch.stack([torch.arange(0, 400, 4), torch.arange(1, 400, 4)])[None]
    store.keep(indices, torch.ones_like(indices, dtype=torch.bool), headroom=10)
    return store, keys, indices


def test_eviction_compacts_in_place_and_shrinks():
    tracker = MemoryTracker()
    store, keys, indices = _every_fourth_kept(tracker)
    g = store.groups[0]
    k, _v = g.used()
    expected = keys.gather(2, indices[..., None].expand(-1, -1, -1, keys.shape[-1]))
    assert torch.equal(k, expected) and g.length == 100 and g.capacity == 110
    assert torch.equal(store.view().positions, indices)
    assert tracker.current == store.nbytes() and tracker.peak >= 400 * 2 * 2 * 4 * 2


def test_small_surplus_is_kept_instead_of_copied():
    store = DenseStore()
    keys, values = _tokens(110, b=1, h=1)
    store.append(keys, values)
    store.keep(torch.arange(100)[None, None], torch.ones(1, 1, 100, dtype=torch.bool))
    assert store.groups[0].capacity == 110 and store.reallocations == 0


def test_ragged_heads_are_regrouped_and_the_view_is_right_aligned():
    store = DenseStore()
    keys, values = _tokens(8, b=1, h=3)
    store.append(keys, values)
    indices = torch.tensor([[[0, 2, 5, 7], [1, 3, 0, 0], [4, 5, 6, 7]]])
    kept = torch.tensor([[[True] * 4, [True, True, False, False], [True] * 4]])
    store.keep(indices, kept)
    assert sorted((g.length, g.heads.tolist()) for g in store.groups) == [(2, [1]), (4, [0, 2])]
    view = store.view()
    assert view.valid[0, 1].tolist() == [False, False, True, True]  # head 1's 2 slots are the last columns
    assert torch.equal(view.keys[0, 1, 2:], keys[0, 1, [1, 3]])
    assert view.positions[0, 1, 2:].tolist() == [1, 3] and view.offsets.tolist() == [0, 2, 0]
    more_k, more_v = _tokens(1, b=1, h=3, seed=1)
    store.append(more_k, more_v)  # appends go to every group
    assert torch.equal(store.view().keys[:, :, -1], more_k[:, :, 0])


def test_crop_only_removes_fresh_slots():
    store = DenseStore()
    keys, values = _tokens(6, b=1, h=1)
    store.append(keys, values)
    store.keep(torch.arange(3)[None, None], torch.ones(1, 1, 3, dtype=torch.bool))
    store.append(*_tokens(2, b=1, h=1))
    with pytest.raises(ValueError, match="only 2 were appended"):
        store.crop(3)
    store.crop(2)
    assert store.length == 3


def test_growth_must_be_above_one():
    with pytest.raises(ValueError, match="growth must be > 1"):
        DenseStore(growth=1.0)


def test_kept_positions_take_two_bytes_until_a_position_passes_int16():
    tracker = MemoryTracker()
    store, _, indices = _every_fourth_kept(tracker)
    g = store.groups[0]
    assert g.positions.dtype == torch.int16 and g.positions.nbytes == 2 * 2 * 110
    step_k, step_v = _tokens(1, b=1, h=2, seed=1)
    store.append(step_k, step_v)
    store.mark_new(1, None, torch.tensor([[32767]]), largest=32767)  # still fits
    assert g.positions.dtype == torch.int16
    store.append(step_k, step_v)
    store.mark_new(1, None, torch.tensor([[40_000]]), largest=40_000)
    assert g.positions.dtype == torch.int32 and tracker.current == store.nbytes()
    expected = torch.cat([indices, torch.tensor([32767, 40_000]).expand(1, 2, 2)], dim=-1)
    assert torch.equal(store.view().positions, expected)  # earlier positions survive the widening
    store.append(step_k, step_v)
    store.mark_new(1, None, torch.tensor([[40_001]]))  # no bound given: the positions themselves are read
    assert store.view().positions[0, 0, -1] == 40_001


def test_a_prompt_past_int16_keeps_int32_positions():
    store = DenseStore()
    keys, values = _tokens(8, b=1, h=1)
    store.append(keys, values)
    store.keep(torch.arange(0, 8, 2)[None, None], torch.ones(1, 1, 4, dtype=torch.bool))
    assert store.groups[0].positions.dtype == torch.int16
    store = DenseStore()
    store.append(keys, values)
    store.mark_new(8, None, None)
    store.groups[0].positions = torch.arange(40_000, 40_008, dtype=torch.int32)[None, None]  # explicit, past int16
    store.keep(torch.arange(0, 8, 2)[None, None], torch.ones(1, 1, 4, dtype=torch.bool))
    assert store.groups[0].positions.dtype == torch.int32
    assert store.view().positions[0, 0].tolist() == [40_000, 40_002, 40_004, 40_006]
