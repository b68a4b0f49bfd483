"""MInference on tiny models: the offline search picks a shape per head by recall and saves it, the saved
profile is reused and checked (model, settings, checksum), prompts are computed with the shapes (and equal
full attention when every shape covers the whole map), and bad settings are refused."""

from __future__ import annotations

import json

import pytest
import torch

import contextlab as cl
from contextlab.hf.cache import ContextlabCache
from contextlab.hf.compat import cache_kwarg, layer_types
from contextlab.hf.support import output_projections
from contextlab.kernels.sparse_prefill import PrefillPattern, reference_prefill
from contextlab.methods import sparse_prefill
from contextlab.methods.profiles import ProfileError, capture_prompt, model_digest, profile_path, save_profile
from contextlab.methods.sparse_prefill import MInference, head_shapes, online_pattern
from tests.conftest import tiny_model

CONTEXT = "The archive holds many ledgers; the seventh is bound in green leather and kept apart. " * 8
SMALL = "minference:min_length=64,sink=4,local=32,vertical=16,slash=16,blocks=2,last=16,calibration=1024"


def test_the_search_gives_each_head_its_best_recall_or_dense():
    gen = torch.Generator().manual_seed(1)
    s, d = 300, 16
    keys = torch.randn(1, 2, s, d, generator=gen)
    queries = torch.randn(1, 4, s, d, generator=gen) * 0.1
    queries[:, 0] = 0.0  # head 0 attends uniformly: no sparse shape keeps much of it
    queries[:, 1] = keys[:, 0] * 20  # head 1 attends to its own position: a local band keeps it all
    method = MInference(sink=4, local=32, vertical=16, slash=16, blocks=2, last=16, recall=0.9)
    shapes, recalls = head_shapes(method, queries, keys, d**-0.5)
    assert shapes[0] == "dense" and recalls[0] < 0.9
    assert shapes[1] != "dense" and recalls[1] > 0.95  # every shape reads the diagonal
    everything = MInference(sink=4, local=1000, last=16, recall=0.999)  # an A-shape as wide as the prompt
    shapes, recalls = head_shapes(everything, queries, keys, d**-0.5)
    assert shapes == ["a_shape"] * 4 and recalls == [1.0] * 4
    exact = MInference(sink=4, local=1000, last=16, recall=1.0)  # full attention, whatever a float sum says
    assert head_shapes(exact, queries, keys, d**-0.5)[0] == ["dense"] * 4


def test_a_profile_is_searched_once_saved_and_reused(llama, tokenizer, monkeypatch, profile_folder):
    method = cl.method(SMALL + ",recall=0.5")
    first = method.bind(llama, tokenizer)
    path = profile_path("minference", model_digest(llama), method.settings())
    assert path.exists() and first.shapes is not None and len(first.shapes) == llama.config.num_hidden_layers
    data = json.loads(path.read_text())
    assert data["data"]["shapes"] == [list(x) for x in first.shapes]

    def no_search(*args, **kwargs):
        raise AssertionError("the saved profile should have been used")

    monkeypatch.setattr(sparse_prefill, "search_patterns", no_search)
    again = cl.method(SMALL + ",recall=0.5").bind(llama, tokenizer)
    assert again.shapes == first.shapes
    assert again.describe() == method.describe()  # the bound shapes are not a spec parameter
    explicit = cl.method(f"{SMALL},recall=0.5,profile={path}").bind(llama, tokenizer)
    assert explicit.shapes == first.shapes


