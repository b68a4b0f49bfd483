"""Window extension through the engine: identity inside the window, runs past it, batches, memory, RoPE
restored, bad input."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

import contextlab as cl
from contextlab.engine.session import Session
from contextlab.engine.steps import forward
from contextlab.hf.cache import ContextlabCache
from contextlab.hf.rope import rope_of, scaled_rope
from contextlab.methods.extension import RemapPolicy
from tests.conftest import COMMON

NATIVE = 64
REMAPS = ["selfextend", "string", "lminfinite"]
SCALINGS = ["ntk", "yarn", "linear"]
RETRIEVAL = "infiniretri:budget=16,chunk=24"  # its defaults: token ids kept and re-encoded (share=all, sink=4)
KV_REUSE = "infiniretri:budget=16,chunk=24,share=none,sink=0,reencode=false"  # each layer keeps KV entries
EXTENDERS = [*REMAPS, *SCALINGS, RETRIEVAL]


def short_model(rope_parameters: dict | None = None, seed: int = 0):
    """A tiny Llama trained (randomly) on 64 positions, so going past its window is cheap."""
    torch.manual_seed(seed)
    config = LlamaConfig(**(COMMON | {"max_position_embeddings": NATIVE}))
    if rope_parameters is not None:
        config.rope_parameters = rope_parameters
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def model():
    return short_model()


def ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (n,), generator=g).tolist()


@pytest.mark.parametrize("spec", ["selfextend", "lminfinite", *SCALINGS])
def test_inside_the_window_defaults_are_full_attention(model, tokenizer, spec):
    context = ids(40, 0)
    full = cl.generate(model, tokenizer, context, method="full", max_new_tokens=6)
    out = cl.generate(model, tokenizer, context, method=spec, max_new_tokens=6)
    assert out.token_ids == full.token_ids
    if spec in REMAPS:
        a = cl.prefill(model, tokenizer, context, method="full").last_logits
        b = cl.prefill(model, tokenizer, context, method=spec).last_logits
        torch.testing.assert_close(a, b)


def test_string_changes_attention_inside_the_window_by_design(model, tokenizer):
    context = ids(60, 0)
    a = cl.prefill(model, tokenizer, context, method="full").last_logits
    b = cl.prefill(model, tokenizer, context, method="string:offset=20,local=4").last_logits
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("spec", EXTENDERS)
def test_generation_runs_past_the_native_window(model, tokenizer, spec):
    n = 110 if spec == "string" else 200  # one STRING shift serves 2 * 64 - 4 positions
    out = cl.generate(model, tokenizer, ids(n, 1), method=spec, max_new_tokens=8)
    assert out.prompt_tokens[0] == n and len(out.token_ids[0]) >= 1
    assert torch.isfinite(torch.tensor(out.kv_bytes, dtype=torch.float))


@pytest.mark.parametrize("spec", ["selfextend", "string", "lminfinite", "selfextend:group=4,window=16"])
def test_remaps_never_attend_beyond_the_trained_distances(model, tokenizer, spec):
    method = cl.method(spec)
    cache = ContextlabCache(model.config, method)
    for layer in cache.compressible:
        layer.policy.track = True
    prompt = torch.tensor([ids(120, 2)])  # within string's 2 * 64 - 4 and selfextend:group=4,window=16's 208
    cache.begin_prompt(120, [120], 0)
    with torch.inference_mode(), cl.attention_enabled(model):
        logits = forward(model, cache, prompt, torch.ones_like(prompt))
    assert torch.isfinite(logits).all()
    for layer in cache.compressible:
        assert isinstance(layer.policy, RemapPolicy)
        assert 0 < layer.policy.max_distance <= NATIVE - 1


@pytest.mark.parametrize(
    "spec",
    [
        "selfextend",
        "string",
        "lminfinite",
        "selfextend+snapkv:0.5",
        "yarn:factor=2",
        "ntk:factor=2",
        RETRIEVAL,
        KV_REUSE,
        "infiniretri:budget=16,chunk=24,share=all,reencode=false",
        RETRIEVAL + ",window=4",
    ],
)
def test_a_batch_of_different_lengths_equals_one_by_one(model, tokenizer, spec):
    # remaps derive their parameters per row (Self-Extend's group: 2 for 110 tokens, 4 for 118 + 5)
    contexts = [ids(n, 10 + n) for n in (110, 70, 118)]
    batch = cl.generate(model, tokenizer, contexts, method=spec, max_new_tokens=5)
    for i, c in enumerate(contexts):
        alone = cl.generate(model, tokenizer, c, method=spec, max_new_tokens=5)
        assert batch.token_ids[i] == alone.token_ids[0], (spec, i)


def test_lminfinite_keeps_only_the_lambda_after_the_prompt(model, tokenizer):
    out = cl.generate(model, tokenizer, ids(300, 3), method="lminfinite:sink=4,window=32,slack=8", max_new_tokens=20)
    full = cl.generate(model, tokenizer, ids(300, 3), method="selfextend", max_new_tokens=1)
    layers = model.config.num_hidden_layers
    per_slot = full.kv_bytes // (300 * layers)  # keys + values of one token in one layer
    meta = 2 * model.config.num_key_value_heads  # each slot's int16 position, per KV head
    assert out.kv_bytes == layers * (4 + 32 - 1) * (per_slot + meta)
    assert out.kv_bytes_end <= layers * (4 + 32 - 1 + 8) * (per_slot + meta)


def test_rope_scaling_is_restored_after_the_call_even_on_error(model, tokenizer):
    rotary = model.model.rotary_emb
    before = rotary.inv_freq.clone()
    method = cl.method("linear")
    with scaled_rope(model, method, 4 * NATIVE):
        torch.testing.assert_close(rotary.inv_freq, before / 4)
    assert torch.equal(rotary.inv_freq, before)
    with pytest.raises(RuntimeError), scaled_rope(model, method, 4 * NATIVE):
        raise RuntimeError("boom")
    assert torch.equal(rotary.inv_freq, before)
    cl.generate(model, tokenizer, ids(200, 4), method="yarn", max_new_tokens=2)
    assert torch.equal(rotary.inv_freq, before) and rotary.attention_scaling == 1.0


def test_ntk_grows_the_base_as_the_papers_formula_says(model):
    rotary = model.model.rotary_emb
    d = model.config.head_dim
    with scaled_rope(model, cl.method("ntk:factor=4"), 4 * NATIVE):
        base = 10000.0 * 4 ** (d / (d - 2))
        expected = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        torch.testing.assert_close(rotary.inv_freq, expected)


@pytest.mark.parametrize(
    "spec,kwargs,error",
    [
        ("full", {}, "Add a position-extending method"),
        ("snapkv:0.5", {}, "snapkv:ratio=0.5 does not change positions"),
        ("selfextend:group=2,window=16", {}, "serves on this model"),
        ("selfextend:window=64", {}, "must be smaller than the model's native window of 64"),
        ("yarn:factor=2", {}, "serves on this model"),
        ("string", {}, "124 positions string serves"),
        ("infiniretri:budget=32,chunk=32", {}, "budget \\+ chunk = 64 tokens at once, which must stay below"),
        ("infiniretri:0.5", {}, "infiniretri needs a token budget"),
        ("infiniretri:share=some", {}, "share must be one of none, all, got 'some'"),
        ("infiniretri:budget=8,sink=8,chunk=16", {}, "sink \\(8\\) must be smaller than its budget \\(8 tokens\\)"),
        ("infiniretri:share=none", {}, "reencode=true keeps one set of token ids .* it needs share=all"),
        ("infiniretri:budget=4", {}, "sink \\(4\\) must be smaller than its budget \\(4 tokens\\)"),
    ],
)
def test_bad_input_is_named(model, tokenizer, spec, kwargs, error):
    with pytest.raises(ValueError, match=error):
        cl.generate(model, tokenizer, ids(200, 5), method=spec, max_new_tokens=2, **kwargs)


def test_rope_types_a_remap_cannot_handle_are_named(tokenizer):
    dynamic = short_model({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope type is 'dynamic'"):
        cl.generate(dynamic, tokenizer, ids(100, 6), method="selfextend", max_new_tokens=2)
    scaled = short_model({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="already use rope type 'linear'"):
        cl.generate(scaled, tokenizer, ids(100, 6), method="ntk", max_new_tokens=2)


def test_prefill_refuses_rope_scaling_it_cannot_hand_over(model, tokenizer):
    with pytest.raises(ValueError, match="cannot be continued"):
        cl.prefill(model, tokenizer, ids(100, 7), method="yarn")


@pytest.mark.parametrize("spec", ["yarn", "selfextend"])
def test_a_session_keeps_one_extension_across_turns(model, tokenizer, spec):
    rotary = model.model.rotary_emb
    before = rotary.inv_freq.clone()
    session = Session(model, tokenizer, ids(150, 8), ids(5, 9), method=spec, max_total_tokens=40)
    first = session.ask(None, max_new_tokens=4)
    second = session.ask(ids(5, 10), max_new_tokens=4)
    assert first.token_ids[0] and second.token_ids[0]
    assert torch.equal(rotary.inv_freq, before)


def test_infiniretri_reads_segments_keeps_its_budget_and_drops_the_question_copies(model, tokenizer):
    context, question = ids(200, 11), ids(6, 12)
    out = cl.generate(model, tokenizer, context, question, method=KV_REUSE, max_new_tokens=3)
    layers = model.config.num_hidden_layers
    meta = 2 * model.config.num_key_value_heads  # int16 positions
    per_slot = 2 * model.config.head_dim * 4 * model.config.num_key_value_heads
    assert out.kv_bytes == layers * 16 * (per_slot + meta)  # budget per layer, no question copy left
    for kept in out.kept_positions:  # positions are the prompt's own: copies took none
        assert int(kept.max()) == 205 and int(kept.min()) >= 0
        assert bool((kept[..., -6:] == torch.arange(200, 206)).all())  # the real question, kept at the end


def test_a_model_with_sliding_window_layers_extends_its_full_layers_only(tokenizer):
    """Gemma 3 style: sliding-window layers stay on transformers' attention (they never see a distance past
    their window), the full-attention layers are remapped with their own RoPE (base 1e6, not the sliding
    layers' 1e4), and past the window no full layer reads a distance it was not trained on."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        **(COMMON | {"max_position_embeddings": NATIVE}),
        head_dim=16,
        sliding_window=24,
        query_pre_attn_scalar=16,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
    )
    gemma = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gemma.set_attn_implementation("sdpa")
    method = cl.method("selfextend")
    torch.testing.assert_close(rope_of(gemma.config, method).inv_freq, gemma.model.rotary_emb.full_attention_inv_freq)
    assert not torch.allclose(
        gemma.model.rotary_emb.full_attention_inv_freq, gemma.model.rotary_emb.sliding_attention_inv_freq
    )
    cache = ContextlabCache(gemma.config, method)
    assert [i for i, layer in enumerate(cache.layers) if layer in cache.compressible] == [0, 2]
    for layer in cache.compressible:
        layer.policy.track = True
    prompt = torch.tensor([ids(150, 3)])
    cache.begin_prompt(150, [150], 0)
    with torch.inference_mode(), cl.attention_enabled(gemma):
        logits = forward(gemma, cache, prompt, torch.ones_like(prompt))
    assert torch.isfinite(logits).all()
    for layer in cache.compressible:
        assert 0 < layer.policy.max_distance <= NATIVE - 1
    inside = ids(50, 4)  # inside the window Self-Extend is full attention, sliding layers included
    full = cl.prefill(gemma, tokenizer, inside, method="full").last_logits
    torch.testing.assert_close(cl.prefill(gemma, tokenizer, inside, method="selfextend").last_logits, full)
    whole = cl.prefill(gemma, tokenizer, ids(150, 3), method="selfextend").last_logits
    chunked = cl.prefill(gemma, tokenizer, ids(150, 3), method="selfextend:prefill_chunk=40").last_logits
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)  # sliding layers read window + chunk
    out = cl.generate(gemma, tokenizer, ids(150, 3), method="selfextend", max_new_tokens=4)
    assert out.prompt_tokens[0] == 150 and len(out.token_ids[0]) >= 1


