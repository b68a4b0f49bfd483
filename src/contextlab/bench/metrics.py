"""Scoring rules a sample can carry (RULER's string matches; SQuAD-style exact match and token F1)."""

from __future__ import annotations

import difflib
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


def _words(text: str, chars: bool) -> list[str]:
    norm = normalise_answer(text) if not chars else "".join(text.split())
    return list(norm) if chars else norm.split()


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, answers: list[str], chars: bool = False) -> float:
    """Best ROUGE-L F1 (longest common subsequence of words) against any reference (LongBench's
    summarisation metric); ``chars`` compares characters, for Chinese."""
    best = 0.0
    pred = _words(prediction, chars)
    for answer in answers:
        ref = _words(answer, chars)
        lcs = _lcs(pred, ref) if pred and ref else 0
        if lcs:
            precision, recall = lcs / len(pred), lcs / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def f1_chars(prediction: str, answers: list[str]) -> float:
    """Token F1 over characters (LongBench's Chinese QA metric, without a word segmenter)."""
    return max(_f1(_words(prediction, True), _words(a, True)) for a in answers)


def code_similarity(prediction: str, answers: list[str]) -> float:
    """LongBench's code metric: similarity of the first line of code in the prediction to the reference."""
    lines = [
        ln for ln in prediction.lstrip("\n").split("\n") if ln.strip() and not ln.lstrip().startswith(("`", "#", "//"))
    ]
    first = lines[0] if lines else ""
    return max(difflib.SequenceMatcher(None, first, a).ratio() for a in answers)


def number_match(prediction: str, answers: list[str]) -> float:
    """Share of the numbers in the reference (e.g. "Paragraph 12") that the prediction names first."""
    found = re.findall(r"\d+", prediction)
    wanted = [n for a in answers for n in re.findall(r"\d+", a)]
    return float(bool(found) and bool(wanted) and found[0] in wanted)


def choice(prediction: str, answers: list[str]) -> float:
    """Multiple choice: the first stand-alone letter A-J in the prediction equals the reference letter."""
    match = re.search(r"\b([A-J])\b", prediction.strip())
    return float(bool(match) and match.group(1) in [a.strip().upper() for a in answers])


METRIC_FUNCTIONS: dict[str, Callable[[str, list[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "exact": exact,
    "f1": f1,
    "f1_chars": f1_chars,
    "rouge_l": rouge_l,
    "rouge_l_chars": lambda p, a: rouge_l(p, a, chars=True),
    "code_sim": code_similarity,
    "number_match": number_match,
    "choice": choice,
}


def score(metric: str, prediction: str, answers: list[str]) -> float:
    if metric not in METRIC_FUNCTIONS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRIC_FUNCTIONS)}")
    if not answers:
        raise ValueError("a sample needs at least one reference answer")
    return METRIC_FUNCTIONS[metric](prediction, answers)
