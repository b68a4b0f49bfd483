"""Strategies: specs and their errors, end-to-end runs on the reference model past its window, every call's
cost accounted, and the router's documented rule."""

from __future__ import annotations

import pytest

import contextlab as cl
from contextlab.bench.tasks import TASKS
from contextlab.chat import prefix_ids
from contextlab.methods.base import Method
from contextlab.strategies import STRATEGIES, Strategy, StrategyError, base, build, is_strategy, retrieval
from contextlab.strategies.base import split_prompt
from contextlab.strategies.router import Router

# Small parameters so each strategy runs in seconds on the reference model (native window 4096).
SMALL = {
    "rag": "rag:k=4,chunk=256",
    "dense": "rag:k=4,chunk=256,scorer=dense",
    "xl3m": "xl3m:k=4,chunk=256,batch=8",
    "coa": "coa:chunk=1536,note=16",
    "wim": "wim:chunk=1536,margin=16",
    "router": "router:k=4",
}


@pytest.fixture(scope="module")
def reference():
    return cl.load("reference")


@pytest.fixture(scope="module")
def long_samples(reference):
    """Two single-needle prompts of 6000 tokens: past the reference model's 4096-token window."""
    _, tok = reference
    return TASKS.get("niah_single_2")(tok, 6000, 3, num_samples=2)


def test_every_strategy_is_registered_apart_from_methods():
    assert set(STRATEGIES.names()) == {"rag", "xl3m", "coa", "wim", "router"}
    assert not set(STRATEGIES.names()) & set(cl.METHODS.names())


def test_specs_parse_like_methods_and_compose_with_a_read_method():
    rag = build("rag:k=8,chunk=256+snapkv:0.5")
    assert isinstance(rag, Strategy) and (rag.k, rag.chunk, rag.read) == (8, 256, "snapkv:0.5")
    assert rag.describe() == "rag+snapkv:ratio=0.5"  # k=8 and chunk=256 are the defaults
    assert build("rag:k=4,chunk=256").describe() == "rag:k=4"
    assert isinstance(rag.read_method, Method)
    assert build("rag(k=2,tokens=300)").tokens == 300
    assert build("router:kv_mb=1").kv_mb == 1.0  # an integer for a float field
    assert isinstance(build("snapkv:0.5"), Method)
    assert is_strategy("coa:chunk=2048") and not is_strategy("snapkv:0.5")
    # spellings of the same read method describe alike (one cell on resume and in reports)
    assert build("rag+snapkv:0.5").describe() == build("rag+snapkv:ratio=0.5").describe() == "rag+snapkv:ratio=0.5"
    assert build("router:kv=snapkv:ratio=0.5").describe() == "router"  # the default kv, spelled otherwise


def test_a_base_model_prompt_splits_into_bos_body_question_and_answer_cue(reference, long_samples):
    _, tok = reference  # no chat template: BOS is the head, "\nAnswer:" the cue the answer follows
    s = long_samples[0]
    p = split_prompt(tok, s.context_ids, s.question_ids)
    assert p.head == prefix_ids(tok) and len(p.head) == 1
    assert p.head + p.body == s.context_ids and p.query + p.tail + p.prefix == s.question_ids
    assert tok.decode(p.prefix) == "\nAnswer:" and tok.decode(p.query).startswith("\n\nQuestion: What is")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rag:k=0", r"k \(chunks read\) must be an integer >= 1"),
        ("rag:chunk=0", "chunk must be a positive number of tokens"),
        ("rag:overlap=300", "overlap must be an integer in"),
        ("rag:scorer=tfidf", "scorer must be one of"),
        ("rag:depth=3", r"unknown parameter\(s\) \['depth'\] for strategy 'rag'"),
        ("rag:k=two", "k must be int"),
        ("rag:8", "give a strategy's parameters as key=value"),
        ("snapkv:0.5+rag:k=8", "an input-level strategy goes first"),
        ("rag:k=8+snapkv:2.0", "read method 'snapkv:2.0'"),
        ("router+snapkv:0.5", "router picks its own read method"),
        ("rag+snapkv:budget=512", "keeps a fixed number of tokens, but a strategy's reads vary in length"),
        ("router:kv=streaming:budget=512", "keeps a fixed number of tokens"),
        ("coa:note=0", "note must be an integer >= 1"),
        ("ragg:k=8", "input-level strategies: coa, rag, router, wim, xl3m"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        build(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rag:chunk=5000", "a chunk of 5000 tokens .* is larger than the model's window of 4096"),
        ("rag:k=32,chunk=256", "k x chunk = 32 x 256 = 8192 tokens read at once pass the model's window"),
        ("coa:chunk=4000", "pass the model's window of 4096; use chunk <="),
        ("wim:chunk=4096", "pass the model's window of 4096"),
    ],
)
def test_reads_that_cannot_fit_the_window_fail_before_any_work(reference, long_samples, spec, message):
    model, tok = reference
    s = long_samples[0]
    with pytest.raises(StrategyError, match=message):
        build(spec).generate(model, tok, s.context_ids, s.question_ids, max_new_tokens=8)


def test_a_question_is_required(reference):
    model, tok = reference
    with pytest.raises(ValueError, match="answers a question about the context; give one"):
        build("rag").generate(model, tok, "some context", None)
    with pytest.raises(ValueError, match="a question is empty"):
        build("rag").generate(model, tok, "some context", "   ")


