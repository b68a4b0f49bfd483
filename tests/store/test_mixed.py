"""The mixed-precision store (ZipCache): tokens the probe queries attend to keep the high bit width, the
share of high-precision tokens is exact, normalized scores do not favour early tokens, and the bytes are
what the two tiers hold."""

from __future__ import annotations

import pytest
import torch

from contextlab.store.codec import words
from contextlab.store.mixed import MixedStore, _probe_rows
from contextlab.store.quantized import QuantSpec

B, H, G, D = 2, 2, 2, 16


def _prompt(n: int, hot: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values and queries where every query attends mostly to the ``hot`` slots."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(D, generator=gen)
    keys = torch.randn(B, H, n, D, generator=gen) * 0.1
    keys[:, :, hot] += 3 * direction
    values = torch.randn(B, H, n, D, generator=gen)
    queries = direction.expand(B, H * G, n, D).clone()
    return keys, values, queries


def _settled(spec: QuantSpec, keys, values, queries) -> MixedStore:
    store = MixedStore(spec)
    store.append(keys, values)
    store.settle(queries, D**-0.5)
    return store


def test_tokens_the_probes_attend_to_keep_the_high_bits():
    hot = [3, 17, 40, 41, 90]
    spec = QuantSpec(bits=8, group=16, residual=16, low_bits=2, salient=0.1, tokenwise_keys=True)
    keys, values, queries = _prompt(112, hot)
    store = _settled(spec, keys, values, queries)
    g = store.groups[0]
    assert g.quantized == 96 and g.prefix.tier_length == {"high": 10, "low": 86}  # round(0.1 x 96)
    salient = g.prefix.buffers["salient"][:, :, :96]
    assert salient[:, :, hot].all() and int(salient.sum()) == B * H * 10
    k, v = g.used()
    for got, want in ((k, keys), (v, values)):
        error = (got[:, :, :96] - want[:, :, :96]).abs().amax(-1)  # [B, H, 96]
        assert error[salient].max() < 0.05 < error[~salient].mean()  # 8 bits vs 2 bits


def test_normalized_scores_divide_by_the_queries_that_could_see_each_token():
    # Uniform attention (all keys equal): query p gives 1 / (p + 1) to each slot it sees. Accumulated
    # attention favours the first slot ~150x over the last; normalized by the number of queries that could
    # see each slot, the first slot's score is sum_p 1/(p+1) / 64 and the last's 1/64.
    spec = QuantSpec(bits=4, group=16, residual=16, low_bits=2, salient=0.5)
    store = MixedStore(spec)
    store.append(torch.zeros(B, H, 64, D), torch.randn(B, H, 64, D))
    store._observe(torch.randn(B, H * G, 64, D), D**-0.5)
    normalized = store._normalized(0, store.groups[0])
    raw = store.scores[0]
    assert torch.equal(store.seen[0][0, 0], torch.arange(64, 0, -1).float())
    harmonic = sum(1 / (p + 1) for p in range(64))
    assert torch.allclose(normalized[..., 0], torch.tensor(harmonic / 64), rtol=1e-4)
    assert torch.allclose(normalized[..., -1], torch.tensor(1 / 64), rtol=1e-4)
    assert raw[..., 0].min() / raw[..., -1].max() > 30 * normalized[..., 0].max() / normalized[..., -1].min()


@pytest.mark.parametrize("tokenwise", [True, False])
def test_bytes_are_the_two_tiers_plus_slot_metadata(tokenwise):
    spec = QuantSpec(bits=4, group=16, residual=16, low_bits=2, salient=0.25, tokenwise_keys=tokenwise)
    keys, values, queries = _prompt(80, [5])
    store = _settled(spec, keys, values, queries)
    coded, tail = 64, 16
    high, low = 16, 48  # per-channel keys: whole groups of 16 tokens per tier
    key_meta = 2 * 2 if tokenwise else 2 * 2 * D // 16  # scale + zero per token, or per channel per 16 tokens
    per_token = {bits: 2 * words(D, bits) * 4 + key_meta + 2 * 2 * D // 16 for bits in (4, 2)}
    slots = coded + (coded // 16 * D * 2 if tokenwise else 0)  # tier flags, channel normalizers
    expected = B * H * (slots + high * per_token[4] + low * per_token[2] + tail * (2 * D * 4 + 4)) + B * tail * 4
    assert store.used_bytes() == expected
    assert store.tracker.current == store.nbytes()


def test_decode_keeps_scoring_and_eviction_rescores():
    spec = QuantSpec(bits=4, group=8, residual=8, low_bits=2, salient=0.5, tokenwise_keys=True)
    keys, values, queries = _prompt(40, [2])
    store = _settled(spec, keys, values, queries)
    for i in range(20):
        store.append(keys[:, :, i : i + 1], values[:, :, i : i + 1])
        store.settle(queries[:, :, i : i + 1], D**-0.5)
        g = store.groups[0]
        assert store.scores[0].shape[2] == g.tail and g.prefix.tier_length["high"] == g.quantized // 2
    keep = torch.arange(0, 60, 3).expand(B, H, -1)
    store.keep(keep, torch.ones_like(keep, dtype=torch.bool))
    assert store.scores == []
    store.settle(queries[:, :, :4], D**-0.5)
    assert store.groups[0].length == 20 and store.scores[0].shape[2] == store.groups[0].tail
    assert store.tracker.current == store.nbytes()


def test_probes_are_the_recent_queries_and_a_seeded_sample():
    assert torch.equal(_probe_rows(50, "cpu"), torch.arange(50))
    rows = _probe_rows(4000, "cpu")
    assert len(rows) == 400 and torch.equal(rows[-200:], torch.arange(3800, 4000))
    assert torch.equal(rows, _probe_rows(4000, "cpu")) and rows[:200].max() < 3800


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bits=2, low_bits=4), r"low bits \(4\) must be fewer than the high bits \(2\)"),
        (dict(low_bits=5), "bits must be one of"),
        (dict(low_bits=2, salient=1.5), r"salient must be a fraction in \[0, 1\]"),
    ],
)
def test_bad_mixed_specs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_per_channel_keys_pick_salient_tokens_a_group_at_a_time():
    hot = [3, 17, 40, 41, 90]
    spec = QuantSpec(bits=8, group=16, residual=16, low_bits=2, salient=0.2)
    keys, values, queries = _prompt(112, hot)
    store = _settled(spec, keys, values, queries)
    prefix = store.groups[0].prefix
    assert prefix.tier_length == {"high": 16, "low": 80}  # round(0.2 x 96 / 16) x 16
    salient = prefix.buffers["salient"][:, :, :96]
    assert salient[:, :, hot].all()
    k, _ = store.groups[0].used()
    error = (k[:, :, :96] - keys[:, :, :96]).abs().amax(-1)
    assert error[salient].max() < 0.05 < error[~salient].mean()
