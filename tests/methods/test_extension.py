"""Window-extension methods: parameters, the windows they claim, and refusals of bad input."""

from __future__ import annotations

import pytest
import torch

import contextlab as cl
from contextlab.methods.base import PROTECTED
from contextlab.methods.extension import SHARED_VOTES, LMInfinite, SelfExtend, String, add_votes
from contextlab.methods.policy import Step
from contextlab.methods.positions import Far, Near


def test_selfextend_picks_the_smallest_group_that_fits():
    m = SelfExtend()
    assert m.group_for(4000, 4096) == 1  # inside the window: exactly full attention
    assert m.branches(None, None, 3999, [4000], 4096) is None
    assert m.group_for(4096, 4096) == 1
    for needed in (4097, 8000, 16000, 33000):
        g = m.group_for(needed, 4096)
        w = 1024
        assert (needed - 1) // g + w - w // g <= 2047  # below reach (0.5) x the native window
        assert g == 1 or (needed - 1) // (g - 1) + w - w // (g - 1) > 2047
    assert SelfExtend(reach=1.0).group_for(8000, 4096) == 3
    assert m.window_for(4096) is None  # an unset group grows with the length


def test_selfextend_with_a_fixed_group_claims_what_it_can_reach():
    m = SelfExtend(group=4, window=1024)
    limit = m.window_for(4096)
    assert limit == (4096 - 1024 + 256) * 4
    assert (limit - 1) // 4 + 1024 - 256 <= 4095 < limit // 4 + 1024 - 256


def test_string_offset_rises_to_keep_distances_inside_the_window():
    m = String()
    assert m.offset_for(3000, 4096) == round(0.33 * 3000)
    s = m.offset_for(8000, 4096)
    assert 8000 - 1 - s + 128 <= 4095 and m.local_for(4096) == 128 and m.local_for(64) == 4
    assert String(offset=2000, local=128).window_for(4096) == 4096 + 2000 - 128
    assert m.window_for(4096) == 2 * 4096 - 128  # one shift: the exact pairs must stay inside the window too
    assert m.offset_for(8000, 4096) <= 4096


def test_branches_are_disjoint_and_cover_every_pair():
    import torch

    q_pos = torch.arange(200).view(1, -1)
    k_pos = torch.arange(200).view(1, 1, -1)
    for method in (SelfExtend(group=4, window=16), String(offset=50, local=8)):
        branches = method.branches(q_pos, k_pos, 199, [200], 64)
        hits = sum(b.region.contains(q_pos[:, None, :, None], k_pos[:, :, None, :]).int() for b in branches)
        assert bool((hits == 1).all())
    assert isinstance(branches[0].region, Near) and isinstance(branches[1].region, Far)


@pytest.mark.parametrize(
    "spec,error",
    [
        ("selfextend:group=0", "group must be an integer >= 1"),
        ("selfextend:reach=2", "reach must be a number in [0.0, 1.0]"),
        ("string:offset=100,local=128", "offset (100) must be larger than local (128)"),
        ("string:shift=1.5", "shift must be a number in [0.0, 1.0]"),
        ("ntk:factor=0.5", "factor must be a number in [1.0"),
        ("lminfinite:window=1", "window must be an integer >= 2"),
        ("selfextend+string", "both take the position remapping role"),
        ("selfextend+ntk", "both take the position remapping role"),
        ("lminfinite+snapkv:0.5", "both take the prefill eviction role"),
    ],
)
def test_bad_specs_are_refused(spec, error):
    with pytest.raises(ValueError) as err:
        cl.method(spec)
    assert error in str(err.value)


@pytest.mark.parametrize(
    "method,error",
    [
        (SelfExtend(window=4096), "selfextend window of 4096 positions must be smaller than the model's native window"),
        (String(local=5000), "string local window of 5000"),
        (SelfExtend(window=2048), "selfextend reach 0.5 x the native window (2048 positions) leaves no room"),
        (String(offset=5000), "string offset of 5000 exceeds the model's native window of 4096"),
        (LMInfinite(window=5000), "lminfinite window of 5000 exceeds the model's native window of 4096"),
    ],
)
def test_windows_larger_than_the_native_one_are_refused(method, error):
    with pytest.raises(ValueError) as err:
        method.window_for(4096)
    assert error in str(err.value)


def test_composition_takes_the_extenders_window():
    assert cl.method("selfextend+snapkv:0.5").window_for(4096) is None
    assert cl.method("string+snapkv:0.75").window_for(4096) == 2 * 4096 - 128
    assert cl.method("selfextend:group=2,window=1024+snapkv:0.5").window_for(4096) == (4096 - 1024 + 512) * 2
    assert cl.method("snapkv:0.5").window_for(4096) == 4096
    assert cl.method("yarn:factor=4").window_for(4096) == 16384


def _step(layer: int, shared: dict) -> Step:
    return Step(torch.zeros(1, 2, 1, 4), 1.0, "prefill", [6], layer, 2, shared=shared)


def test_infiniretri_share_all_adds_the_normalised_votes_of_every_layer_by_position():
    shared: dict = {}
    valid = torch.ones(1, 2, 4, dtype=torch.bool)
    # layer 0 holds positions 0-3; both heads vote for position 1, at different scales
    low = torch.tensor([[[1.0, 3.0, 0.0, 0.0], [0.0, 6.0, 2.0, 0.0]]], dtype=torch.float64)
    add_votes(low, torch.arange(4).view(1, 1, 4).expand(1, 2, 4), valid, _step(0, shared))
    # normalised per head (1/4, 3/4, 0, 0) and (0, 3/4, 1/4, 0), averaged over the two heads
    expect = torch.tensor([[0.125, 0.75, 0.125, 0.0]], dtype=torch.float64)
    assert torch.allclose(shared[SHARED_VOTES], expect)
    # layer 1 holds positions 0, 2, 4, 5 (5 protected, slot 2 invalid): its vote goes to position 2
    high = torch.tensor([[[0.0, 5.0, 9.0, PROTECTED + 5], [0.0, 5.0, 9.0, PROTECTED + 5]]], dtype=torch.float64)
    valid1 = torch.tensor([[[True, True, False, True]]]).expand(1, 2, 4)
    add_votes(high, torch.tensor([0, 2, 4, 5]).view(1, 1, 4).expand(1, 2, 4), valid1, _step(1, shared))
    expect = torch.tensor([[0.125, 0.75, 1.125, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(shared[SHARED_VOTES], expect)
    # the next forward starts again at layer 0: the votes of the last one are gone
    add_votes(low, torch.arange(4).view(1, 1, 4).expand(1, 2, 4), valid, _step(0, shared))
    assert torch.allclose(shared[SHARED_VOTES], torch.tensor([[0.125, 0.75, 0.125, 0.0]], dtype=torch.float64))
