"""The contextlab cache layer: logical vs physical lengths, ragged heads, cache operations, no fallback."""

from __future__ import annotations

import pytest
import torch

import contextlab as cl
from contextlab.hf.attention import contextlab_attention
from contextlab.hf.cache import ContextlabCache, ContextlabLayer
from contextlab.hf.compat import cache_kwarg
from contextlab.methods.base import Budget
from contextlab.methods.eviction import AdaKV, SnapKV
from tests.conftest import tiny_model

TEXT = "A quick brown fox jumps. " * 8


def _compressed(model, tokenizer, spec: str, text: str = TEXT):
    return cl.prefill(model, tokenizer, text, method=spec)


def _feed(model, cache, ids: torch.Tensor, **kwargs):
    with torch.no_grad(), cl.attention_enabled(model):
        return model(ids, **{cache_kwarg(model): cache}, **kwargs)


def test_logical_length_and_mask_sizes_after_compression(llama, tokenizer):
    done = _compressed(llama, tokenizer, "snapkv:0.5")
    n = done.input_ids.shape[1]
    layer = done.cache.layers[0]
    assert done.cache.get_seq_length() == n  # logical: positions continue after the prompt
    assert layer.store.length == n - n // 2  # physical: half the tokens
    assert layer.get_mask_sizes(1) == (1, n)  # transformers' mask covers only the new tokens
    _feed(llama, done.cache, torch.tensor([[65, 66, 67]]), attention_mask=torch.ones(1, n + 3, dtype=torch.long))
    assert done.cache.get_seq_length() == n + 3 and layer.get_mask_sizes(1) == (1, n + 3)
    assert layer.store.length == n - n // 2 + 3


def test_per_head_budgets_store_each_head_at_its_own_size(llama, tokenizer):
    done = _compressed(llama, tokenizer, "adakv:ratio=0.5,alpha=0.0")
    for layer in done.cache.compressible:
        view = layer.store.view()
        counts = view.valid.expand(-1, layer.kv_heads, -1).sum(-1)[0]  # [H]
        sizes = {int(h): g.length for g in layer.store.groups for h in g.heads}
        assert [sizes[h] for h in range(layer.kv_heads)] == counts.tolist()
        stored = sum(g.keys.numel() for g in layer.store.groups)
        assert stored == int(counts.sum()) * view.keys.shape[-1]  # no padding to the largest head


def test_reorder_and_batch_select_follow_the_batch(llama, tokenizer):
    done = cl.prefill(llama, tokenizer, ["first context " * 6, "second one, a bit longer " * 5], method="snapkv:0.5")
    store = done.cache.layers[0].store
    before = store.groups[0].used()[0].clone()
    done.cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(store.groups[0].used()[0], before.flip(0))
    done.cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(store.groups[0].used()[0], before[:1]) and store.view().positions.shape[0] == 1


def test_crop_removes_only_tokens_appended_after_eviction(llama, tokenizer):
    done = _compressed(llama, tokenizer, "snapkv:0.5")
    layer = done.cache.layers[0]
    with pytest.raises(ValueError, match="only the 0 tokens appended"):
        layer.crop(-1)
    _feed(llama, done.cache, torch.tensor([[70, 71]]))
    size = layer.store.length
    done.cache.crop(-2)
    assert layer.store.length == size - 2 and layer.get_seq_length() == done.input_ids.shape[1]


def test_eviction_waits_for_the_announced_prompt_end(llama, tokenizer):
    method = SnapKV(budget=Budget(tokens=8), window=4)
    cache = ContextlabCache(llama.config, method)
    ids = torch.tensor([tokenizer("some prompt text here, long enough")["input_ids"]])
    n = ids.shape[1]
    cache.begin_prompt(n + 5, [n + 5])
    _feed(llama, cache, ids)
    assert cache.layers[0].store.length == n  # not at the prompt's end yet: nothing evicted
    _feed(llama, cache, torch.tensor([[65] * 5]))
    assert cache.layers[0].store.length == 8


def test_memory_tracker_sees_the_transient_full_layer(llama, tokenizer):
    done = _compressed(llama, tokenizer, "snapkv:0.75")
    full = cl.prefill(llama, tokenizer, TEXT).cache
    layers = llama.config.num_hidden_layers
    per_layer_full = full.kv_bytes() // layers
    assert done.cache.kv_bytes() < full.kv_bytes()
    per_layer_kept = done.cache.kv_bytes() // layers
    store = done.cache.layers[0].store
    positions_bytes = store.groups[0].positions.nbytes  # int16 per kept slot and head
    # Layers evict one after another; at the peak the last layer holds its whole prompt while its kept slots
    # are copied into a right-sized buffer (its kept positions are written after the prompt is freed).
    assert done.cache.peak_bytes == (layers - 1) * per_layer_kept + per_layer_full + per_layer_kept - positions_bytes
    assert done.cache.tracker.current == done.cache.kv_bytes()


def test_gemma_sliding_layers_are_plain_transformers_layers(tokenizer):
    model = tiny_model("gemma3")
    done = cl.prefill(model, tokenizer, "Sliding windows keep the last tokens. " * 4, method="snapkv:0.5")
    kinds = [type(layer).__name__ for layer in done.cache.layers]
    assert kinds == ["ContextlabLayer", "DynamicSlidingWindowLayer", "ContextlabLayer"]
    assert [layer.layer_idx for layer in done.cache.compressible] == [0, 1]  # ranks among full-attention layers


def test_adakv_scorer_takes_the_budget():
    method = AdaKV(budget=Budget(ratio=0.5), scorer="knorm")
    assert method.scoring.budget == method.budget and method.describe() == "adakv:ratio=0.5,scorer=knorm"


def test_lost_layer_reference_raises_instead_of_attending_to_nothing(llama):
    query = torch.randn(1, 4, 3, 16)
    empty = torch.empty(1, 2, 0, 16)  # what a contextlab layer hands out, without its reference
    with pytest.raises(RuntimeError, match="without its cache layer"):
        contextlab_attention(llama.model.layers[0].self_attn, query, empty, empty, None)


def test_a_cache_used_without_contextlab_attention_is_refused(llama, tokenizer):
    cache = ContextlabCache(llama.config)
    ids = torch.tensor([tokenizer("plain sdpa would attend to empty placeholders")["input_ids"]])
    llama.set_attn_implementation("sdpa")
    with torch.no_grad(), pytest.raises(RuntimeError, match="attention_enabled"):
        llama(ids, **{cache_kwarg(llama): cache})
        llama(ids[:, :1], **{cache_kwarg(llama): cache})


def test_layers_are_contextlab_layers(llama):
    assert all(isinstance(layer, ContextlabLayer) for layer in ContextlabCache(llama.config).layers)
