"""Shared-context tasks in the spirit of SCBench (Li et al., 2024, "SCBench: A KV Cache-Centric Analysis of
Long-Context Methods"): one context, several questions asked one after another on the same cache.

- ``scbench_kv``: string retrieval: many key -> number needles; every turn asks a different key.
- ``scbench_multitask``: turns cycle through needle retrieval, variable tracking and a fact question.
Turn 1 decides what question-aware eviction keeps; later turns show what it threw away.
"""

from __future__ import annotations

import random

from contextlab.bench.tasks.base import Sample, Turn, build_context, depth_grid, encode, question_ids
from contextlab.bench.tasks.ruler import needle_text, niah_question, resolve_haystack
from contextlab.bench.tasks.text import (
    TokenizedHaystack,
    distinct,
    invented_name,
    number_value,
    variable_name,
    word_key,
)


def _turn(tokenizer, question: str, answers: list[str], metric: str = "string_match_all") -> Turn:
    return Turn(question_ids(tokenizer, question), answers, metric, " " + ", ".join(answers))


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
    hay = resolve_haystack(tokenizer, haystack)
    rng = random.Random(seed)
    samples = []
    for depth in depth_grid(num_samples, depths, None):
        keys = distinct(word_key, rng, num_needles)
        values = [number_value(rng) for _ in keys]
        needles = [encode(tokenizer, " " + needle_text(k, v, "number")) for k, v in zip(keys, values, strict=True)]
        turns = [_turn(tokenizer, niah_question([keys[i]], "number", 1), [values[i]]) for i in range(num_turns)]
        samples.append(_shared(tokenizer, hay, length, seed, depth, rng, "scbench_kv", needles, turns))
    return samples


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
    hay = resolve_haystack(tokenizer, haystack)
    rng = random.Random(seed)
    samples = []
    for depth in depth_grid(num_samples, depths, None):
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
        needles = [encode(tokenizer, " " + t) for t in texts]
        kinds = [
            _turn(tokenizer, niah_question([key], "number", 1), [value]),
            _turn(tokenizer, f"Find all variables that are assigned the value {start} in the text above.", chain),
            _turn(tokenizer, f"In which town does {person} live?", [town], "string_match_part"),
        ]
        turns = [kinds[i % len(kinds)] for i in range(num_turns)]
        samples.append(_shared(tokenizer, hay, length, seed, depth, rng, "scbench_multitask", needles, turns))
    return samples


def _shared(tokenizer, hay, length, seed, depth, rng, task, needles, turns) -> Sample:
    """Context of ``length - len(first question)`` tokens; the first needle at ``depth``."""
    first = turns[0]
    needle_depths = [depth] + [rng.random() for _ in needles[1:]]
    context, spans = build_context(tokenizer, hay, length - len(first.question_ids), needles, needle_depths, rng)
    return Sample(
        task=task,
        context_ids=context,
        question_ids=first.question_ids,
        answers=first.answers,
        metric=first.metric,
        target=first.target,
        length=length,
        seed=seed,
        depth=depth,
        needle_spans=spans,
        turns=turns[1:],
        params={"num_turns": len(turns)},
    )
