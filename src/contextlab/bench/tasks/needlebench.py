"""NeedleBench's four task kinds (Li et al., 2024, "NeedleBench: Can LLMs Do Retrieval and Reasoning in
1 Million Context Window?"), from the task definitions in the paper and OpenCompass's docs; wording ours.

- ``needlebench_single``: single-needle retrieval (S-RT).
- ``needlebench_multi_retrieval``: several needles, all asked at once (M-RT).
- ``needlebench_multi_reasoning``: needles that must be chained to answer (M-RS, a k-hop join).
- ``needlebench_atc``: the Ancestral Trace Challenge: shuffled kinship facts ("relational needles"),
  asked for the earliest ancestor; other families' facts fill the context instead of a haystack.
"""

from __future__ import annotations

import itertools
import random

from contextlab.bench.tasks.base import (
    Needles,
    Sample,
    depth_grid,
    encode,
    needle_samples,
    pack_items,
    prefix_ids,
    question_ids,
)
from contextlab.bench.tasks.text import TokenizedHaystack, distinct, invented_name

ITEMS = "lantern compass crown chalice mirror harp scroll amulet key shield".split()


def _place(rng: random.Random) -> str:
    return f"{invented_name(rng)} Island"


def _treasure(rng: random.Random) -> str:
    return f"{invented_name(rng, 3)} {rng.choice(ITEMS)}"


def needlebench_single(
    tokenizer,
    length: int,
    seed: int,
    *,
    num_samples: int = 10,
    haystack: str | TokenizedHaystack = "kjv",
    depths: list[float] | None = None,
    random_depths: bool = False,
) -> list[Sample]:
    """``The {treasure} is hidden on {place}.``; asked: what is hidden on the place."""
    return needlebench_multi_retrieval(
        tokenizer,
        length,
        seed,
        num_samples=num_samples,
        num_needles=1,
        haystack=haystack,
        depths=depths,
        random_depths=random_depths,
        task="needlebench_single",
    )


def needlebench_multi_retrieval(
    tokenizer,
    length: int,
    seed: int,
    *,
    num_samples: int = 10,
    num_needles: int = 5,
    haystack: str | TokenizedHaystack = "kjv",
    depths: list[float] | None = None,
    random_depths: bool = False,
    task: str = "needlebench_multi_retrieval",
) -> list[Sample]:
    """``num_needles`` treasures on different places, spread from the sample's depth to the end; all asked."""

    def make(rng: random.Random, depth: float) -> Needles:
        places = distinct(_place, rng, num_needles)
        treasures = distinct(_treasure, rng, num_needles)
        if num_needles == 1:
            question = f"What is hidden on {places[0]}?"
        else:
            question = f"For each of {', '.join(places)}, what is hidden there?"
        return Needles(
            ids=[encode(tokenizer, f" The {t} is hidden on {p}.") for p, t in zip(places, treasures, strict=True)],
            depths=[depth + (1 - depth) * i / num_needles for i in range(num_needles)],
            question=question,
            answers=treasures,
        )

    return needle_samples(
        tokenizer,
        haystack,
        make,
        task=task,
        length=length,
        seed=seed,
        num_samples=num_samples,
        depths=depths,
        random_depths=random_depths,
        params={"num_needles": num_needles},
    )


def needlebench_multi_reasoning(
    tokenizer,
    length: int,
    seed: int,
    *,
    num_samples: int = 10,
    num_hops: int = 3,
    haystack: str | TokenizedHaystack = "kjv",
    depths: list[float] | None = None,
    random_depths: bool = False,
) -> list[Sample]:
    """A chain ``{A} sent a letter to {B}.``, ``{B} sent a letter to {C}.`` ... placed in shuffled order;
    asked who received the letter after ``num_hops`` forwards starting from A."""

    def make(rng: random.Random, depth: float) -> Needles:
        people = distinct(invented_name, rng, num_hops + 1)
        needles = [encode(tokenizer, f" {a} forwarded the letter to {b}.") for a, b in itertools.pairwise(people)]
        return Needles(
            ids=needles,
            depths=[depth] + [rng.random() for _ in needles[1:]],
            question=f"{people[0]} wrote a letter and it was forwarded as described. Who received it last?",
            answers=[people[-1]],
            metric="string_match_part",
        )

    return needle_samples(
        tokenizer,
        haystack,
        make,
        task="needlebench_multi_reasoning",
        length=length,
        seed=seed,
        num_samples=num_samples,
        depths=depths,
        random_depths=random_depths,
        params={"num_hops": num_hops},
    )


def ancestral_trace(
    tokenizer, length: int, seed: int, *, num_samples: int = 10, num_hops: int = 4, depths: list[float] | None = None
) -> list[Sample]:
    """ATC: ``{parent} is the parent of {child}.`` for a chain of ``num_hops`` generations, in shuffled order
    among other families' facts; asked for the earliest ancestor of the youngest member."""
    rng = random.Random(seed)
    samples = []
    for depth in depth_grid(num_samples, depths, None):
        chain = distinct(invented_name, rng, num_hops + 1)
        facts = [encode(tokenizer, f" {p} is the parent of {c}.") for p, c in itertools.pairwise(chain)]
        q_ids = question_ids(
            tokenizer, f"Following the parent relations above, who is the earliest ancestor of {chain[-1]}?"
        )
        room = length - len(q_ids) - len(prefix_ids(tokenizer)) - sum(len(f) for f in facts)
        if room < 0:
            raise ValueError(f"length too small: the {num_hops}-generation chain and question need {length - room}")
        items = _distractor_families(tokenizer, rng, room, set(chain))
        # The chain's facts go in at `depth` of the item list, shuffled among themselves.
        order = rng.sample(range(len(facts)), len(facts))
        cut = round(depth * len(items))
        placed = items[:cut] + [facts[i] for i in order] + items[cut:]
        context, _ = pack_items(tokenizer, length - len(q_ids), placed)
        samples.append(
            Sample(
                task="needlebench_atc",
                context_ids=context,
                question_ids=q_ids,
                answers=[chain[0]],
                metric="string_match_part",
                target=" " + chain[0],
                length=length,
                seed=seed,
                depth=depth,
                params={"num_hops": num_hops},
            )
        )
    return samples


def _distractor_families(tokenizer, rng: random.Random, room: int, used: set[str]) -> list[list[int]]:
    """Parent facts of other families, at most ``room`` tokens in all, shuffled."""
    items, total = [], 0
    while True:
        family = distinct(invented_name, rng, rng.randint(2, 4), avoid=used)
        used.update(family)
        facts = [encode(tokenizer, f" {p} is the parent of {c}.") for p, c in itertools.pairwise(family)]
        if total + sum(len(f) for f in facts) > room:
            break
        items += facts
        total += sum(len(f) for f in facts)
    rng.shuffle(items)
    return items