@contextmanager
def counted_forwards(model):
    """The widths of the forwards ``model`` runs inside the block."""
    widths: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        yield widths
    finally:
        handle.remove()


@pytest.mark.parametrize("spec", ["selfextend", "string", "lminfinite", "selfextend:group=4,window=16"])
def test_a_remap_fed_in_chunks_equals_one_forward(model, tokenizer, spec):
    context = ids(110 if spec == "string" else 200, 8)
    in_chunks = f"{spec}{',' if ':' in spec else ':'}prefill_chunk=48"
    whole = cl.generate(model, tokenizer, context, method=spec, max_new_tokens=6)
    chunked = cl.generate(model, tokenizer, context, method=in_chunks, max_new_tokens=6)
    assert chunked.token_ids == whole.token_ids
    a = cl.prefill(model, tokenizer, context, method=spec)
    with counted_forwards(model) as forwards:
        b = cl.prefill(model, tokenizer, context, method=in_chunks)
    assert forwards == [len(context) % 48] + [48] * (len(context) // 48)  # the remainder first
    torch.testing.assert_close(b.last_logits, a.last_logits, rtol=1e-4, atol=1e-4)
    assert b.cache.kv_bytes() == a.cache.kv_bytes()


def test_two_chunk_sizes_in_one_spec_are_refused():
    with pytest.raises(ValueError, match="chunks of different sizes"):
        cl.method("selfextend:prefill_chunk=32+snapkv:0.5,prefill_chunk=64")
    assert cl.method("selfextend:prefill_chunk=32+snapkv:0.5").prefill_chunk_size() == 32


def test_infiniretri_share_all_keeps_one_set_for_every_layer_and_head(model, tokenizer):
    context, question = ids(200, 11), ids(6, 12)
    # a window below the budget and no pooling: token votes, not protected or pooled neighbours, decide
    spec = "infiniretri:budget=16,chunk=24,window=4,kernel=1,sink=4,reencode=false"
    own = cl.generate(model, tokenizer, context, question, method=spec + ",share=none", max_new_tokens=3)
    shared = cl.generate(model, tokenizer, context, question, method=spec + ",share=all", max_new_tokens=3)
    assert shared.kv_bytes == own.kv_bytes  # the same budget per layer and head
    first = shared.kept_positions[0]
    assert bool((first == first[:, :1]).all())
    assert all(torch.equal(kept, first) for kept in shared.kept_positions)
    assert bool((first[..., -4:] == torch.arange(202, 206)).all())  # the observation window, kept
    for kept in [*own.kept_positions, *shared.kept_positions]:
        assert bool((kept[..., :4] == torch.arange(4)).all())  # the attention sinks (sink=4), kept at the start
    # per-head votes differ between heads and layers, so sharing changes what is kept
    assert any(not bool((k == k[:, :1]).all()) for k in own.kept_positions)


# a window below the budget: SnapKV protects its observation window, which would otherwise fill the budget
REENCODE = RETRIEVAL + ",window=4"  # the defaults: share=all, sink=4, reencode=true


def test_infiniretri_reencode_feeds_the_kept_ids_again_in_a_fresh_cache(model, tokenizer):
    """The paper's way: each segment is read, in a cache of its own, after the token ids the previous
    forward kept; the last cache (kept + last segment + question) is plain attention over those ids."""
    context, question = ids(200, 11), ids(6, 12)
    positions: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: positions.append(int(kwargs["position_ids"].max())), with_kwargs=True
    )
    try:
        with counted_forwards(model) as forwards:
            done = cl.generate(model, tokenizer, context, question, method=REENCODE, max_new_tokens=8)
    finally:
        handle.remove()
    assert max(positions) == 16 + 24 + len(done.token_ids[0]) - 2 < NATIVE  # every forward inside the window
    forwards = forwards[: -(len(done.token_ids[0]) - 1) or None]  # the prefill's forwards
    # 206 prompt tokens in chunks of 24 counted from the end (14 first); the kept ids (the first chunk's 14,
    # then the budget of 16) before every later chunk, the question copy after every chunk but the last
    assert forwards == [14 + 6, 14 + 24 + 6] + [16 + 24 + 6] * 6 + [16 + 24]
    assert done.tokens_processed == 206 + (14 + 7 * 16) + 8 * 6 + len(done.token_ids[0])
    n_kept = 16 + 24
    layers = model.config.num_hidden_layers
    per_slot = 2 * model.config.head_dim * 4 * model.config.num_key_value_heads
    assert done.kv_bytes == layers * n_kept * per_slot  # a plain cache of the last forward (no positions stored)
    assert done.kv_bytes_full == layers * 206 * per_slot
    first = done.kept_positions[0]
    assert all(torch.equal(kept, first) for kept in done.kept_positions)  # one set of ids for every layer
    assert bool((first[..., :4] == torch.arange(4)).all())  # the sinks
    assert bool((first[..., -24:] == torch.arange(182, 206)).all())  # the last chunk, question included
    assert bool((first.diff(dim=-1) > 0).all())
    prompt = context + question
    pre = cl.prefill(model, tokenizer, prompt, method=REENCODE)
    assert pre.input_ids[0].tolist() == [prompt[p] for p in pre.origins[0].tolist()]  # the ids at their origins
    plain = cl.prefill(model, tokenizer, pre.input_ids[0].tolist(), method="full")
    torch.testing.assert_close(pre.last_logits, plain.last_logits, rtol=1e-5, atol=1e-5)
    assert pre.columns == 206 and pre.cache.kv_bytes() == done.kv_bytes