@pytest.mark.parametrize("name", list(SMALL))
def test_strategies_run_past_the_window_and_book_every_call(reference, long_samples, monkeypatch, name):
    """Each strategy answers 6000-token prompts on a 4096-token model with no position extension; its
    result's calls and tokens are exactly those of the generate calls and scoring passes it made."""
    model, tok = reference
    calls = []
    real_generate, real_certainty = base.generate, retrieval.certainty_scores

    def spy_generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        assert max(out.prompt_tokens) + kwargs["max_new_tokens"] <= 4096  # every read fits the window
        calls.append((1, out.tokens_processed))
        return out

    def spy_certainty(model, chunks, question, batch):
        scores, passes = real_certainty(model, chunks, question, batch)
        calls.append((passes, sum(len(c) + len(question) for c in chunks)))
        return scores, passes

    monkeypatch.setattr(base, "generate", spy_generate)
    monkeypatch.setattr(retrieval, "certainty_scores", spy_certainty)
    out = build(SMALL[name]).generate(
        model, tok, [s.context_ids for s in long_samples], [s.question_ids for s in long_samples], max_new_tokens=12
    )
    assert len(out.texts) == 2 and out.batched
    assert out.calls == sum(c for c, _ in calls)
    assert out.tokens_processed == sum(t for _, t in calls)
    assert out.prompt_tokens == [6000, 6000]
    assert out.prefill_seconds > 0 and out.decode_seconds > 0
    if name != "wim":  # wim writes four margins in one batch: more than one prompt's cache at once
        assert out.kv_bytes < out.kv_bytes_full  # no read held the whole prompt's cache
    if name in ("rag", "dense", "xl3m"):  # one read each, after retrieval
        assert out.calls == 2 + (sum(c for c, _ in calls) - 2 if name == "xl3m" else 0)
    if name in ("coa", "wim"):
        # 6000 tokens in chunks of 1536: coa reads them one call each then answers; wim writes the four
        # margins in one batched call then answers
        assert out.calls >= (2 * 5 if name == "coa" else 2 * 2)
        assert out.tokens_processed > 2 * 6000  # they read everything
    assert out.routes == (["rag:k=4", "rag:k=4"] if name == "router" else [None, None])


def test_retrieval_answers_the_needle_past_the_window(reference, long_samples):
    """On the reference model, BM25 retrieve-then-read finds both needles at 6000 tokens, where full
    attention is refused for the window."""
    model, tok = reference
    out = build(SMALL["rag"]).generate(
        model, tok, [s.context_ids for s in long_samples], [s.question_ids for s in long_samples], max_new_tokens=12
    )
    assert [t.strip() for t in out.texts] == [s.answers[0] for s in long_samples]
    with pytest.raises(ValueError, match="exceed the model's window"):
        cl.generate(model, tok, long_samples[0].context_ids, long_samples[0].question_ids)


def test_a_composed_read_method_compresses_the_final_read(reference, long_samples):
    model, tok = reference
    s = long_samples[0]
    plain = build("rag:k=4,chunk=256").generate(model, tok, s.context_ids, s.question_ids, max_new_tokens=4)
    evicted = build("rag:k=4,chunk=256+snapkv:0.5").generate(
        model, tok, s.context_ids, s.question_ids, max_new_tokens=4
    )
    assert evicted.method == "rag:k=4+snapkv:ratio=0.5"
    assert evicted.kv_bytes < 0.6 * plain.kv_bytes


def test_text_inputs_keep_the_chat_frame_out_of_the_chunks(reference):
    model, tok = reference
    context = (
        "The sky was grey. " * 200 + "The special magic number for river-stone is: 4417021. " + "Rain fell. " * 200
    )
    out = build("rag:k=2,chunk=64").generate(model, tok, context, "What is the special magic number for river-stone?")
    assert out.calls == 1 and out.prompt_tokens[0] > 2 * 64


def test_engine_generate_books_one_call(reference):
    model, tok = reference
    out = cl.generate(model, tok, "The cat sat on the mat. " * 10, "Where did the cat sit?", max_new_tokens=5)
    assert out.calls == 1
    assert out.tokens_processed == out.prompt_tokens[0] + len(out.tokens)


@pytest.mark.parametrize(
    ("router", "prompt", "route"),
    [
        (Router(), 256, "full"),  # within the default token budget: an eighth of the 2048-token window
        (Router(), 257, "rag"),  # past it
        (Router(), 2040, "rag"),  # 2040 + 16 new tokens pass the 2048-token window
        (Router(tokens=2040), 2030, "full"),  # a budget as large as the window
        (Router(tokens=2040), 2040, "rag"),  # ... still refuses a prompt whose answer passes the window
        (Router(tokens=500), 1000, "rag"),  # over the token budget
        (Router(tokens=500), 400, "full"),
        (Router(tokens=1500, kv_mb=0.01), 1000, "snapkv:ratio=0.5"),  # over the KV memory budget: the KV method
        (Router(tokens=1500, kv_mb=100.0), 1000, "full"),
        (Router(tokens=1500, kv_mb=0.01, kv="streaming:0.75"), 1000, "streaming:ratio=0.75"),
        (Router(tokens=1500, kv_mb=0.01), 3000, "rag"),  # past the window, rag wins over the KV method
    ],
)
def test_router_follows_its_documented_rule(llama, router, prompt, route):
    # the tiny llama: window 2048; a full cache of 1000 tokens holds 3 layers x 2 x 2 heads x 16 x 4 B x 1016
    assert router.route(llama, prompt, 16, 2048) == route


def test_router_records_its_choice_per_row(reference, long_samples):
    model, tok = reference
    short = TASKS.get("niah_single_2")(tok, 400, 5, num_samples=1)[0]  # within 4096 // 8 tokens
    long = long_samples[0]
    out = build("router:k=4").generate(
        model, tok, [short.context_ids, long.context_ids], [short.question_ids, long.question_ids], max_new_tokens=8
    )
    assert out.routes == ["full", "rag:k=4"]
