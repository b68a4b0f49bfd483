"""KV quantization end to end: batches, decoding under decode eviction, and cache bytes over a long answer."""

from __future__ import annotations

import pytest
import torch

import contextlab as cl
from tests.engine.test_generate import CONTEXTS, QUESTIONS

SAME_LENGTH = ["Alpha beta gamma delta. " * 6, "Numbers: 1 2 3 4 5 6 7 8 9. " * 5 + "End."]  # 144 bytes each


@pytest.mark.parametrize(
    "spec",
    [
        "kivi:bits=2,group=16,residual=16",
        "snapkv:0.5+kivi:bits=4,group=16,residual=8",
        "adakv:0.5+kivi:bits=4,group=16,residual=16",
    ],
)
def test_a_batch_of_equal_lengths_equals_rows_one_by_one(llama, tokenizer, spec):
    lengths = {len(tokenizer(c + "?")["input_ids"]) for c in SAME_LENGTH}
    assert len(lengths) == 1, "the rows must need no padding"
    batch = cl.generate(llama, tokenizer, SAME_LENGTH, ["?", "?"], method=spec, max_new_tokens=6)
    for i, ctx in enumerate(SAME_LENGTH):
        single = cl.generate(llama, tokenizer, ctx, "?", method=spec, max_new_tokens=6)
        assert batch.token_ids[i] == single.tokens
        for in_batch, alone in zip(batch.kept_positions, single.kept_positions, strict=True):
            for h in range(in_batch.shape[1]):
                mine, own = in_batch[i, h], alone[0, h]
                assert torch.equal(mine[mine >= 0], own[own >= 0])


def test_a_padded_batch_differs_from_rows_alone_only_by_quantization_error(llama, tokenizer):
    # Rows of a padded batch are grouped by column, so a padded row's key groups differ from the row alone
    # (padding never widens a group's range); at 8 bits the greedy answers agree.
    spec = "kivi:bits=8,group=16,residual=16"
    batch = cl.generate(llama, tokenizer, CONTEXTS, QUESTIONS, method=spec, max_new_tokens=6)
    for i, (ctx, q) in enumerate(zip(CONTEXTS, QUESTIONS, strict=True)):
        assert batch.token_ids[i] == cl.generate(llama, tokenizer, ctx, q, method=spec, max_new_tokens=6).tokens


def test_decode_eviction_over_quantized_slots_keeps_memory_bounded(llama, tokenizer):
    quantized = "decode(h2o,budget=64,every=16)+kivi:bits=4,group=16,residual=16"
    dense = "decode(h2o,budget=64,every=16)"
    out = cl.generate(llama, tokenizer, CONTEXTS[0], QUESTIONS[0], method=quantized, max_new_tokens=60)
    plain = cl.generate(llama, tokenizer, CONTEXTS[0], QUESTIONS[0], method=dense, max_new_tokens=60)
    assert len(out.tokens) == len(plain.tokens) == 60
    # Both hold at most budget + every slots at the end; quantized slots take a fraction of the bytes.
    assert out.kv_bytes_end < 0.6 * plain.kv_bytes_end
    assert out.kv_bytes < 0.4 * out.kv_bytes_full


def test_full_precision_window_longer_than_the_sequence_is_full_attention(llama, tokenizer):
    out = cl.generate(llama, tokenizer, CONTEXTS, QUESTIONS, method="kivi:group=16,residual=1024", max_new_tokens=6)
    full = cl.generate(llama, tokenizer, CONTEXTS, QUESTIONS, method="full", max_new_tokens=6)
    assert out.token_ids == full.token_ids and out.kv_bytes == full.kv_bytes


EVICTION = ["streaming", "snapkv", "pyramidkv", "tova", "h2o", "knorm", "random", "adakv"]


@pytest.mark.parametrize("name", EVICTION)
@pytest.mark.parametrize("store", ["kivi:bits=2,group=16,residual=16", "zipcache:group=16,residual=16"])
def test_every_eviction_method_keeps_the_same_tokens_under_quantization(llama, tokenizer, name, store):
    # Prompt eviction runs on full-precision keys before anything is quantized: same kept tokens, fewer bytes.
    alone = cl.generate(llama, tokenizer, CONTEXTS[0], QUESTIONS[0], method=f"{name}:0.5", max_new_tokens=4)
    both = cl.generate(llama, tokenizer, CONTEXTS[0], QUESTIONS[0], method=f"{name}:0.5+{store}", max_new_tokens=4)
    for a, b in zip(alone.kept_positions, both.kept_positions, strict=True):
        assert torch.equal(a, b)
    assert both.kv_bytes < 0.6 * alone.kv_bytes


@pytest.mark.parametrize(
    "spec", ["selfextend:group=2,window=32", "lminfinite:sink=4,window=64", "string:offset=64,local=8"]
)
def test_position_remaps_compose_with_quantization(llama, tokenizer, spec):
    out = cl.generate(
        llama, tokenizer, CONTEXTS[0], QUESTIONS[0], method=f"{spec}+kivi:bits=4,group=16,residual=16", max_new_tokens=4
    )
    alone = cl.generate(llama, tokenizer, CONTEXTS[0], QUESTIONS[0], method=spec, max_new_tokens=4)
    assert len(out.tokens) == len(alone.tokens) and out.kv_bytes < alone.kv_bytes