def test_infiniretri_reencode_keeps_the_most_voted_ids_of_the_first_segment(model, tokenizer):
    """The ids carried after a segment are the sinks and the 12 most voted of the other 20, summed over the
    layers of that segment's forward (recomputed here from SnapKV's scores of every layer)."""
    from contextlab.methods.eviction import SnapKV
    from contextlab.methods.prefill import score_inputs

    context, question = ids(200, 11), ids(6, 12)
    method = cl.method(REENCODE + ",kernel=1")
    # a segment of 24 prompt tokens, then the question copy (transient)
    fed = torch.tensor([context[:24] + question])
    cache = ContextlabCache(model.config, method)
    cache.begin_prompt(30, [30], 0)
    cache.state.transient, cache.state.segment = 6, True
    captured = []

    def keep_step(policy):
        original = policy.after_forward

        def after(store, step):
            view = store.view()
            inputs = score_inputs(view, step, torch.tensor([16]), torch.tensor([30]))
            captured.append(SnapKV(budget=method.budget, window=4, kernel=1).score(inputs)[0, :, :24])
            return original(store, step)

        policy.after_forward = after

    for layer in cache.compressible:
        keep_step(layer.policy)
    with torch.inference_mode(), cl.attention_enabled(model):
        forward(model, cache, fed, torch.ones_like(fed))
    chosen = cache.state.shared["selected"][0].tolist()
    votes = torch.zeros(20, dtype=torch.float64)
    for scores in captured:  # [H, 24]: each head's votes over the unprotected context (not the sinks),
        own = scores[:, 4:].double()  # normalised to one per head, averaged over heads
        votes += (own / own.sum(-1, keepdim=True)).mean(0)
    rest = (votes.argsort(descending=True, stable=True)[:12] + 4).sort().values.tolist()
    assert chosen == [0, 1, 2, 3, *rest]
    last = captured[-1][:, 4:].double()
    last = (last / last.sum(-1, keepdim=True)).mean(0)
    assert rest != (last.argsort(descending=True)[:12] + 4).sort().values.tolist()  # the other layers count


