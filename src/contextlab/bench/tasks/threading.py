"""Key-value haystacks: Needle Threading (Roberts et al., 2024, "Needle Threading: Can LLMs Follow Threads
through Near-Million-Scale Haystacks?") and Lost in the Middle's key-value retrieval (Liu et al., 2023).

The context is a list of ``"key": "value"`` UUID records (nothing else), filled to the exact length.
- ``threading_single``: a thread of ``num_hops`` records where each value is the next record's key; asked for
  the value at the end of the thread. ``direction``: "forward" (thread records in reading order),
  "backward" (reverse order) or "random".
- ``threading_multi``: ``num_threads`` threads asked together (accuracy = fraction of threads followed).
- ``litm_kv``: Lost in the Middle's retrieval: one key asked, the gold record at the sample's depth.
"""

from __future__ import annotations

import itertools
import random

from contextlab.bench.tasks.base import Sample, depth_grid, encode, pack_items, prefix_ids, question_ids
from contextlab.bench.tasks.text import uuid_value

DIRECTIONS = ("forward", "backward", "random")


def _record(tokenizer, key: str, value: str) -> list[int]:
    return encode(tokenizer, f'\n"{key}": "{value}",')


def _filler_records(tokenizer, rng: random.Random, budget: int) -> list[list[int]]:
    per = len(_record(tokenizer, uuid_value(rng), uuid_value(rng)))
    return [_record(tokenizer, uuid_value(rng), uuid_value(rng)) for _ in range(max(0, budget // per))]


def _threads(rng: random.Random, num_threads: int, num_hops: int) -> list[list[str]]:
    return [[uuid_value(rng) for _ in range(num_hops + 1)] for _ in range(num_threads)]


def _place(records: list[list[int]], thread_records: list[list[int]], depth: float, direction: str, rng) -> list:
    """Insert a thread's records into the filler from ``depth`` onwards, in the given order."""
    if direction == "backward":
        thread_records = thread_records[::-1]
    elif direction == "random":
        thread_records = rng.sample(thread_records, len(thread_records))
    start = round(depth * len(records))
    slots = sorted(rng.choices(range(start, len(records) + 1), k=len(thread_records)))
    out, last = [], 0
    for slot, rec in zip(slots, thread_records, strict=True):
        out += [*records[last:slot], rec]
        last = slot
    return out + records[last:]


def needle_threads(
    tokenizer,
    length: int,
    seed: int,
    *,
    num_samples: int = 10,
    num_threads: int = 1,
    num_hops: int = 3,
    direction: str = "forward",
    depths: list[float] | None = None,
    random_depths: bool = False,
) -> list[Sample]:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    rng = random.Random(seed)
    task = "threading_single" if num_threads == 1 else "threading_multi"
    samples = []
    for depth in depth_grid(num_samples, depths, rng if random_depths else None):
        threads = _threads(rng, num_threads, num_hops)
        starts = ", ".join(t[0] for t in threads)
        q_ids = question_ids(
            tokenizer,
            f"Each value above is also a key. Starting from {starts}, follow each thread from key to value until "
            "the value is no longer a key. What is the final value" + ("s" if num_threads > 1 else "") + "?",
        )
        thread_tokens = sum(len(_record(tokenizer, t[0], t[1])) * num_hops for t in threads)
        budget = length - len(q_ids) - len(prefix_ids(tokenizer)) - thread_tokens - len(encode(tokenizer, "\n{"))
        records = _filler_records(tokenizer, rng, budget)
        for t in threads:
            recs = [_record(tokenizer, a, b) for a, b in itertools.pairwise(t)]
            records = _place(records, recs, depth, direction, rng)
        context, n_fit = pack_items(tokenizer, length - len(q_ids), [encode(tokenizer, "\n{"), *records])
        if n_fit < len(records) + 1:
            raise ValueError(
                f"length too small for {num_threads} thread(s) of {num_hops} hops: need more than {length}"
            )
        answers = [t[-1] for t in threads]
        samples.append(
            Sample(
                task=task,
                context_ids=context,
                question_ids=q_ids,
                answers=answers,
                metric="string_match_all",
                target=" " + ", ".join(answers),
                length=length,
                seed=seed,
                depth=depth,
                params={"num_threads": num_threads, "num_hops": num_hops, "direction": direction},
            )
        )
    return samples


def litm_kv(
    tokenizer, length: int, seed: int, *, num_samples: int = 10, depths: list[float] | None = None
) -> list[Sample]:
    """Lost in the Middle key-value retrieval: the queried record sits at the sample's depth."""
    rng = random.Random(seed)
    samples = []
    for depth in depth_grid(num_samples, depths, None):
        key, value = uuid_value(rng), uuid_value(rng)
        q_ids = question_ids(tokenizer, f'What is the value of the key "{key}" in the JSON object above?')
        gold = _record(tokenizer, key, value)
        budget = length - len(q_ids) - len(prefix_ids(tokenizer)) - len(gold) - len(encode(tokenizer, "\n{"))
        records = _filler_records(tokenizer, rng, budget)
        index = round(depth * len(records))
        records = [encode(tokenizer, "\n{"), *records[:index], gold, *records[index:]]
        context, _ = pack_items(tokenizer, length - len(q_ids), records)
        samples.append(
            Sample(
                task="litm_kv",
                context_ids=context,
                question_ids=q_ids,
                answers=[value],
                metric="string_match_all",
                target=" " + value,
                length=length,
                seed=seed,
                depth=depth,
                params={"num_records": len(records) - 1},
            )
        )
    return samples
