"""Known-answer tests: hand-built q/k/v where the right tokens to keep are obvious."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from contextlab.methods.base import Budget, PrefillMethod, ScoreInputs, select_tokens
from contextlab.methods.eviction import H2O, TOVA, AdaKV, KNorm, PyramidKV, Random, SnapKV, Streaming

S, D = 10, 8


def inputs(keys: torch.Tensor, queries: torch.Tensor | None = None, keep: int = 3, layer: int = 0) -> ScoreInputs:
    """One row, one KV head (two query heads) unless the tensors say otherwise."""
    keys = keys.view(1, -1, keys.shape[-2], D) if keys.dim() < 4 else keys
    h, s = keys.shape[1], keys.shape[2]
    if queries is None:
        queries = torch.zeros(1, 2 * h, s, D)
    return ScoreInputs(
        queries=queries,
        keys=keys,
        values=torch.randn_like(keys),
        valid=torch.ones(1, 1, s, dtype=torch.bool),
        positions=torch.arange(s)[None, None],
        keep=torch.tensor([keep]),
        lengths=torch.tensor([s]),
        scaling=1.0,
        layer_idx=layer,
        num_layers=4,
    )


def kept(method: PrefillMethod, inp: ScoreInputs) -> list[list[int]]:
    scores = method.score(inp)
    idx, ok = select_tokens(scores, method.keep_counts(inp, scores), inp.valid)
    return [row[m].tolist() for row, m in zip(idx[0], ok[0], strict=True)]


def one_hot(i: int, scale: float = 20.0) -> torch.Tensor:
    v = torch.zeros(D)
    v[i % D] = scale
    return v


def test_knorm_keeps_lowest_norm_keys():
    norms = torch.tensor([5.0, 1.0, 3.0, 2.0, 9.0, 8.0, 7.0, 6.0, 4.0, 10.0])
    keys = torch.ones(S, D) / D**0.5 * norms[:, None]
    assert kept(KNorm(budget=Budget(tokens=3)), inputs(keys)) == [[1, 2, 3]]


def test_streaming_keeps_sinks_and_recent_window():
    method = Streaming(sink=2, window=3)
    assert method.effective_budget == Budget(tokens=5) and method.budget is None
    assert kept(method, inputs(torch.randn(S, D), keep=5)) == [[0, 1, 7, 8, 9]]


def test_snapkv_keeps_what_the_window_attends_to_plus_the_window():
    keys = torch.stack([one_hot(i, 1.0) for i in range(S)])
    queries = torch.zeros(1, 2, S, D)
    queries[0, :, -2:] = one_hot(3)  # the last two queries look at token 3 (and 3 + D = 11 does not exist)
    method = SnapKV(budget=Budget(tokens=3), window=2, kernel=1)
    assert kept(method, inputs(keys, queries)) == [[3, 8, 9]]


def test_snapkv_pooling_spreads_votes_to_neighbours():
    keys = torch.stack([one_hot(i, 1.0) for i in range(S)])
    queries = torch.zeros(1, 2, S, D)
    queries[0, :, -1] = one_hot(4, 40.0)
    method = SnapKV(budget=Budget(tokens=4), window=1, kernel=3)
    assert kept(method, inputs(keys, queries, keep=4)) == [[3, 4, 5, 9]]


def test_tova_keeps_what_the_last_query_attends_to():
    keys = torch.stack([one_hot(i, 1.0) for i in range(S)])
    queries = torch.zeros(1, 2, S, D)
    queries[0, :, -1] = one_hot(2)
    assert kept(TOVA(budget=Budget(tokens=2)), inputs(keys, queries, keep=2)) == [[2, 9]]


def test_h2o_keeps_heavy_hitters_and_recent_tokens():
    keys = torch.stack([one_hot(i, 1.0) for i in range(S)])
    queries = torch.zeros(1, 2, S, D)
    queries[0, :, 4:] = one_hot(1) + one_hot(4)  # every later query attends to tokens 1 and 4
    method = H2O(budget=Budget(tokens=4), recent=0.5, chunk=3)  # chunked accumulation
    assert kept(method, inputs(keys, queries, keep=4)) == [[1, 4, 8, 9]]


def test_random_is_seeded_and_batch_independent():
    inp = inputs(torch.randn(S, D), keep=4)
    a, b = (
        kept(Random(budget=Budget(tokens=4), seed=1), inp),
        kept(Random(budget=Budget(tokens=4), seed=1), inp),
    )
    c = kept(Random(budget=Budget(tokens=4), seed=2), inp)
    assert a == b and a != c and len(a[0]) == 4


def test_pyramidkv_budgets_shrink_with_depth_and_sum_to_the_budget():
    method = PyramidKV(budget=Budget(tokens=100), window=4)
    counts = method.schedule(keep=100, length=1000, num_layers=8)
    assert counts == sorted(counts, reverse=True) and sum(counts) == 800
    assert counts[0] == 195 and counts[-1] == 5  # 2k - k/beta and k/beta with beta = 20
    assert method.schedule(keep=50, length=50, num_layers=8) == [50] * 8


@dataclass(frozen=True, eq=False)
class FixedScores(PrefillMethod):
    """A scorer returning preset scores, to test budget rules in isolation."""

    name = "fixed"
    scores: tuple = ()

    def score(self, inputs):
        return torch.tensor(self.scores, dtype=torch.float64)[None]


def test_adakv_moves_budget_to_the_heads_that_need_it():
    head0 = [10.0, 9.0] + [0.1] * 8  # two sharp peaks
    head1 = [5.0] * 10  # flat: many tokens matter
    scorer = FixedScores(scores=(head0, head1))
    inp = inputs(torch.randn(2, S, D), keep=3)
    assert [len(h) for h in kept(AdaKV(budget=Budget(tokens=3), scorer=scorer, alpha=0.0), inp)] == [2, 4]
    safeguarded = kept(AdaKV(budget=Budget(tokens=3), scorer=scorer, alpha=1.0), inp)
    assert [len(h) for h in safeguarded] == [3, 3]


def test_select_tokens_ragged_rows_mark_unused_slots():
    scores = torch.arange(6, dtype=torch.float64).view(1, 1, 6).expand(2, 1, 6)
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])[:, None]
    idx, ok = select_tokens(scores, torch.tensor([[3], [2]]), valid)
    assert idx[0, 0].tolist() == [3, 4, 5] and ok[0, 0].all()
    assert idx[1, 0][ok[1, 0]].tolist() == [4, 5] and ok[1, 0].tolist() == [True, True, False]


@pytest.mark.parametrize("bad", [dict(window=0), dict(kernel=2), dict(pooling="median")])
def test_snapkv_rejects_bad_parameters(bad):
    with pytest.raises(ValueError):
        SnapKV(budget=Budget(ratio=0.5), **bad)