@pytest.mark.parametrize("aware", [True, False])
def test_infiniretri_reencode_batch_with_questions_equals_one_by_one(model, tokenizer, aware):
    """Rows of different lengths with questions of different lengths: the same answers and the same kept
    prompt positions in a batch as alone (question copies, empty early segments, questions fed after)."""
    contexts = [ids(n, 30 + n) for n in (110, 70, 118)]
    questions = [ids(n, 40 + n) for n in (6, 3, 8)]
    batch = cl.generate(model, tokenizer, contexts, questions, method=REENCODE, max_new_tokens=4, question_aware=aware)
    for i, (c, q) in enumerate(zip(contexts, questions, strict=True)):
        alone = cl.generate(model, tokenizer, c, q, method=REENCODE, max_new_tokens=4, question_aware=aware)
        assert batch.token_ids[i] == alone.token_ids[0], i
        for mine, theirs in zip(batch.kept_positions, alone.kept_positions, strict=True):
            row = mine[i][mine[i] >= 0].view(mine.shape[1], -1)
            assert torch.equal(row, theirs[0][theirs[0] >= 0].view(theirs.shape[1], -1)), i


def test_infiniretri_reencode_reports_the_largest_segment_cache_as_its_peak(model, tokenizer):
    context, question = ids(200, 11), ids(6, 12)
    done = cl.generate(model, tokenizer, context, question, method=REENCODE, max_new_tokens=1)
    per_token = 2 * model.config.head_dim * 4 * model.config.num_key_value_heads * model.config.num_hidden_layers
    # segments of 16 kept + 24 + the question copy (46 tokens) hold more than the last cache (40 + 1)
    assert done.peak_memory_bytes == 46 * per_token


def test_positions_past_the_origins_table_continue_after_its_end():
    from contextlab.engine.result import _through

    origins = torch.tensor([[0, 3, 7, -1], [2, 5, 6, 9]])
    held = torch.tensor([[[0, 2, 3, 4, -1]], [[1, 3, 4, 5, -1]]])
    expected = torch.tensor([[[0, 7, 8, 9, -1]], [[5, 9, 10, 11, -1]]])
    assert torch.equal(_through(held, origins), expected)
