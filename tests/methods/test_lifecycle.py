"""The method lifecycle end to end: chunked prefill, decode-time eviction, read plans, composition."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import contextlab as cl
from contextlab.engine.inputs import positions_from_mask
from contextlab.hf.cache import ContextlabCache
from contextlab.hf.compat import cache_kwarg
from contextlab.methods.base import Method
from contextlab.methods.policy import LayerPolicy, ReadPlan, Step
from contextlab.store import DenseStore

CONTEXT = "The archive holds many ledgers; the seventh is bound in green leather and kept apart. " * 6
CONTEXTS = [CONTEXT[:300], CONTEXT[:420], CONTEXT]


def _feed_tokens(model, cache, mask: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Feed tokens one at a time (batch of one) and return the logits of the last."""
    with torch.no_grad(), cl.attention_enabled(model):
        for t in tokens:
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            out = model(
                torch.tensor([[t]]),
                attention_mask=mask,
                position_ids=positions_from_mask(mask)[:, -1:],
                **{cache_kwarg(model): cache},
            )
    return out.logits[:, -1]


def test_chunked_snapkv_with_one_chunk_is_todays_snapkv(llama, tokenizer):
    ids = tokenizer(CONTEXT)["input_ids"]
    whole = cl.generate(llama, tokenizer, CONTEXT, "Which ledger?", method="snapkv:0.75", max_new_tokens=4)
    one = cl.generate(
        llama,
        tokenizer,
        CONTEXT,
        "Which ledger?",
        method=f"snapkv:0.75,prefill_chunk={len(ids) + 50}",
        max_new_tokens=4,
    )
    assert one.tokens == whole.tokens
    for a, b in zip(one.kept_positions, whole.kept_positions, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", ["snapkv:0.75", "adakv:0.75", "pyramidkv:0.75", "h2o:0.75", "streaming:0.75"])
def test_chunked_prefill_bounds_the_peak_to_budget_plus_a_chunk(llama, tokenizer, spec):
    chunk = 64
    whole = cl.prefill(llama, tokenizer, CONTEXT, method=spec)
    chunked = cl.prefill(llama, tokenizer, CONTEXT, method=f"{spec},prefill_chunk={chunk}")
    n = chunked.input_ids.shape[1]
    keep = cl.method(spec).prompt_keep(n)
    layers = llama.config.num_hidden_layers
    per_slot = whole.cache.kv_bytes() // (layers * keep * llama.config.num_key_value_heads)  # K, V, position
    assert chunked.cache.kv_bytes() == whole.cache.kv_bytes()  # same budget at the end
    bound = layers * llama.config.num_key_value_heads * per_slot * (keep + chunk)
    if spec.startswith("pyramidkv"):  # the bottom layer keeps up to twice the mean budget
        bound = bound * 3 // 2
    if spec.startswith("adakv"):  # heads regrouped by count at every chunk: one layer is copied at a time
        bound *= 2
    assert chunked.cache.peak_bytes <= bound
    if not spec.startswith("adakv"):
        assert chunked.cache.peak_bytes < whole.cache.peak_bytes


def test_chunked_prefill_in_a_batch_equals_rows_one_by_one(llama, tokenizer):
    spec = "snapkv:0.6,prefill_chunk=48"
    batch = cl.generate(llama, tokenizer, CONTEXTS, "Which ledger?", method=spec, max_new_tokens=5)
    for i, ctx in enumerate(CONTEXTS):
        single = cl.generate(llama, tokenizer, ctx, "Which ledger?", method=spec, max_new_tokens=5)
        assert batch.token_ids[i] == single.tokens
        for layer_batch, layer_single in zip(batch.kept_positions, single.kept_positions, strict=True):
            for h in range(layer_batch.shape[1]):
                mine = layer_batch[i, h][layer_batch[i, h] >= 0]
                assert torch.equal(mine, layer_single[0, h][layer_single[0, h] >= 0])


@pytest.mark.parametrize("scorer", ["h2o", "tova", "streaming", "knorm", "snapkv(window=4)"])
@pytest.mark.parametrize("every", [1, 5])
def test_decode_eviction_holds_the_budget_plus_at_most_every_minus_one(llama, tokenizer, scorer, every):
    budget = 40
    done = cl.prefill(llama, tokenizer, CONTEXT[:200], method=f"decode({scorer},budget={budget},every={every})")
    n = done.input_ids.shape[1]
    assert all(layer.store.length == n for layer in done.cache.compressible)  # nothing evicted at prefill
    generated = 23
    _feed_tokens(llama, done.cache, done.attention_mask, list(range(65, 65 + generated)))
    for layer in done.cache.compressible:
        assert layer.store.length == budget + generated % every
        view = layer.store.view()
        for row in view.positions[0].expand(layer.kv_heads, -1):
            assert torch.equal(row, row.unique(sorted=True))  # positions sorted and unique
        if scorer != "knorm":  # every scorer but knorm protects the newest tokens
            assert int(view.positions.max()) == n + generated - 1


def test_decode_eviction_in_a_batch_equals_rows_one_by_one(llama, tokenizer):
    spec = "snapkv:0.5+decode(h2o,budget=48,every=6)"
    batch = cl.generate(llama, tokenizer, CONTEXTS, "Which ledger?", method=spec, max_new_tokens=30)
    for i, ctx in enumerate(CONTEXTS):
        single = cl.generate(llama, tokenizer, ctx, "Which ledger?", method=spec, max_new_tokens=30)
        assert batch.token_ids[i] == single.tokens, f"row {i}"


def test_decode_eviction_bounds_the_cache_of_a_long_answer(llama, tokenizer):
    free = cl.generate(llama, tokenizer, CONTEXT, "Which?", method="full", max_new_tokens=60)
    bounded = cl.generate(
        llama, tokenizer, CONTEXT, "Which?", method="decode(h2o,budget=64,every=8)", max_new_tokens=60
    )
    assert bounded.kv_bytes == free.kv_bytes  # the prompt is untouched ...
    assert bounded.kv_bytes_end < 0.5 * free.kv_bytes_end  # ... and the cache is cut back while answering


def test_h2o_decode_importance_carries_over_evictions(llama, tokenizer):
    done = cl.prefill(llama, tokenizer, CONTEXT[:200], method="decode(h2o,budget=40,every=4)")
    _feed_tokens(llama, done.cache, done.attention_mask, list(range(65, 85)))
    policy = done.cache.compressible[0].policy
    assert policy.carried is not None and policy.carried.shape[-1] == 40
    assert (
        float(policy.carried.sum()) > 0
        and done.cache.compressible[0].nbytes() > done.cache.compressible[0].store.used_bytes()
    )


# -- the before-attend hook: a policy that reads a subset of slots ----------------------------------------
class _ReadSubset(LayerPolicy):
    def __init__(self, drop: int) -> None:
        self.drop = drop

    def before_attend(self, store: DenseStore, step: Step) -> ReadPlan | None:
        if step.phase != "decode":
            return None
        b, h, s = store.view().keys.shape[:3]
        keep = torch.tensor([i for i in range(s) if i % self.drop != 1 or i == s - 1])  # skip some, read the newest
        indices = keep.view(1, 1, -1).expand(b, h, -1)
        return ReadPlan(indices=indices, valid=torch.ones_like(indices, dtype=torch.bool))


@dataclass(frozen=True, eq=False)
class _ReadSubsetMethod(Method):
    name = "read-subset"
    drop: int = 3

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        return _ReadSubset(self.drop)


def test_a_read_plan_equals_evicting_the_unread_slots(llama, tokenizer):
    ids = torch.tensor([tokenizer(CONTEXT[:150])["input_ids"]])
    n = ids.shape[1]
    mask = torch.ones(1, n, dtype=torch.long)
    logits = []
    for method in (_ReadSubsetMethod(), None):
        cache = ContextlabCache(llama.config, method)
        cache.begin_prompt(n, [n])
        with torch.no_grad(), cl.attention_enabled(llama):
            llama(ids, **{cache_kwarg(llama): cache})
        if method is None:  # the reference evicts, for good, the slots the plan does not read (the newest stays)
            for layer in cache.compressible:
                keep = torch.tensor([i for i in range(n) if i % 3 != 1])
                idx = keep.view(1, 1, -1).expand(1, layer.kv_heads, -1)
                layer.store.keep(idx, torch.ones_like(idx, dtype=torch.bool), headroom=1)
        logits.append(_feed_tokens(llama, cache, mask, [70]))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