def test_a_profile_for_another_model_or_a_damaged_one_is_refused(llama, tokenizer, tmp_path):
    method = cl.method(SMALL + ",recall=0.6")
    method.bind(llama, tokenizer)
    path = profile_path("minference", model_digest(llama), method.settings())
    other = tiny_model("llama", seed=1)
    with pytest.raises(ProfileError, match="measured on another model"):
        cl.method(f"{SMALL},recall=0.6,profile={path}").bind(other, tokenizer)
    body = json.loads(path.read_text())
    body["data"]["shapes"][0][0] = "vertical_slash" if body["data"]["shapes"][0][0] != "vertical_slash" else "dense"
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps(body))  # the old checksum no longer matches
    with pytest.raises(ProfileError, match="failed its checksum"):
        cl.method(f"{SMALL},recall=0.6,profile={damaged}").bind(llama, tokenizer)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ProfileError, match="cannot read the profile"):
        cl.method(f"{SMALL},recall=0.6,profile={tmp_path / 'junk.json'}").bind(llama, tokenizer)
    with pytest.raises(ProfileError, match="was made with"):
        cl.method(f"{SMALL},recall=0.7,profile={path}").bind(llama, tokenizer)


def _prompt_logits(model, tokenizer, method) -> tuple[torch.Tensor, ContextlabCache]:
    ids = torch.tensor([tokenizer(CONTEXT)["input_ids"]])
    cache = ContextlabCache(model.config, method)
    cache.begin_prompt(ids.shape[1], [ids.shape[1]])
    with torch.no_grad(), cl.attention_enabled(model):
        logits = model(ids, **{cache_kwarg(model): cache}).logits
    return logits, cache


def test_shapes_covering_the_whole_map_give_full_attention(llama, tokenizer):
    reference = llama(torch.tensor([tokenizer(CONTEXT)["input_ids"]])).logits
    heads = llama.config.num_attention_heads
    for shape in ("a_shape", "vertical_slash", "block_sparse"):
        wide = MInference(sink=4, local=4096, vertical=4096, slash=4096, blocks=64, min_length=8)
        method = wide.with_shapes([[shape] * heads] * llama.config.num_hidden_layers)
        logits, cache = _prompt_logits(llama, tokenizer, method)
        assert all(layer.policy.sparse_forwards == 1 for layer in cache.compressible)
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_each_layer_attends_with_its_heads_shapes(llama, tokenizer):
    heads = llama.config.num_attention_heads
    layers = llama.config.num_hidden_layers
    mixed = (["a_shape", "vertical_slash", "block_sparse", "dense"] * heads)[:heads]
    method = cl.method(SMALL).with_shapes([mixed] * layers)
    captured = {}
    original = sparse_prefill.sparse_prefill

    def spy(query, key, value, pattern, scaling):
        out = original(query, key, value, pattern, scaling)
        captured[len(captured)] = (query, key, value, pattern, scaling, out)
        return out

    sparse_prefill.sparse_prefill = spy
    try:
        _prompt_logits(llama, tokenizer, method)
    finally:
        sparse_prefill.sparse_prefill = original
    assert len(captured) == layers
    for query, key, value, pattern, scaling, out in captured.values():
        assert pattern.dense.tolist() == [x == "dense" for x in mixed]
        expected = online_pattern(method, tuple(mixed), query, key, scaling)
        assert torch.equal(pattern.vertical, expected.vertical) and torch.equal(pattern.blocks, expected.blocks)
        torch.testing.assert_close(out, reference_prefill(query, key, value, pattern, scaling), atol=1e-4, rtol=1e-4)


def test_generation_runs_sparse_prefill_then_dense_decoding(llama, tokenizer):
    method = cl.method(SMALL + ",recall=0.0").bind(llama, tokenizer)
    assert all(shape != "dense" for layer in method.shapes for shape in layer)
    _, cache = _prompt_logits(llama, tokenizer, method)
    assert all(layer.policy.sparse_forwards == 1 for layer in cache.compressible)
    out = cl.generate(llama, tokenizer, CONTEXT, "Which ledger?", method=method, max_new_tokens=6)
    full = cl.generate(llama, tokenizer, CONTEXT, "Which ledger?", max_new_tokens=6)
    assert len(out.tokens) == len(full.tokens) and out.kv_bytes == full.kv_bytes  # nothing evicted


