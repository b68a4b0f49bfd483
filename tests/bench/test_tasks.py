"""Task generators: registered, deterministic for a seed, exact length, needles where they claim."""

from __future__ import annotations

import inspect
import random

import pytest

from contextlab.bench.metrics import score
from contextlab.bench.tasks import SYNTHETIC_TASKS, TASKS
from contextlab.bench.tasks.text import TokenizedHaystack


@pytest.fixture(scope="module")
def kjv(tokenizer):
    return TokenizedHaystack.build(tokenizer, "kjv")


def _params(name, kjv):
    """Share one tokenized KJV haystack with the generators whose default haystack is the KJV."""
    param = inspect.signature(TASKS.get(name)).parameters.get("haystack")
    return {"haystack": kjv} if param is not None and param.default == "kjv" else {}


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
@pytest.mark.parametrize("length", [1500, 2048])
def test_exact_length_and_determinism(tokenizer, kjv, name, length):
    gen = TASKS.get(name)
    a = gen(tokenizer, length, 7, num_samples=3, **_params(name, kjv))
    b = gen(tokenizer, length, 7, num_samples=3, **_params(name, kjv))
    c = gen(tokenizer, length, 8, num_samples=3, **_params(name, kjv))
    assert len(a) == 3
    for x, y in zip(a, b, strict=True):
        assert len(x.context_ids) + len(x.question_ids) == length
        assert (x.context_ids, x.question_ids, x.answers) == (y.context_ids, y.question_ids, y.answers)
    assert [x.answers for x in a] != [x.answers for x in c]


@pytest.mark.parametrize("name", [n for n in SYNTHETIC_TASKS if n not in ("cwe", "fwe")])
def test_answers_are_in_the_context(tokenizer, kjv, name):
    for s in TASKS.get(name)(tokenizer, 1500, 3, num_samples=2, **_params(name, kjv)):
        text = tokenizer.decode(s.context_ids)
        for turn in s.all_turns:
            assert all(a in text for a in turn.answers), (name, turn.answers)
        if s.needle_spans:
            needles = " ".join(tokenizer.decode(s.context_ids[a:b]) for a, b in s.needle_spans)
            assert any(a in needles for a in s.answers), (name, needles)


def test_depth_sweep_places_the_needle(tokenizer, kjv):
    samples = TASKS.get("niah_single_2")(tokenizer, 4000, 1, num_samples=5, haystack=kjv)
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    starts = [s.needle_spans[0][0] / len(s.context_ids) for s in samples]
    assert starts == sorted(starts) and starts[0] < 0.05 and starts[-1] > 0.9
    for s, depth in zip(samples[1:-1], (0.25, 0.5, 0.75), strict=True):
        assert abs(s.needle_spans[0][0] / len(s.context_ids) - depth) < 0.05


def test_unknown_task_suggests(tokenizer):
    with pytest.raises(ValueError, match="did you mean 'niah_single_1'"):
        TASKS.get("niah_singl_1")


def test_too_short_length_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="length too small"):
        TASKS.get("niah_multivalue")(tokenizer, 100, 0, num_samples=1, haystack="noise")


@pytest.mark.parametrize(
    ("metric", "prediction", "answers", "expected"),
    [
        ("string_match_all", "it is 123 and 456", ["123", "456", "789"], 2 / 3),
        ("string_match_part", "Paris, France", ["London", "paris"], 1.0),
        ("exact", "The Answer.", ["answer"], 1.0),
        ("f1", "the red fox", ["a red dog"], 0.5),
    ],
)
def test_metrics(metric, prediction, answers, expected):
    assert score(metric, prediction, answers) == pytest.approx(expected)


def test_threads_can_be_followed_in_the_context(tokenizer):
    import json as _json

    for direction in ("forward", "backward"):
        [s] = TASKS.get("threading_single")(tokenizer, 1500, 2, num_samples=1, num_hops=3, direction=direction)
        body = tokenizer.decode(s.context_ids).replace("<bos>", "").strip().rstrip(",") + "}"
        records = _json.loads(body.replace(",\n}", "\n}").rstrip().rstrip(",") if body.endswith("}") else body)
        start = tokenizer.decode(s.question_ids).split("Starting from ")[1].split(",")[0]
        key, hops = start, 0
        while key in records:
            key, hops = records[key], hops + 1
        assert key == s.answers[0] and hops == 3


def test_scbench_turns_ask_different_things(tokenizer):
    [s] = TASKS.get("scbench_kv")(tokenizer, 1500, 1, num_samples=1, num_turns=3, num_needles=5)
    assert len(s.all_turns) == 3 and len({t.answers[0] for t in s.all_turns}) == 3
    with pytest.raises(ValueError, match="cannot exceed"):
        TASKS.get("scbench_kv")(tokenizer, 1500, 1, num_turns=6, num_needles=5)


def test_needle_samples_builds_exact_samples_from_what_a_task_decides(tokenizer, kjv):
    from contextlab.bench.tasks.base import Needles, encode, needle_samples

    def make(rng, depth):
        words = [f"needle{i}x{rng.randrange(1000)}" for i in range(3)]
        return Needles(
            ids=[encode(tokenizer, f" {w}.") for w in words],
            depths=[depth, 0.9, 0.1],
            question="Which words?",
            answers=words[:2],
            reported=[1, 0],
        )

    samples = needle_samples(tokenizer, kjv, make, task="t", length=700, seed=5, num_samples=3, params={"k": 1})
    assert [s.depth for s in samples] == [0.0, 0.5, 1.0]
    assert samples == needle_samples(tokenizer, kjv, make, task="t", length=700, seed=5, num_samples=3, params={"k": 1})
    for s in samples:
        assert len(s.context_ids) + len(s.question_ids) == s.length == 700
        assert s.target == " " + ", ".join(s.answers) and s.metric == "string_match_all" and s.task == "t"
        assert [tokenizer.decode(s.context_ids[a:b]).strip(" .") for a, b in s.needle_spans] == s.answers[::-1]
    samples[0].params["k"] = 2
    assert samples[1].params == {"k": 1}  # each sample owns its params


def test_a_sample_may_bring_its_own_filler(tokenizer):
    import numpy as np

    from contextlab.bench.tasks.base import Needles, needle_sample

    class Dots:
        def filler(self, n_tokens, rng):
            return np.full(n_tokens, tokenizer.convert_tokens_to_ids("."), dtype=np.int64), np.zeros(1, np.int64)

    needles = Needles(ids=[[1, 2]], depths=[0.5], question="Q?", answers=["a"], target=" A", haystack=Dots())
    s = needle_sample(tokenizer, None, needles, task="t", length=200, seed=0, depth=0.5, rng=random.Random(0))
    assert s.target == " A" and s.length == 200
    assert set(s.context_ids) - {1, 2} <= {tokenizer.convert_tokens_to_ids("."), *tokenizer.all_special_ids}
