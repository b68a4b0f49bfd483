"""Question answering over generated facts (RULER's QA kinds without the need for SQuAD/HotpotQA files).

``qa_1`` is single-hop: one gold fact among distractor facts of the same shape. ``qa_2`` is two-hop: the
answer needs two facts that sit at different depths (in the spirit of HotpotQA's bridge questions).
"""

from __future__ import annotations

import random

from contextlab.bench.tasks.base import Sample, build_context, depth_grid, encode, question_ids
from contextlab.bench.tasks.ruler import resolve_haystack
from contextlab.bench.tasks.text import TokenizedHaystack, distinct, invented_name


def _person(rng: random.Random) -> str:
    return f"{invented_name(rng)} {invented_name(rng, 3)}"


def qa_single_hop(
    tokenizer,
    length: int,
    seed: int,
    *,
    num_samples: int = 10,
    num_distractors: int = 8,
    haystack: str | TokenizedHaystack = "kjv",
    depths: list[float] | None = None,
    random_depths: bool = False,
) -> list[Sample]:
    """``{person} lives in the town of {town}.`` facts; the question asks for one person's town."""
    hay = resolve_haystack(tokenizer, haystack)
    rng = random.Random(seed)
    samples = []
    for depth in depth_grid(num_samples, depths, rng if random_depths else None):
        people = distinct(_person, rng, num_distractors + 1)
        towns = [invented_name(rng, 3) for _ in people]
        needles = [encode(tokenizer, f" {p} lives in the town of {t}.") for p, t in zip(people, towns, strict=True)]
        needle_depths = [depth] + [rng.random() for _ in people[1:]]
        q_ids = question_ids(tokenizer, f"In which town does {people[0]} live?")
        context, spans = build_context(tokenizer, hay, length - len(q_ids), needles, needle_depths, rng)
        samples.append(
            Sample(
                task="qa_1",
                context_ids=context,
                question_ids=q_ids,
                answers=[towns[0]],
                metric="string_match_part",
                target=" " + towns[0],
                length=length,
                seed=seed,
                depth=depth,
                needle_spans=spans[:1],
            )
        )
    return samples


def qa_two_hop(
    tokenizer,
    length: int,
    seed: int,
    *,
    num_samples: int = 10,
    num_distractors: int = 4,
    haystack: str | TokenizedHaystack = "kjv",
    depths: list[float] | None = None,
    random_depths: bool = False,
) -> list[Sample]:
    """``{person} is a member of the {guild} guild.`` + ``The {guild} guild gathers in {town}.``; the
    question asks where the person's guild gathers."""
    hay = resolve_haystack(tokenizer, haystack)
    rng = random.Random(seed)
    samples = []
    for depth in depth_grid(num_samples, depths, rng if random_depths else None):
        people = distinct(_person, rng, num_distractors + 1)
        guilds = distinct(invented_name, rng, len(people))
        towns = [invented_name(rng, 3) for _ in people]
        needles, needle_depths = [], []
        for i, (p, g, t) in enumerate(zip(people, guilds, towns, strict=True)):
            needles += [
                encode(tokenizer, f" {p} is a member of the {g} guild."),
                encode(tokenizer, f" The {g} guild gathers in the town of {t}."),
            ]
            needle_depths += [depth, rng.random()] if i == 0 else [rng.random(), rng.random()]
        q_ids = question_ids(tokenizer, f"In which town does the guild of {people[0]} gather?")
        context, spans = build_context(tokenizer, hay, length - len(q_ids), needles, needle_depths, rng)
        samples.append(
            Sample(
                task="qa_2",
                context_ids=context,
                question_ids=q_ids,
                answers=[towns[0]],
                metric="string_match_part",
                target=" " + towns[0],
                length=length,
                seed=seed,
                depth=depth,
                needle_spans=spans[:2],
            )
        )
    return samples
