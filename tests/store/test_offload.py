"""The offloading store: old slots move to host memory a unit at a time, the newest ``resident`` stay in the
buffers, every read (whole, a span, gathered slots) gives back exactly what was appended, metadata stays
with the buffers, and every byte copied back is counted."""

from __future__ import annotations

import pytest
import torch

from contextlab.store import MemoryTracker, offload
from contextlab.store.offload import OffloadStore

B, H, D = 2, 3, 8
pytestmark = pytest.mark.usefixtures("offload_on_cpu")


def _tokens(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, D, generator=gen), torch.randn(B, H, n, D, generator=gen)


def _filled(n: int, resident: int = 10, unit: int = 4, tracker: MemoryTracker | None = None):
    store = OffloadStore(resident, unit, tracker)
    keys, values = _tokens(n)
    store.reserve(n)
    store.append(keys, values)
    store.settle()
    return store, keys, values


@pytest.mark.parametrize(("n", "moved"), [(9, 0), (14, 4), (30, 20), (33, 20)])
def test_whole_units_beyond_the_resident_slots_leave_the_buffers(n, moved):
    store, keys, values = _filled(n)
    g = store.groups[0]
    assert g.quantized == moved and g.tail == n - moved
    assert 10 <= g.tail < 10 + 4 or n < 14
    read_keys, read_values = g.used()
    assert torch.equal(read_keys, keys) and torch.equal(read_values, values)


def test_decoding_keeps_the_buffers_bounded_and_every_slot_readable():
    store, keys, values = _filled(20)
    extra_keys, extra_values = _tokens(25, seed=1)
    for i in range(25):
        store.append(extra_keys[:, :, i : i + 1], extra_values[:, :, i : i + 1])
        store.settle()
        assert store.groups[0].tail < 10 + 4
    all_keys, all_values = torch.cat([keys, extra_keys], 2), torch.cat([values, extra_values], 2)
    g = store.groups[0]
    assert torch.equal(g.used()[0], all_keys) and torch.equal(g.used()[1], all_values)
    for start, end in ((0, 7), (5, 40), (33, 45), (38, 45)):
        span = g.span(start, end)
        assert torch.equal(span[0], all_keys[:, :, start:end]) and torch.equal(span[1], all_values[:, :, start:end])


def test_gathered_slots_come_from_host_and_buffers_and_only_host_slots_are_copied():
    store, keys, values = _filled(30)  # 20 slots on the host, 10 in the buffers
    g = store.groups[0]
    gen = torch.Generator().manual_seed(3)
    indices = torch.stack([torch.randperm(30, generator=gen)[:12] for _ in range(B * H)]).view(B, H, 12)
    before = store.moved_bytes
    got_keys, got_values = g.gather(indices)
    index = indices.unsqueeze(-1).expand(B, H, 12, D)
    assert torch.equal(got_keys, keys.gather(2, index)) and torch.equal(got_values, values.gather(2, index))
    on_host = int((indices < 20).sum(-1).max())  # per head, the most host slots any row and head reads
    assert store.moved_bytes - before == 2 * B * H * on_host * D * keys.element_size()
    only_keys, none = g.gather(indices, values=False)
    assert torch.equal(only_keys, got_keys) and none is None
    resident = indices.clamp(min=20)
    before = store.moved_bytes
    g.gather(resident)
    assert store.moved_bytes == before  # nothing on the host: nothing copied


def test_validity_and_positions_stay_with_the_buffers_and_are_read_across_the_split():
    store = OffloadStore(6, 2)
    keys, values = _tokens(16)
    store.append(keys, values)
    valid = torch.ones(B, 16, dtype=torch.bool)
    valid[0, :3] = False  # left padding of row 0
    store.mark_new(16, valid, None)
    store.settle()
    g = store.groups[0]
    assert g.quantized == 10 and g.prefix.valid.device == keys.device
    assert torch.equal(g.used_valid()[:, 0], valid)


def test_bytes_count_the_device_only_and_the_tracker_follows():
    tracker = MemoryTracker()
    store, keys, _ = _filled(30, tracker=tracker)
    assert tracker.current == store.nbytes()
    assert store.host_bytes() == 0  # host and device are the same memory here: counted once, in nbytes
    assert store.nbytes() >= 2 * keys.nbytes


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="resident >= 1 and unit >= 1"):
        OffloadStore(0, 4)


def test_where_the_cache_already_lives_in_host_memory_the_store_stays_dense_and_says_so(monkeypatch):
    monkeypatch.setattr(offload, "separate_memory", lambda device, host: device != host)  # the real rule
    store = OffloadStore(10, 4)
    keys, values = _tokens(30)
    store.append(keys, values)
    with pytest.warns(RuntimeWarning, match="offloading to cpu does nothing here"):
        store.settle()
    assert store.groups[0].prefix is None and store.groups[0].tail == 30
    store.append(*_tokens(1, seed=2))
    store.settle()  # decided once: no second warning, still dense
    assert store.groups[0].prefix is None and store.moved_bytes == 0
    assert offload.separate_memory(torch.device("cuda", 0), torch.device("cpu"))


def test_only_host_slots_that_are_read_are_copied():
    """A read plan pads its rows with unused entries: those are never copied from the host."""
    store, keys, _ = _filled(30)  # 20 slots on the host
    g = store.groups[0]
    indices = torch.tensor([0, 1, 2, 25]).expand(B, H, 4)
    valid = torch.tensor([True, False, False, True]).expand(B, H, 4)
    before = store.moved_bytes
    got, _ = g.gather(indices, valid=valid)
    per_slot = B * H * D * keys.element_size()
    assert store.moved_bytes - before == 2 * per_slot * 1  # slot 0 (keys and values) for every row and head
    assert torch.equal(got[:, :, [0, 3]], keys[:, :, [0, 25]])


def test_a_saved_offloaded_store_names_the_tensors_that_stay_in_host_memory():
    store, _, _ = _filled(30)
    meta, tensors = store.export()
    held = store.host_held(meta)
    assert held == {"g0.prefix.keys", "g0.prefix.values"} and held <= set(tensors)
    dense = OffloadStore(40, 4, None)  # everything resident: nothing on the host
    keys, values = _tokens(9)
    dense.reserve(9)
    dense.append(keys, values)
    dense.settle()
    assert dense.host_held(dense.export()[0]) == set()
