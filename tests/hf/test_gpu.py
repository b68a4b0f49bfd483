"""CUDA checks in bf16 (skipped where CUDA is absent): contract, real memory savings, batch equality."""

from __future__ import annotations

import pytest
import torch

import contextlab as cl
from contextlab.hf import compat
from tests.conftest import ARCHS, tiny_model
from tests.methods.test_contract import CASES, _lossless

pytestmark = pytest.mark.gpu
CONTEXT = "The archive holds many ledgers; the seventh ledger is bound in green leather. " * 12


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CASES)
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
    spec = _lossless(name)
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


def test_prefill_attention_runs_on_flash_or_efficient_kernels(tokenizer):
    """No math-kernel fallback (all Tq x S scores in fp32) for the prefill shapes: unmasked GQA, a padded
    batch (mask), and decode's folded query heads, with only the flash / memory-efficient backends allowed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, g, t, d = 2, 2, 4, 512, 64
    q = torch.randn(b, h * g, t, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    causal = torch.ones(t, t, dtype=torch.bool, device="cuda").tril()
    mask = causal.expand(b, 1, t, t).clone()
    mask[1, :, :, :100] = False  # row 1 is left-padded
    mask[1, :, :100, :100] = causal[:100, :100]  # padding queries still see something
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1), attn_mask=mask, scale=d**-0.5
    )
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        masked = compat.attention(q, k, v, mask, d**-0.5)
        plain = compat.attention(q, k, v, None, d**-0.5, is_causal=True)
        decode = compat.attention(q[:, :, -1:], k, v, mask[:, :, -1:], d**-0.5)
        model = tiny_model("llama", dtype=torch.bfloat16, device="cuda")
        cl.generate(model, tokenizer, [CONTEXT, CONTEXT[:400]], "Which?", method="snapkv:0.5", max_new_tokens=3)
    torch.testing.assert_close(masked.float(), reference, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(plain.float()[0], reference[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(decode.float(), reference[:, :, -1:], atol=2e-2, rtol=2e-2)


def test_chunked_prefill_lowers_cuda_peak(tokenizer):
    model = tiny_model("llama", dtype=torch.bfloat16, device="cuda")
    long_context = CONTEXT * 4
    whole = cl.generate(model, tokenizer, long_context, "Which?", method="snapkv:0.75", max_new_tokens=2)
    chunked = cl.generate(
        model, tokenizer, long_context, "Which?", method="snapkv:0.75,prefill_chunk=256", max_new_tokens=2
    )
    assert chunked.kv_bytes == whole.kv_bytes
    assert chunked.peak_memory_bytes <= whole.peak_memory_bytes