@pytest.mark.parametrize("shape", ["vertical_slash", "block_sparse", "a_shape"])
def test_a_padded_batch_answers_like_its_rows_alone(llama, tokenizer, shape):
    """Vertical columns and blocks are estimated and placed at each row's own positions, not at the batch's
    columns (a left-padded row would otherwise read columns shifted by its padding)."""
    heads, layers = llama.config.num_attention_heads, llama.config.num_hidden_layers
    method = cl.method(SMALL).with_shapes([[shape] * heads] * layers)
    contexts = [CONTEXT, CONTEXT[: len(CONTEXT) // 2]]
    batch = cl.generate(llama, tokenizer, contexts, "Which ledger?", method=method, max_new_tokens=8)
    for i, context in enumerate(contexts):
        alone = cl.generate(llama, tokenizer, context, "Which ledger?", method=method, max_new_tokens=8)
        assert batch.token_ids[i] == alone.tokens, i


def test_an_unbound_method_refuses_to_prefill_rather_than_go_dense(llama, tokenizer):
    with pytest.raises(ValueError, match="no per-head shapes for this model"):
        _prompt_logits(llama, tokenizer, cl.method(SMALL))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("minference:recall=1.5", "recall must be a number in"),
        ("minference:recall=-0.1", "recall must be a number in"),
        ("minference:local=0", "local must be an integer >= 1"),
        ("minference:calibration=16", "calibration must be an integer >= 1024"),
        ("minference:shapes=x", "unknown parameter"),
    ],
)
def test_bad_settings_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        cl.method(spec)
    with pytest.raises(ValueError, match="unknown head shape"):
        MInference().with_shapes([["diagonal"]])


def test_streaming_pattern_helper_matches_an_a_shape():
    pattern = PrefillPattern.streaming(2, 3, 5)
    assert pattern.sink.tolist() == [3, 3] and pattern.window.tolist() == [5, 5] and not bool(pattern.dense.any())


# -- DuoAttention ---------------------------------------------------------------------------------------------
DUO = "duo:sink=4,window=32,every=8,last=16,calibration=1024"


def test_a_head_reading_far_back_scores_higher_than_a_local_one():
    gen = torch.Generator().manual_seed(3)
    s, d = 400, 64  # wide heads: a key scores far higher with itself than with any other
    keys = torch.randn(1, 2, s, d, generator=gen)
    values = torch.randn(1, 2, s, d, generator=gen)
    queries = torch.zeros(1, 4, s, d)
    queries[:, 0:2] = keys[:, 0, 150] * 20  # KV head 0's query heads look for a token far back
    queries[:, 2:4] = keys[:, 1] * 20  # KV head 1's look at their own position
    method = cl.method("duo:sink=4,window=32,last=16,score=relative")
    scores = sparse_prefill.head_deviation(method, queries, keys, values, d**-0.5)
    assert scores[0] > 0.5 and scores[1] < 0.1
    projection = torch.eye(4 * d)  # every head writes its own channels, unscaled
    moved = sparse_prefill.head_deviation(
        cl.method("duo:sink=4,window=32,last=16"), queries, keys, values, d**-0.5, projection
    )
    assert moved[0] > 1.0 and moved[1] < 0.1 * moved[0]


