"""Scoring rules a sample can carry (RULER's string matches; SQuAD-style exact match and token F1)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Fraction of the reference answers that occur in the prediction (case-insensitive), as in RULER."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """1 if any reference answer occurs in the prediction (case-insensitive), as in RULER's QA tasks."""
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


def normalise_answer(text: str) -> str:
    """Lower-case, drop punctuation, articles and extra whitespace (the SQuAD normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact(prediction: str, answers: list[str]) -> float:
    return float(any(normalise_answer(prediction) == normalise_answer(a) for a in answers))


def f1(prediction: str, answers: list[str]) -> float:
    """Best token-level F1 against any reference (SQuAD / LongBench QA-F1)."""
    return max(_f1(normalise_answer(prediction).split(), normalise_answer(a).split()) for a in answers)


def _f1(pred: list[str], ref: list[str]) -> float:
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


METRIC_FUNCTIONS: dict[str, Callable[[str, list[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "exact": exact,
    "f1": f1,
}


def score(metric: str, prediction: str, answers: list[str]) -> float:
    if metric not in METRIC_FUNCTIONS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRIC_FUNCTIONS)}")
    if not answers:
        raise ValueError("a sample needs at least one reference answer")
    return METRIC_FUNCTIONS[metric](prediction, answers)
