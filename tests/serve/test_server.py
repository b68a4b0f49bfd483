"""``contextlab serve`` as a real subprocess on a free loopback port, called with the OpenAI client and httpx:
answers equal ``cl.generate`` (alone and batched), streaming, the error table, the queue limit, metrics."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import contextlab as cl  # noqa: E402
from tests.serve.server import start_server, stop_server  # noqa: E402

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
KEY = "test-key-123"
PROMPTS = [
    "The magic number is 4217. The magic number is",
    "A quiet river runs past the old mill, and the mill",
    "Remember the code word: lantern. The code word is",
    "one two three four five six",
]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """The reference model with a small chat template (the bundled one has none)."""
    model, tok = cl.load("reference")
    tok.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("ref-chat")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def local_model(chat_model_dir):
    return cl.load(str(chat_model_dir))


@pytest.fixture(scope="module")
def server(chat_model_dir):
    proc, base = start_server(
        "--model",
        str(chat_model_dir),
        "--model-name",
        "ref",
        "--max-batch",
        "8",
        "--batch-wait-ms",
        "50",
        "--max-prompt-tokens",
        "600",
        "--max-tokens",
        "64",
        "--max-body-bytes",
        "20000",
    )
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def expected(model, tok, prompt, method="full", max_tokens=12) -> str:
    return cl.generate(model, tok, prompt, None, method=method, max_new_tokens=max_tokens, chat_template=False).text


@pytest.mark.parametrize("method", ["full", "snapkv:0.5", "streaming:sink=4,window=16"])
def test_completion_equals_generate(client, local_model, method):
    model, tok = local_model
    out = client.completions.create(
        model="ref", prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={"contextlab": {"method": method}}
    )
    assert out.choices[0].text == expected(model, tok, PROMPTS[0], method)
    assert out.usage.prompt_tokens == len(tok(PROMPTS[0])["input_ids"])
    assert out.model_extra["contextlab"]["method"] == cl.method(method).describe()


def test_chat_equals_generate_on_the_templated_prompt(client, local_model):
    model, tok = local_model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[2]}]
    out = client.chat.completions.create(model="ref", messages=messages, max_tokens=10)
    ids = _ids(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    want = cl.generate(model, tok, ids, None, max_new_tokens=10, chat_template=False)
    assert out.choices[0].message.content == want.text and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == ("length" if len(want.token_ids[0]) == 10 else "stop")


def test_streams_add_up_to_the_answer(client, local_model):
    model, tok = local_model
    pieces = [
        c.choices[0].text for c in client.completions.create(model="ref", prompt=PROMPTS[1], max_tokens=12, stream=True)
    ]
    assert len(pieces) > 2 and "".join(pieces) == expected(model, tok, PROMPTS[1])
    chunks = list(
        client.chat.completions.create(
            model="ref", messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=8, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_are_batched_and_answer_as_alone(server, local_model):
    model, tok = local_model
    before = _metric(server, "contextlab_batches_total")

    def ask(prompt):
        r = httpx.post(f"{server}/v1/completions", json={"prompt": prompt, "max_tokens": 12}, timeout=120)
        return r.json()

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, PROMPTS))
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        assert answer["choices"][0]["text"] == expected(model, tok, prompt)
    assert max(a["contextlab"]["batch_rows"] for a in answers) > 1  # at least two shared a batch
    assert _metric(server, "contextlab_batches_total") - before < len(PROMPTS)


def test_a_list_of_prompts_gets_one_choice_each(server, local_model):
    model, tok = local_model
    r = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPTS[:2], "max_tokens": 6}, timeout=120).json()
    assert [c["text"] for c in r["choices"]] == [expected(model, tok, p, max_tokens=6) for p in PROMPTS[:2]]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ("{bad json", 400, "not valid JSON"),
        ({"prompt": "x", "contextlab": {"method": "snpkv:0.5"}}, 400, "did you mean 'snapkv'"),
        ({"prompt": "x", "contextlab": {"metod": "full"}}, 400, "unknown 'contextlab' keys ['metod']"),
        ({"prompt": "word " * 200}, 413, "at most 600"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be a positive integer"),
        ({"prompt": "x", "max_tokens": 65}, 400, "limit of 64"),
        ({"prompt": "x", "model": "gpt-9"}, 404, "'gpt-9' is not served here"),
        ({"prompt": "x", "temperature": 0.7}, 400, "decodes greedily"),
        ({"prompt": ""}, 400, "the prompt is empty"),
        ({"prompt": "x" * 30000}, 413, "exceeds the limit of 20000"),
        ({}, 400, "'prompt' is required"),
    ],
)
def test_bad_requests_get_a_status_and_a_message(server, body, status, fragment):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
    assert httpx.get(f"{server}/health").status_code == 200  # still serving


def test_chat_without_a_template_is_refused():
    proc, base = start_server("--model", "reference")
    try:
        r = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    finally:
        stop_server(proc)


def test_api_key_and_a_full_queue():
    proc, base = start_server("--model", "reference", "--api-key", KEY, "--max-queue", "1", "--max-batch", "1")
    try:
        assert httpx.get(f"{base}/health").status_code == 200  # no key needed
        assert httpx.get(f"{base}/v1/models").status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "x"}, headers=wrong).status_code == 401
        auth = {"authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{base}/v1/models", headers=auth).json()["data"][0]["id"] == "reference"
        body = {"prompt": PROMPTS[0] * 20, "max_tokens": 300}

        def ask(_):
            return httpx.post(f"{base}/v1/completions", json=body, headers=auth, timeout=300)

        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(ask, range(6)))
        codes = sorted(r.status_code for r in replies)
        # one runs, one waits, the rest are turned away with a Retry-After
        assert codes.count(200) >= 1 and codes.count(429) >= 2 and set(codes) <= {200, 429}, codes
        busy = next(r for r in replies if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]["message"]
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth).is_success
    finally:
        stop_server(proc)


def test_a_client_leaving_mid_stream_does_not_stop_the_server(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 60, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_metrics_count_requests_tokens_and_latency(server):
    httpx.post(f"{server}/v1/completions", json={"prompt": "y", "max_tokens": 3}, timeout=60)
    text = httpx.get(f"{server}/metrics").text
    assert 'contextlab_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert _metric(server, "contextlab_completion_tokens_total") > 0
    assert 'contextlab_request_seconds_bucket{endpoint="/v1/completions",le="+Inf"}' in text
    assert "contextlab_queue_length 0" in text


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_shared_prefix_is_compressed_once_and_reused(server, local_model):
    model, tok = local_model
    context = " ".join(f"Item {i} is kept in box {i * 7 % 13}." for i in range(12))
    ids = tok(context)["input_ids"]
    hits = _metric(server, 'contextlab_reuse_total{outcome="hit"}')
    answers = []
    for question in (" Which box holds item 3? Box", " Which box holds item 9? Box"):
        q_ids = tok(question, add_special_tokens=False)["input_ids"]
        ext = {"method": "snapkv:0.5", "prefix_tokens": len(ids)}
        body = {"prompt": ids + q_ids, "max_tokens": 4, "contextlab": ext}
        r = httpx.post(f"{server}/v1/completions", json=body, timeout=120).json()
        want = cl.generate(model, tok, ids, q_ids, method="snapkv:0.5", question_aware=False, max_new_tokens=4)
        assert r["choices"][0]["text"] == want.text
        answers.append(r["contextlab"])
    assert [a["reuse"] for a in answers] == ["miss", "hit"]
    assert answers[1]["prefill_seconds"] < answers[0]["prefill_seconds"]
    assert _metric(server, 'contextlab_reuse_total{outcome="hit"}') == hits + 1
    assert _metric(server, "contextlab_reuse_bytes") > 0


def test_a_long_chat_reuses_its_earlier_messages(chat_model_dir, local_model):
    model, tok = local_model
    proc, base = start_server("--model", str(chat_model_dir), "--reuse-min-tokens", "64")
    try:
        doc = {"role": "user", "content": "Remember: the vault code is 5521. " * 6}
        ack = {"role": "assistant", "content": "Noted."}
        seen = []
        for question in ("What is the vault code?", "Repeat the vault code."):
            messages = [doc, ack, {"role": "user", "content": question}]
            r = httpx.post(f"{base}/v1/chat/completions", json={"messages": messages, "max_tokens": 6}, timeout=120)
            seen.append(r.json()["contextlab"])
            full = _ids(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
            earlier = _ids(tok.apply_chat_template(messages[:-1], tokenize=True))
            assert full[: len(earlier)] == earlier
            want = cl.generate(model, tok, earlier, full[len(earlier) :], question_aware=False, max_new_tokens=6)
            assert r.json()["choices"][0]["message"]["content"] == want.text
        assert [s["reuse"] for s in seen] == ["miss", "hit"] and seen[0]["prefix_tokens"] == len(earlier) > 64
    finally:
        stop_server(proc)


def test_prefix_tokens_must_leave_a_question(server):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "abc", "contextlab": {"prefix_tokens": 50}})
    assert r.status_code == 400 and "leaves nothing after the prefix" in r.json()["error"]["message"]


def _ids(out) -> list[int]:
    """apply_chat_template's ids (a list, or a mapping holding ``input_ids``, by transformers version)."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)
