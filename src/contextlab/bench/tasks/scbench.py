"""Shared-context tasks in the spirit of SCBench (Li et al., 2024, "SCBench: A KV Cache-Centric Analysis of
Long-Context Methods"): one context, several questions asked one after another on the same cache.

- ``scbench_kv``: string retrieval: many key -> number needles; every turn asks a different key.
- ``scbench_multitask``: turns cycle through needle retrieval, variable tracking and a fact question.
Turn 1 decides what question-aware eviction keeps; later turns show what it threw away.
"""

from __future__ import annotations

import random

from contextlab.bench.tasks.base import Needles, Sample, Turn, encode, needle_samples, question_ids
from contextlab.bench.tasks.ruler import needle_text, niah_question
from contextlab.bench.tasks.text import (
    TokenizedHaystack,
    distinct,
    invented_name,
    number_value,
    variable_name,
    word_key,
)

Asked = tuple[str, list[str], str]  # question, answers, metric


def scbench_kv(
    tokenizer,
    length: int,
    seed: int,
    *,
    num_samples: int = 10,
    num_turns: int = 4,
    num_needles: int = 8,
    haystack: str | TokenizedHaystack = "kjv",
    depths: list[float] | None = None,
) -> list[Sample]:
    if num_turns > num_needles:
        raise ValueError(f"num_turns ({num_turns}) cannot exceed num_needles ({num_needles})")

    def make(rng: random.Random, depth: float) -> Needles:
        keys = distinct(word_key, rng, num_needles)
        values = [number_value(rng) for _ in keys]
        needles = [encode(tokenizer, " " + needle_text(k, v, "number")) for k, v in zip(keys, values, strict=True)]
        asked = [(niah_question([keys[i]], "number", 1), [values[i]], "string_match_all") for i in range(num_turns)]
        return _shared(tokenizer, needles, depth, rng, asked)

    return needle_samples(
        tokenizer,
        haystack,
        make,
        task="scbench_kv",
        length=length,
        seed=seed,
        num_samples=num_samples,
        depths=depths,
        params={"num_turns": num_turns},
    )


def scbench_multitask(
    tokenizer,
    length: int,
    seed: int,
    *,
    num_samples: int = 10,
    num_turns: int = 3,
    haystack: str | TokenizedHaystack = "kjv",
    depths: list[float] | None = None,
) -> list[Sample]:
    def make(rng: random.Random, depth: float) -> Needles:
        key, value = word_key(rng), number_value(rng)
        chain = distinct(variable_name, rng, 3)
        start = number_value(rng, 5)
        person, town = f"{invented_name(rng)} {invented_name(rng, 3)}", invented_name(rng, 3)
        texts = [
            needle_text(key, value, "number"),
            f"VAR {chain[0]} = {start}.",
            f"VAR {chain[1]} = VAR {chain[0]}.",
            f"VAR {chain[2]} = VAR {chain[1]}.",
            f"{person} lives in the town of {town}.",
        ]
        kinds = [
            (niah_question([key], "number", 1), [value], "string_match_all"),
            (f"Find all variables that are assigned the value {start} in the text above.", chain, "string_match_all"),
            (f"In which town does {person} live?", [town], "string_match_part"),
        ]
        asked = [kinds[i % len(kinds)] for i in range(num_turns)]
        return _shared(tokenizer, [encode(tokenizer, " " + t) for t in texts], depth, rng, asked)

    return needle_samples(
        tokenizer,
        haystack,
        make,
        task="scbench_multitask",
        length=length,
        seed=seed,
        num_samples=num_samples,
        depths=depths,
        params={"num_turns": num_turns},
    )


def _shared(tokenizer, needles: list[list[int]], depth: float, rng: random.Random, asked: list[Asked]) -> Needles:
    """The first needle at ``depth``, the others at random depths; the first question asked with the context,
    the others as later turns."""
    (question, answers, metric), later = asked[0], asked[1:]
    return Needles(
        ids=needles,
        depths=[depth] + [rng.random() for _ in needles[1:]],
        question=question,
        answers=answers,
        metric=metric,
        turns=[Turn(question_ids(tokenizer, q), a, m, " " + ", ".join(a)) for q, a, m in later],
    )
