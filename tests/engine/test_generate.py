"""generate() and prefill(): batches, chunked questions, stock model.generate, bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2Config, GPT2Config

import contextlab as cl
from contextlab.engine.inputs import positions_from_mask
from contextlab.hf.compat import cache_kwarg
from tests.conftest import tiny_model

CONTEXTS = [
    "Alpha beta gamma delta. " * 9,
    "The cat sat on the mat while the dog slept. " * 3,
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12. " * 5,
]
QUESTIONS = ["Which letter?", "Who slept?", "Count?"]


@pytest.mark.parametrize(
    "spec",
    [
        "full",
        "snapkv:0.5",
        "pyramidkv:0.5",
        "adakv:0.6",
        "h2o:0.5",
        "tova:0.5",
        "knorm:0.5",
        "random:0.5",
        "streaming:0.5",
        "snapkv:budget=40",
    ],
)
@pytest.mark.parametrize("aware", [True, False])
def test_batch_equals_rows_one_by_one(llama, tokenizer, spec, aware):
    batch = cl.generate(llama, tokenizer, CONTEXTS, QUESTIONS, method=spec, max_new_tokens=5, question_aware=aware)
    assert batch.batched and len(batch.texts) == 3
    for i, (ctx, q) in enumerate(zip(CONTEXTS, QUESTIONS, strict=True)):
        single = cl.generate(llama, tokenizer, ctx, q, method=spec, max_new_tokens=5, question_aware=aware)
        assert batch.token_ids[i] == single.tokens
        for layer_batch, layer_single in zip(batch.kept_positions, single.kept_positions, strict=True):
            for h in range(layer_batch.shape[1]):
                mine = layer_batch[i, h][layer_batch[i, h] >= 0]
                alone = layer_single[0, h][layer_single[0, h] >= 0]
                assert torch.equal(mine, alone), f"row {i} head {h}"


@pytest.mark.parametrize("spec", ["snapkv:0.5", "adakv:0.5", "streaming:budget=30"])
def test_chunked_question_equals_token_by_token(llama, tokenizer, spec):
    question = torch.tensor([tokenizer(" and what came after the fourth word?", add_special_tokens=False)["input_ids"]])
    logits = []
    for chunks in (question.split(question.shape[1], dim=1), question.split(1, dim=1)):
        done = cl.prefill(llama, tokenizer, CONTEXTS[0], method=spec)
        mask = done.attention_mask
        outs = []
        with torch.no_grad(), cl.attention_enabled(llama):
            for chunk in chunks:
                mask = torch.cat([mask, torch.ones_like(chunk)], dim=1)
                positions = positions_from_mask(mask)[:, -chunk.shape[1] :]
                outs.append(
                    llama(chunk, attention_mask=mask, position_ids=positions, **{cache_kwarg(llama): done.cache}).logits
                )
        logits.append(torch.cat(outs, dim=1))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["snapkv:0.5", "adakv:0.5", "pyramidkv:0.5"])
def test_stock_model_generate_continues_a_compressed_cache(llama, tokenizer, spec):
    q_ids = torch.tensor([tokenizer(QUESTIONS[1], add_special_tokens=False)["input_ids"]])
    ours = cl.generate(llama, tokenizer, CONTEXTS[1], QUESTIONS[1], method=spec, max_new_tokens=6, question_aware=False)
    done = cl.prefill(llama, tokenizer, CONTEXTS[1], method=spec)
    compressed_bytes = done.cache.kv_bytes()
    with cl.attention_enabled(llama):
        ids = torch.cat([done.input_ids, q_ids], dim=1)
        out = llama.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **{cache_kwarg(llama): done.cache},
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    generated = out[0, ids.shape[1] :].tolist()
    eos = generated.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in generated else len(generated)
    assert generated[:eos] == ours.tokens
    assert compressed_bytes < cl.prefill(llama, tokenizer, CONTEXTS[1]).cache.kv_bytes()


def test_attention_implementation_is_restored(llama, tokenizer):
    before = llama.config._attn_implementation
    cl.generate(llama, tokenizer, CONTEXTS[0], method="snapkv:0.5", max_new_tokens=2)
    assert llama.config._attn_implementation == before


def test_result_reports_costs(llama, tokenizer):
    out = cl.generate(llama, tokenizer, CONTEXTS[0], QUESTIONS[0], method="snapkv:0.5", max_new_tokens=4)
    full = cl.generate(llama, tokenizer, CONTEXTS[0], QUESTIONS[0], method="full", max_new_tokens=4)
    assert out.kv_bytes_full == full.kv_bytes_full == full.kv_bytes
    assert out.kv_bytes * 2 <= out.kv_bytes_full * 1.05  # half the slots, plus each kept slot's int16 position
    assert out.prefill_seconds > 0 and out.decode_seconds > 0
    assert out.peak_memory_bytes >= out.kv_bytes and full.peak_memory_bytes >= full.kv_bytes
    assert isinstance(out.text, str) and out.tokens == out.token_ids[0]
    assert len(out.kept_positions) == llama.config.num_hidden_layers


def test_token_id_inputs_equal_text_inputs(llama, tokenizer):
    ctx_ids = tokenizer(CONTEXTS[2])["input_ids"]
    q_ids = tokenizer(QUESTIONS[2], add_special_tokens=False)["input_ids"]
    a = cl.generate(llama, tokenizer, ctx_ids, q_ids, method="snapkv:0.5", max_new_tokens=4)
    b = cl.generate(llama, tokenizer, CONTEXTS[2], QUESTIONS[2], method="snapkv:0.5", max_new_tokens=4)
    assert a.tokens == b.tokens


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(context=""), "context is empty"),
        (dict(context="   "), "context is empty"),
        (dict(context=[]), "context is empty"),
        (dict(method="snapkv:budget=100000"), "larger than the context"),
        (dict(method="snapkv:1.5"), r"must be in \[0, 1\)"),
        (dict(method="snapkv:ratio=-0.5"), r"must be in \[0, 1\)"),
        (dict(method="snapkvv:0.5"), "did you mean 'snapkv'"),
        (dict(question="x" * 120, method="snapkv:budget=100"), "question .* longer than the 100 tokens"),
        (dict(context="y" * 3000), "exceed the model's window of 2048 positions"),
        (dict(context="y" * 3000, method="selfextend:group=1,window=1024"), "serves on this model"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(context=["abc", "def"], question=["a", "b", "c"]), "3 questions"),
        (dict(question=""), "question is empty"),
        (dict(context=3.5), "text or a list of token ids"),
    ],
)
def test_bad_input_is_named(llama, tokenizer, kwargs, message):
    args = dict(context=CONTEXTS[0], question="Q?", method="snapkv:0.5") | kwargs
    with pytest.raises(ValueError, match=message):
        cl.generate(llama, tokenizer, args.pop("context"), args.pop("question"), **args)


def test_beyond_window_runs_when_asked(llama, tokenizer):
    out = cl.generate(
        llama,
        tokenizer,
        "y" * 2100,
        "Q?",
        method="streaming:budget=256",
        max_new_tokens=2,
        allow_beyond_window=True,
    )
    assert out.prompt_tokens[0] > llama.config.max_position_embeddings


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (
            DeepseekV2Config(
                vocab_size=300,
                hidden_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                kv_lora_rank=16,
                q_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
            ),
            "multi-head latent attention",
        ),
        (GPT2Config(n_layer=1, n_embd=32, n_head=2), "no rotary position embedding"),
    ],
)
def test_unsupported_architectures_are_refused(config, reason, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(cl.UnsupportedModelError, match=reason):
        cl.generate(model, tokenizer, "hello there", method="full")
    model.save_pretrained(tmp_path)
    with pytest.raises(cl.UnsupportedModelError, match=reason):
        cl.load(str(tmp_path))


def test_load_from_a_local_folder(tmp_path, tokenizer):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = cl.load(str(tmp_path))
    a = cl.generate(loaded, tok, CONTEXTS[0], method="snapkv:0.5", max_new_tokens=3)
    b = cl.generate(model, tokenizer, CONTEXTS[0], method="snapkv:0.5", max_new_tokens=3)
    assert a.tokens == b.tokens


def test_sliding_only_models_have_nothing_to_compress(tokenizer):
    from transformers import AutoModelForCausalLM, MistralConfig

    from tests.conftest import COMMON

    model = AutoModelForCausalLM.from_config(MistralConfig(**COMMON, sliding_window=64)).eval()
    with pytest.raises(ValueError, match="nothing to compress"):
        cl.generate(model, tokenizer, CONTEXTS[0], method="snapkv:0.5")
    assert cl.generate(model, tokenizer, CONTEXTS[0], method="full", max_new_tokens=2).texts