def test_the_output_score_is_each_heads_change_through_its_slice_of_the_output_projection():
    """Known answer, computed by hand per query head: the mean over the last queries of |W_h (full_h - cut_h)|,
    summed over the query heads of a KV head; a head whose slice of the projection is zero scores zero
    however much its attention moves, and scaling a slice scales its head's score."""
    gen = torch.Generator().manual_seed(5)
    s, d, hq, hkv, hidden, last = 96, 8, 4, 2, 12, 6
    queries = torch.randn(1, hq, s, d, generator=gen) * 3
    keys, values = torch.randn(1, hkv, s, d, generator=gen), torch.randn(1, hkv, s, d, generator=gen)
    projection = torch.randn(hidden, hq * d, generator=gen)
    projection[:, 1 * d : 2 * d] = 0  # query head 1 (KV head 0) writes nothing
    projection[:, 3 * d : 4 * d] *= 2.5
    method = cl.method(f"duo:sink=2,window=10,last={last}")
    got = sparse_prefill.head_deviation(method, queries, keys, values, d**-0.5, projection)
    expected = torch.zeros(hkv)
    for head in range(hq):
        kv = head // (hq // hkv)
        moved = 0.0
        for row in range(s - last, s):
            scores = (queries[0, head, row] @ keys[0, kv, : row + 1].T) * d**-0.5
            full = scores.softmax(-1) @ values[0, kv, : row + 1]
            near = torch.tensor([j < 2 or j > row - 10 for j in range(row + 1)])
            cut = scores.masked_fill(~near, float("-inf")).softmax(-1) @ values[0, kv, : row + 1]
            moved += float((projection[:, head * d : (head + 1) * d] @ (full - cut)).norm()) / last
        expected[kv] += moved
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    lone = projection.clone()
    lone[:, 0:d] = 0  # KV head 0 now has no query head that writes anything
    assert float(sparse_prefill.head_deviation(method, queries, keys, values, d**-0.5, lone)[0]) == 0.0
    with pytest.raises(ValueError, match="needs the layer's output projection"):
        sparse_prefill.head_deviation(method, queries, keys, values, d**-0.5)


def test_the_output_projection_reads_each_heads_attention_output_head_major(arch_model, tokenizer):
    """What the score assumes of every architecture: the input of a layer's ``o_proj`` is its attention
    output flattened head-major (columns ``h * D : (h + 1) * D`` are query head ``h``), equal to attention
    over the captured queries, keys and values with the captured scaling."""
    _, model = arch_model
    full = [i for i, kind in enumerate(layer_types(model.config)) if kind == "full_attention"]
    layers = model.get_decoder().layers
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in full}
    hooks = [
        layers[i].self_attn.o_proj.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].detach()))
        for i in full
    ]
    try:
        captured = capture_prompt(model, tokenizer, 1024, 0)
    finally:
        for hook in hooks:
            hook.remove()
    for rank, index in enumerate(full):
        q, k, v, scaling = captured[rank]
        hq, t, d = q.shape[1], q.shape[2], q.shape[3]
        dense = PrefillPattern.full(hq)
        expected = reference_prefill(q.float(), k.float(), v.float(), dense, scaling)[0]  # [Hq, T, D]
        fed = torch.cat(seen[index], dim=1)[0, -t:].float().view(t, hq, d).transpose(0, 1)
        torch.testing.assert_close(fed, expected, rtol=1e-4, atol=1e-4)


def test_a_quantized_output_projection_is_refused_for_the_output_score():
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8)
    method = cl.method("duo:sink=2,window=8,last=4")
    with pytest.raises(ValueError, match=r"not plain floats here .*use duo:score=relative"):
        sparse_prefill.head_deviation(method, q, k, v, 8**-0.5, torch.zeros(16, 16, dtype=torch.int8))
    assert sparse_prefill.head_deviation(
        cl.method("duo:sink=2,window=8,last=4,score=relative"), q, k, v, 0.3
    ).shape == (1,)


def test_output_projections_cover_the_full_attention_layers(arch_model):
    arch, model = arch_model
    weights = output_projections(model)
    full = [i for i, kind in enumerate(layer_types(model.config)) if kind == "full_attention"]
    assert len(weights) == len(full) == (2 if arch == "gemma3" else 3)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for index, weight in zip(full, weights, strict=True):
        assert weight is model.get_decoder().layers[index].self_attn.o_proj.weight
        assert tuple(weight.shape) == (cfg.hidden_size, cfg.num_attention_heads * head_dim)


def test_the_lowest_scoring_share_of_heads_streams():
    method = cl.method("duo:retrieval=0.25").with_scores([[0.9, 0.1], [0.05, 0.3]])
    assert method.streaming == ((False, True), (True, True))  # one head of four keeps everything
    assert cl.method("duo:retrieval=1.0").with_scores([[0.9, 0.1]]).streaming == ((False, False),)
    assert cl.method("duo:retrieval=0.0").with_scores([[0.9, 0.1]]).streaming == ((True, True),)


