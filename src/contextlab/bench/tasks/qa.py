"""RULER's QA kinds: over generated facts by default, over local SQuAD / HotpotQA files when given.

``qa_1`` is single-hop: one gold fact among distractor facts of the same shape, or (``dataset_file=`` a
SQuAD JSON) the gold paragraph among other paragraphs. ``qa_2`` is two-hop: the answer needs two facts at
different depths (HotpotQA's bridge questions), or (``dataset_file=`` a HotpotQA JSON) the gold paragraphs
among other questions' paragraphs. Documents are numbered ("Document 3: ...") as in RULER.
"""

from __future__ import annotations

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
from contextlab.bench.tasks.datasets import read_json
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
    dataset_file: str | None = None,
) -> list[Sample]:
    """``{person} lives in the town of {town}.`` facts; the question asks for one person's town."""
    if dataset_file:
        return _document_qa(tokenizer, length, seed, "qa_1", _squad_items(dataset_file), num_samples, depths)

    def make(rng: random.Random, depth: float) -> Needles:
        people = distinct(_person, rng, num_distractors + 1)
        towns = [invented_name(rng, 3) for _ in people]
        return Needles(
            ids=[encode(tokenizer, f" {p} lives in the town of {t}.") for p, t in zip(people, towns, strict=True)],
            depths=[depth] + [rng.random() for _ in people[1:]],
            question=f"In which town does {people[0]} live?",
            answers=[towns[0]],
            metric="string_match_part",
            reported=[0],
        )

    return needle_samples(
        tokenizer,
        haystack,
        make,
        task="qa_1",
        length=length,
        seed=seed,
        num_samples=num_samples,
        depths=depths,
        random_depths=random_depths,
    )


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
    dataset_file: str | None = None,
) -> list[Sample]:
    """``{person} is a member of the {guild} guild.`` + ``The {guild} guild gathers in {town}.``; the
    question asks where the person's guild gathers."""
    if dataset_file:
        return _document_qa(tokenizer, length, seed, "qa_2", _hotpot_items(dataset_file), num_samples, depths)

    def make(rng: random.Random, depth: float) -> Needles:
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
        return Needles(
            ids=needles,
            depths=needle_depths,
            question=f"In which town does the guild of {people[0]} gather?",
            answers=[towns[0]],
            metric="string_match_part",
            reported=[0, 1],
        )

    return needle_samples(
        tokenizer,
        haystack,
        make,
        task="qa_2",
        length=length,
        seed=seed,
        num_samples=num_samples,
        depths=depths,
        random_depths=random_depths,
    )


def _squad_items(path: str) -> list[tuple[str, list[str], list[str]]]:
    """(question, answers, gold paragraphs) of a SQuAD v1/v2 JSON file (unanswerable questions skipped)."""
    data = read_json(path)
    if not isinstance(data, dict) or "data" not in data:
        raise ValueError(f"{path}: not a SQuAD file (expected a top-level 'data' list)")
    items = []
    for article in data["data"]:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = [a["text"] for a in qa.get("answers", [])]
                if answers and not qa.get("is_impossible", False):
                    items.append((qa["question"], answers, [paragraph["context"]]))
    return items


def _hotpot_items(path: str) -> list[tuple[str, list[str], list[str]]]:
    """(question, answers, gold paragraphs) of a HotpotQA JSON file (gold = the supporting titles)."""
    data = read_json(path)
    if not isinstance(data, list) or (data and "supporting_facts" not in data[0]):
        raise ValueError(f"{path}: not a HotpotQA file (expected a list of records with 'supporting_facts')")
    items = []
    for record in data:
        gold_titles = {title for title, _ in record["supporting_facts"]}
        paragraphs = {title: " ".join(sentences) for title, sentences in record["context"]}
        gold = [paragraphs[t] for t in gold_titles if t in paragraphs]
        if gold:
            items.append((record["question"], [record["answer"]], gold))
    return items


def _document_qa(tokenizer, length, seed, task, items, num_samples, depths) -> list[Sample]:
    """Gold paragraphs at the sample's depth among distractor paragraphs (other questions' gold ones),
    numbered as documents, filled to exactly ``length`` tokens."""
    if not items:
        raise ValueError("the dataset file holds no answerable questions")
    rng = random.Random(seed)
    pool = [p for _, _, gold in items for p in gold]
    samples = []
    for depth, index in zip(
        depth_grid(num_samples, depths, None), rng.sample(range(len(items)), min(num_samples, len(items))), strict=False
    ):
        question, answers, gold = items[index]
        q_ids = question_ids(tokenizer, question)
        room = length - len(q_ids) - len(prefix_ids(tokenizer))
        docs = [d for d in rng.sample(pool, len(pool)) if d not in gold]
        overhead = len(encode(tokenizer, f"Document {len(pool) + 1}:\n\n\n"))  # numbering, an upper bound
        chosen, used = [], sum(len(encode(tokenizer, g)) + overhead for g in gold)
        if used > room:
            continue  # the gold paragraphs alone do not fit this length
        for d in docs:
            cost = len(encode(tokenizer, d)) + overhead
            if used + cost > room:
                break
            chosen.append(d)
            used += cost
        at = round(depth * len(chosen))
        ordered = chosen[:at] + list(gold) + chosen[at:]
        items_ids = [encode(tokenizer, f"Document {i + 1}:\n{d}\n\n") for i, d in enumerate(ordered)]
        context, _ = pack_items(tokenizer, length - len(q_ids), items_ids)
        samples.append(
            Sample(
                task=task,
                context_ids=context,
                question_ids=q_ids,
                answers=answers,
                metric="string_match_part",
                target=" " + answers[0],
                length=length,
                seed=seed,
                depth=depth,
                params={"source": "dataset"},
            )
        )
    if not samples:
        raise ValueError(f"no question's gold paragraphs fit in {length} tokens")
    return samples
