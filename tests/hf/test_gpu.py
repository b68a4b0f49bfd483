"""CUDA checks in bf16 (skipped where CUDA is absent): contract, real memory savings, batch equality."""

from __future__ import annotations

import pytest
import torch

import contextlab as cl
from tests.conftest import ARCHS, tiny_model

pytestmark = pytest.mark.gpu
CONTEXT = "The archive holds many ledgers; the seventh ledger is bound in green leather. " * 12


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", cl.METHODS.names())
def test_bf16_no_compression_matches_vanilla(arch, name, tokenizer):
    model = tiny_model(arch, dtype=torch.bfloat16, device="cuda")
    ids = tokenizer(CONTEXT + "Which ledger?")["input_ids"]
    vanilla = model.generate(
        torch.tensor([ids], device="cuda"),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()
    spec = name if name == "full" else f"{name}:0.0"
    out = cl.generate(model, tokenizer, CONTEXT, "Which ledger?", method=spec, max_new_tokens=6)
    eos = vanilla.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in vanilla else len(vanilla)
    assert out.tokens == vanilla[:eos]


def test_compression_lowers_cuda_memory(tokenizer):
    model = tiny_model("llama", dtype=torch.bfloat16, device="cuda")
    long_context = CONTEXT * 2
    full = cl.generate(model, tokenizer, long_context, "Which?", method="full", max_new_tokens=4)
    snap = cl.generate(model, tokenizer, long_context, "Which?", method="snapkv:0.75", max_new_tokens=4)
    assert snap.kv_bytes < 0.3 * full.kv_bytes
    assert snap.peak_memory_bytes < full.peak_memory_bytes


def test_cuda_batch_equals_rows(tokenizer):
    model = tiny_model("qwen2", dtype=torch.bfloat16, device="cuda")
    contexts = [CONTEXT[: 300 + 200 * i] for i in range(3)]
    batch = cl.generate(model, tokenizer, contexts, "Which?", method="snapkv:0.5", max_new_tokens=5)
    for i, ctx in enumerate(contexts):
        assert (
            batch.token_ids[i]
            == cl.generate(model, tokenizer, ctx, "Which?", method="snapkv:0.5", max_new_tokens=5).tokens
        )
