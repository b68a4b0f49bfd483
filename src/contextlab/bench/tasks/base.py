"""The sample type every task produces, and the context builder that makes lengths exact.

A task generator has the signature ``generator(tokenizer, length, seed, **params) -> list[Sample]``.
``length`` is the number of prompt tokens in the model's own tokenizer: ``len(context_ids) +
len(question_ids) == length`` exactly. Needles go in at sentence starts nearest to the requested depth.
A needle task only decides each sample's :class:`Needles`; :func:`needle_samples` does the rest.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from contextlab.bench.metrics import METRIC_FUNCTIONS
from contextlab.bench.tasks.haystack import resolve_haystack
from contextlab.bench.tasks.text import TokenizedHaystack
from contextlab.chat import chat_frame, encode, prefix_ids


class Filler(Protocol):
    """Where filler tokens come from (a :class:`TokenizedHaystack`, or a sample's own distractors)."""

    def filler(self, n_tokens: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        """``n_tokens`` ids [n_tokens] and the sentence starts inside them [num_starts]."""
        ...


@dataclass(frozen=True)
class Turn:
    """A question asked after the first one on the same context (shared-context tasks)."""

    question_ids: list[int]
    answers: list[str]
    metric: str
    target: str


@dataclass(frozen=True)
class Sample:
    """One prompt with its reference answers and scoring rule.

    ``needle_spans`` are ``(start, end)`` token offsets of each inserted needle inside ``context_ids``;
    ``depth`` is the relative position of the first needle (0 = start of context, 1 = end).
    ``target`` is the canonical answer text a model should produce (used for training and for display).
    """

    task: str
    context_ids: list[int]
    question_ids: list[int]
    answers: list[str]
    metric: str
    target: str
    length: int
    seed: int
    depth: float | None = None
    needle_spans: list[tuple[int, int]] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    turns: list[Turn] = field(default_factory=list)

    @property
    def all_turns(self) -> list[Turn]:
        """The first question and every later one, in order."""
        return [Turn(self.question_ids, self.answers, self.metric, self.target), *self.turns]

    def __post_init__(self) -> None:
        if self.metric not in METRIC_FUNCTIONS:
            raise ValueError(f"unknown metric {self.metric!r}; known: {sorted(METRIC_FUNCTIONS)}")
        if len(self.context_ids) + len(self.question_ids) != self.length:
            raise ValueError(
                f"sample of task {self.task!r} has {len(self.context_ids) + len(self.question_ids)} tokens, "
                f"expected exactly {self.length}"
            )


def question_ids(tokenizer, question: str, answer_prefix: str = "Answer:") -> list[int]:
    """The question block that follows the context; the model answers right after it. For a chat model the
    block closes the user turn and opens the assistant's, which starts with ``answer_prefix`` (RULER's
    practice for chat models)."""
    frame = chat_frame(tokenizer)
    if frame is None:
        return encode(tokenizer, f"\n\nQuestion: {question}\n{answer_prefix}")
    return encode(tokenizer, f"\n\nQuestion: {question}") + list(frame.tail) + encode(tokenizer, answer_prefix)


def depth_grid(num_samples: int, depths: Sequence[float] | None, rng: random.Random | None) -> list[float]:
    """Needle depths: the given list cycled, a random draw per sample if ``rng`` is given, else an even
    sweep from 0 to 1."""
    if depths:
        bad = [d for d in depths if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"depths must lie in [0, 1], got {bad}")
        return [float(depths[i % len(depths)]) for i in range(num_samples)]
    if rng is not None:
        return [rng.random() for _ in range(num_samples)]
    if num_samples == 1:
        return [0.5]
    return [i / (num_samples - 1) for i in range(num_samples)]


def build_context(
    tokenizer,
    haystack: Filler,
    n_tokens: int,
    needles: Sequence[list[int]],
    depths: Sequence[float],
    rng: random.Random,
) -> tuple[list[int], list[tuple[int, int]]]:
    """A context of exactly ``n_tokens`` tokens: prefix (BOS), filler, and each needle at its depth.

    Returns the ids and each needle's ``(start, end)`` span, in the order the needles were given.
    """
    prefix = prefix_ids(tokenizer)
    n_filler = n_tokens - len(prefix) - sum(len(n) for n in needles)
    if n_filler < 0:
        raise ValueError(
            f"length too small: the needles and question alone need {n_tokens - n_filler} tokens, "
            f"{n_tokens} were left for the context"
        )
    filler, starts = haystack.filler(n_filler, rng)
    order = sorted(range(len(needles)), key=lambda i: depths[i])
    cut_points = [_nearest_cut(starts, depths[i] * n_filler, n_filler) for i in order]
    pieces: list[np.ndarray] = []
    spans: dict[int, tuple[int, int]] = {}
    cursor, length = 0, len(prefix)
    for i, cut in zip(order, cut_points, strict=True):
        pieces.append(filler[cursor:cut])
        length += cut - cursor
        pieces.append(np.asarray(needles[i], dtype=np.int64))
        spans[i] = (length, length + len(needles[i]))
        length += len(needles[i])
        cursor = cut
    pieces.append(filler[cursor:])
    ids = prefix + np.concatenate(pieces).tolist() if pieces else prefix
    return ids, [spans[i] for i in range(len(needles))]


def _nearest_cut(starts: np.ndarray, target: float, n_filler: int) -> int:
    """The sentence start (or the very end of the filler) closest to ``target``."""
    candidates = np.append(starts, n_filler)
    return int(candidates[int(np.abs(candidates - target).argmin())])


def pack_items(tokenizer, n_tokens: int, items: Sequence[list[int]]) -> tuple[list[int], int]:
    """Prefix (BOS) + as many whole items as fit in ``n_tokens``, padded to exactly ``n_tokens`` with newline
    tokens; returns the ids and how many items fit."""
    ids = prefix_ids(tokenizer)
    count = 0
    for item in items:
        if len(ids) + len(item) > n_tokens:
            break
        ids.extend(item)
        count += 1
    newline = encode(tokenizer, "\n")[-1:]
    return ids + newline * (n_tokens - len(ids)), count


@dataclass(frozen=True)
class Needles:
    """What a needle task decides for one sample: the needles, where they go, and what is asked about them."""

    ids: list[list[int]]  # each needle's tokens
    depths: list[float]  # each needle's relative depth in the context (0 = start, 1 = end)
    question: str
    answers: list[str]
    metric: str = "string_match_all"
    target: str | None = None  # what a model should answer; default: the answers joined by ", "
    reported: list[int] | None = None  # needles whose spans the sample records, asked ones first; default all
    haystack: Filler | None = None  # this sample's own filler (RULER's distractor needles); default the task's
    turns: list[Turn] = field(default_factory=list)  # later questions on the same context


def needle_sample(
    tokenizer,
    haystack: Filler | None,
    needles: Needles,
    *,
    task: str,
    length: int,
    seed: int,
    depth: float,
    rng: random.Random,
    params: dict | None = None,
) -> Sample:
    """A sample of exactly ``length`` tokens: ``needles`` at their depths in filler from ``haystack`` (or the
    needles' own), then the question block."""
    q_ids = question_ids(tokenizer, needles.question)
    hay = needles.haystack if needles.haystack is not None else haystack
    context, spans = build_context(tokenizer, hay, length - len(q_ids), needles.ids, needles.depths, rng)
    return Sample(
        task=task,
        context_ids=context,
        question_ids=q_ids,
        answers=needles.answers,
        metric=needles.metric,
        target=" " + ", ".join(needles.answers) if needles.target is None else needles.target,
        length=length,
        seed=seed,
        depth=depth,
        needle_spans=spans if needles.reported is None else [spans[i] for i in needles.reported],
        params=dict(params or {}),
        turns=list(needles.turns),
    )


def needle_samples(
    tokenizer,
    haystack: str | TokenizedHaystack | None,
    make: Callable[[random.Random, float], Needles],
    *,
    task: str,
    length: int,
    seed: int,
    num_samples: int,
    depths: Sequence[float] | None = None,
    random_depths: bool = False,
    params: dict | None = None,
) -> list[Sample]:
    """``num_samples`` samples of a needle task: ``make(rng, depth)`` decides each sample's needles, at depths
    from :func:`depth_grid`. One random stream seeded by ``seed`` runs through every sample in order (depths,
    then each sample's needles and filler), so a seed gives the same samples everywhere."""
    hay = None if haystack is None else resolve_haystack(tokenizer, haystack)
    rng = random.Random(seed)
    grid = depth_grid(num_samples, depths, rng if random_depths else None)
    return [
        needle_sample(
            tokenizer, hay, make(rng, depth), task=task, length=length, seed=seed, depth=depth, rng=rng, params=params
        )
        for depth in grid
    ]