def test_streaming_heads_keep_sink_and_window_and_the_memory_drops(llama, tokenizer):
    method = cl.method(DUO).bind(llama, tokenizer)
    out = cl.generate(llama, tokenizer, CONTEXT, "Which ledger?", method=method, max_new_tokens=20)
    n = out.prompt_tokens[0]
    for layer, (kept, streaming) in enumerate(zip(out.kept_positions, method.streaming, strict=True)):
        counts = (kept[0] >= 0).sum(-1)
        for head, stream in enumerate(streaming):
            expected = 4 + 32 if stream else n
            assert int(counts[head]) == expected, (layer, head)
            if stream:  # the first 4 positions and the newest 32
                assert kept[0, head][:4].tolist() == [0, 1, 2, 3] and int(kept[0, head].max()) == n - 1
    streams = sum(sum(layer) for layer in method.streaming)
    heads = sum(len(layer) for layer in method.streaming)
    assert streams == heads // 2 and out.kv_bytes < 0.6 * out.kv_bytes_full
    # generation cuts the streaming heads again every 8 tokens: bounded by sink + window + every
    assert out.kv_bytes_end < 0.6 * out.kv_bytes_full


def test_duo_with_every_head_retrieving_is_full_attention(llama, tokenizer):
    full = cl.generate(llama, tokenizer, CONTEXT, "Which ledger?", max_new_tokens=12)
    duo = cl.generate(llama, tokenizer, CONTEXT, "Which ledger?", method=DUO + ",retrieval=1.0", max_new_tokens=12)
    assert duo.tokens == full.tokens and duo.kv_bytes == full.kv_bytes


def test_duo_composes_with_quantization_and_batches(llama, tokenizer):
    contexts = [CONTEXT, CONTEXT[:300]]
    out = cl.generate(llama, tokenizer, contexts, "Which ledger?", method=DUO + "+kivi:bits=4,group=16,residual=16")
    assert len(out.token_ids) == 2
    batch = cl.generate(llama, tokenizer, contexts, "Which ledger?", method=DUO, max_new_tokens=10)
    for i, context in enumerate(contexts):
        alone = cl.generate(llama, tokenizer, context, "Which ledger?", method=DUO, max_new_tokens=10)
        assert batch.token_ids[i] == alone.tokens, i


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("duo:retrieval=1.5", "retrieval must be a number in"),
        ("duo:retrieval=-0.5", "retrieval must be a number in"),
        ("duo:window=0", "window must be an integer >= 1"),
        ("duo:calibration=100", "calibration must be an integer >= 1024"),
        ("duo:score=attention", "score must be one of"),
    ],
)
def test_bad_duo_settings_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        cl.method(spec)


def test_a_duo_profile_for_another_model_or_without_scores_is_refused(llama, tokenizer, tmp_path):
    method = cl.method(DUO)
    method.bind(llama, tokenizer)
    path = profile_path("duo", model_digest(llama), method.settings())
    with pytest.raises(ProfileError, match="measured on another model"):
        cl.method(f"{DUO},profile={path}").bind(tiny_model("llama", seed=1), tokenizer)
    body = json.loads(path.read_text())
    body.pop("checksum")
    body["data"] = {"tokens": 1}  # a well-formed file that holds no scores
    empty = tmp_path / "empty.json"
    save_profile(empty, "duo", body["model"], body["settings"], body["data"])
    with pytest.raises(ProfileError, match="holds no per-layer 'scores' list"):
        cl.method(f"{DUO},profile={empty}").bind(llama, tokenizer)


def test_the_model_digest_sees_a_change_in_any_layer(llama):
    """A fine-tune that leaves the embeddings alone (a merged LoRA on one projection) is another model."""
    other = tiny_model("llama")
    assert model_digest(other) == model_digest(llama)
    with torch.no_grad():
        other.model.layers[-1].self_attn.q_proj.weight.mul_(1.5)
    assert model_digest(other) != model_digest(llama)
    assert model_digest(tiny_model("llama", dtype=torch.bfloat16)) == model_digest(llama)  # same weights
