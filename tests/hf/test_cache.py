"""The compressible cache layer: logical vs physical lengths, ragged heads, cache operations."""

from __future__ import annotations

import pytest
import torch

import contextlab as cl
from contextlab.hf.cache import CompressibleLayer, CompressionRequest, ContextlabCache
from contextlab.methods.base import Budget
from contextlab.methods.eviction import AdaKV, SnapKV
from tests.conftest import tiny_model


def _compressed(model, tokenizer, spec: str, text: str = "A quick brown fox jumps. " * 8):
    return cl.prefill(model, tokenizer, text, method=spec)


def test_logical_length_and_mask_sizes_after_compression(llama, tokenizer):
    done = _compressed(llama, tokenizer, "snapkv:0.5")
    n = done.input_ids.shape[1]
    layer = done.cache.layers[0]
    assert done.cache.get_seq_length() == n  # logical: positions continue after the prompt
    assert layer.groups[0].keys.shape[2] == n - n // 2  # physical: half the tokens
    assert layer.get_mask_sizes(1) == (1, n)  # the mask covers only what comes after compression
    with torch.no_grad(), cl.attention_enabled(llama):
        llama(
            torch.tensor([[65, 66, 67]]),
            past_key_values=done.cache,
            attention_mask=torch.ones(1, n + 3, dtype=torch.long),
        )
    assert done.cache.get_seq_length() == n + 3 and layer.get_mask_sizes(1) == (4, n)


def test_per_head_budgets_store_each_head_at_its_own_size(llama, tokenizer):
    done = _compressed(llama, tokenizer, "adakv:ratio=0.5,alpha=0.0")
    for layer in done.cache.compressible:
        counts = (layer.kept_positions >= 0).sum(-1)[0]  # [H]
        sizes = {
            int(i): g.keys.shape[2]
            for g in layer.groups
            for i in (g.heads if g.heads is not None else range(layer.kv_heads))
        }
        assert [sizes[h] for h in range(layer.kv_heads)] == counts.tolist()
        stored = sum(g.keys.numel() for g in layer.groups)
        assert stored == int(counts.sum()) * layer.groups[0].keys.shape[-1]  # no padding to the largest head


def test_reorder_and_batch_select_follow_the_batch(llama, tokenizer):
    done = cl.prefill(llama, tokenizer, ["first context " * 6, "second one, a bit longer " * 5], method="snapkv:0.5")
    layer = done.cache.layers[0]
    before = layer.groups[0].keys.clone()
    done.cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.groups[0].keys, before.flip(0))
    done.cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.groups[0].keys, before[:1]) and layer.kept_positions.shape[0] == 1


def test_crop_removes_only_tokens_appended_after_compression(llama, tokenizer):
    done = _compressed(llama, tokenizer, "snapkv:0.5")
    layer = done.cache.layers[0]
    with pytest.raises(ValueError, match="only the 0 tokens appended"):
        layer.crop(-1)
    with torch.no_grad(), cl.attention_enabled(llama):
        llama(torch.tensor([[70, 71]]), past_key_values=done.cache)
    size = layer.groups[0].keys.shape[2]
    done.cache.crop(-2)
    assert layer.groups[0].keys.shape[2] == size - 2 and layer.get_seq_length() == done.input_ids.shape[1]


def test_compression_needs_the_armed_length(llama, tokenizer):
    cache = ContextlabCache(llama.config)
    ids = torch.tensor([tokenizer("some prompt text here, long enough")["input_ids"]])
    n = ids.shape[1]
    method = SnapKV(budget=Budget(tokens=8), window=4)
    cache.arm(
        CompressionRequest(method, n + 5, torch.ones(1, n, dtype=torch.bool), torch.arange(n)[None], torch.tensor([8]))
    )
    with torch.no_grad(), cl.attention_enabled(llama):
        llama(ids, past_key_values=cache)
    assert cache.layers[0].kept_positions is None  # not at the armed length yet: nothing evicted


def test_memory_tracker_sees_the_transient_full_layer(llama, tokenizer):
    done = _compressed(llama, tokenizer, "snapkv:0.75")
    full = cl.prefill(llama, tokenizer, "A quick brown fox jumps. " * 8).cache.kv_bytes()
    per_layer_full = full // llama.config.num_hidden_layers
    assert done.cache.kv_bytes() < full
    per_layer_kept = done.cache.kv_bytes() // llama.config.num_hidden_layers
    # Layers compress one after another: the peak is the last layer uncompressed beside the others compressed.
    assert done.cache.peak_bytes == done.cache.kv_bytes() - per_layer_kept + per_layer_full


def test_gemma_sliding_layers_are_plain_transformers_layers(tokenizer):
    model = tiny_model("gemma3")
    done = cl.prefill(model, tokenizer, "Sliding windows keep the last tokens. " * 4, method="snapkv:0.5")
    kinds = [type(layer).__name__ for layer in done.cache.layers]
    assert kinds == ["CompressibleLayer", "DynamicSlidingWindowLayer", "CompressibleLayer"]
    assert isinstance(done.cache.layers[0], CompressibleLayer)


def test_adakv_scorer_and_budget_share():
    method = AdaKV(budget=Budget(ratio=0.5), scorer="knorm")
    assert method.scorer.budget == method.budget and method.describe() == "adakv:ratio=0.5"
