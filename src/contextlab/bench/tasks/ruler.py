"""RULER's 13 synthetic task kinds, written from the task definitions in the RULER paper
("RULER: What's the Real Context Size of Your Long-Context Language Models?", Hsieh et al., 2024).

Retrieval (NIAH): single 1/2/3, multikey 1/2/3, multivalue, multiquery. Multi-hop tracing: variable
tracking. Aggregation: common-words and frequent-words extraction. QA: single-hop and two-hop questions
over generated facts (``qa_1``, ``qa_2``). The wording of needles and questions is ours.
"""

from __future__ import annotations

import random
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from contextlab.bench.tasks.base import (
    Sample,
    build_context,
    depth_grid,
    encode,
    pack_items,
    prefix_ids,
    question_ids,
)
from contextlab.bench.tasks.text import (
    ADJECTIVES,
    NOUNS,
    TokenizedHaystack,
    distinct,
    number_value,
    uuid_value,
    variable_name,
    word_key,
)

_HAYSTACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {source: TokenizedHaystack}


def resolve_haystack(tokenizer, haystack: str | TokenizedHaystack) -> TokenizedHaystack:
    """A tokenized haystack; named ones are tokenized once per tokenizer (a memo, not state: the result
    depends only on the tokenizer and the source, and dies with the tokenizer)."""
    if isinstance(haystack, TokenizedHaystack):
        return haystack
    per_tokenizer = _HAYSTACKS.setdefault(tokenizer, {})
    if haystack not in per_tokenizer or Path(haystack).exists():  # files may change: re-read them
        per_tokenizer[haystack] = TokenizedHaystack.build(tokenizer, haystack)
    return per_tokenizer[haystack]


@dataclass(frozen=True)
class NeedleSpec:
    """What a NIAH variant hides and asks (RULER Table 1 presets below)."""

    haystack: str = "kjv"
    key_kind: str = "word"  # "word" | "uuid"
    value_kind: str = "number"  # "number" | "uuid"
    num_keys: int = 1  # needles with distinct keys (one or more asked)
    num_values: int = 1  # values hidden under the asked key
    num_queries: int = 1  # keys asked in one question
    needle_haystack: bool = False  # the filler itself is made of distractor needles


NIAH_PRESETS = {
    "niah_single_1": NeedleSpec(haystack="noise"),
    "niah_single_2": NeedleSpec(),
    "niah_single_3": NeedleSpec(value_kind="uuid"),
    "niah_multikey_1": NeedleSpec(num_keys=4),
    "niah_multikey_2": NeedleSpec(needle_haystack=True),
    "niah_multikey_3": NeedleSpec(key_kind="uuid", value_kind="uuid", needle_haystack=True),
    "niah_multivalue": NeedleSpec(num_values=4),
    "niah_multiquery": NeedleSpec(num_keys=4, num_queries=4),
}


def needle_text(key: str, value: str, value_kind: str) -> str:
    kind = "numbers" if value_kind == "number" else "uuids"
    return f"One of the special magic {kind} for {key} is: {value}."


def niah_question(keys: list[str], value_kind: str, num_values: int) -> str:
    kind = "number" if value_kind == "number" else "uuid"
    if len(keys) == 1 and num_values == 1:
        return f"What is the special magic {kind} for {keys[0]} mentioned in the provided text?"
    names = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
    return f"What are all the special magic {kind}s for {names} mentioned in the provided text?"


def _make(kind: str, rng: random.Random) -> str:
    return {"word": word_key, "uuid": uuid_value, "number": number_value}[kind](rng)


def niah(
    tokenizer,
    length: int,
    seed: int,
    *,
    spec: NeedleSpec | str = "niah_single_2",
    num_samples: int = 10,
    depths: list[float] | None = None,
    random_depths: bool = False,
    haystack: str | TokenizedHaystack | None = None,
) -> list[Sample]:
    """Needle-in-a-haystack samples; ``spec`` is a :class:`NeedleSpec` or the name of a RULER preset."""
    task = spec if isinstance(spec, str) else "niah"
    spec = NIAH_PRESETS[spec] if isinstance(spec, str) else spec
    hay = None if spec.needle_haystack else resolve_haystack(tokenizer, haystack or spec.haystack)
    rng = random.Random(seed)
    grid = depth_grid(num_samples, depths, rng if random_depths else None)
    return [_niah_sample(tokenizer, length, seed, task, spec, hay, depth, rng) for depth in grid]


def _niah_sample(tokenizer, length, seed, task, spec, hay, depth, rng) -> Sample:
    keys = distinct(lambda r: _make(spec.key_kind, r), rng, spec.num_keys)
    asked = keys[: spec.num_queries] if spec.num_queries > 1 else [keys[0]]
    values = {k: [_make(spec.value_kind, rng) for _ in range(spec.num_values if k == keys[0] else 1)] for k in keys}
    texts = [(k, v) for k in keys for v in values[k]]
    rng.shuffle(texts)
    needles = [encode(tokenizer, " " + needle_text(k, v, spec.value_kind)) for k, v in texts]
    # The first asked needle sits at `depth`; the others are spread at random depths.
    first = next(i for i, (k, _) in enumerate(texts) if k == asked[0])
    needle_depths = [depth if i == first else rng.random() for i in range(len(texts))]
    q_ids = question_ids(tokenizer, niah_question(asked, spec.value_kind, spec.num_values))
    n_context = length - len(q_ids)
    if spec.needle_haystack:
        context, spans = _needle_filled_context(tokenizer, n_context, needles, needle_depths, spec, set(keys), rng)
    else:
        context, spans = build_context(tokenizer, hay, n_context, needles, needle_depths, rng)
    answers = [v for k in asked for v in values[k]]
    return Sample(
        task=task,
        context_ids=context,
        question_ids=q_ids,
        answers=answers,
        metric="string_match_all",
        target=" " + ", ".join(answers),
        length=length,
        seed=seed,
        depth=depth,
        needle_spans=[spans[first]] + [s for i, s in enumerate(spans) if i != first],
        params={"num_keys": spec.num_keys, "num_values": spec.num_values, "num_queries": spec.num_queries},
    )


def _needle_filled_context(tokenizer, n_tokens, needles, depths, spec, used_keys, rng):
    """RULER's multikey 2/3: the haystack is itself made of needles with other keys."""
    budget = n_tokens - len(prefix_ids(tokenizer)) - sum(len(n) for n in needles)
    distractors: list[list[int]] = []
    while budget > 0:
        key = distinct(lambda r: _make(spec.key_kind, r), rng, 1, avoid=used_keys)[0]
        used_keys.add(key)
        ids = encode(tokenizer, " " + needle_text(key, _make(spec.value_kind, rng), spec.value_kind))
        distractors.append(ids[:budget])
        budget -= len(distractors[-1])
    flat = [t for d in distractors for t in d]
    starts, offset = [], 0
    for d in distractors:
        starts.append(offset)
        offset += len(d)
    hay = TokenizedHaystack(source="needles", ids=_as_array(flat), starts=_as_array(starts or [0]))
    return build_context(tokenizer, _NoLoop(hay), n_tokens, needles, depths, rng)


class _NoLoop:
    """A haystack used exactly once from its start (the distractor needles built for one sample)."""

    def __init__(self, hay: TokenizedHaystack) -> None:
        self.hay = hay

    def filler(self, n_tokens: int, rng: random.Random):
        return self.hay.ids[:n_tokens], self.hay.starts[self.hay.starts < max(n_tokens, 1)]


def _as_array(values):
    import numpy as np

    return np.asarray(values, dtype=np.int64)


def variable_tracking(
    tokenizer,
    length: int,
    seed: int,
    *,
    num_samples: int = 10,
    num_chains: int = 1,
    num_hops: int = 4,
    haystack: str | TokenizedHaystack = "noise",
    depths: list[float] | None = None,
    random_depths: bool = False,
) -> list[Sample]:
    """Variable tracking: ``VAR A = 12345``, ``VAR B = VAR A``, ... (``num_hops`` assignments after the
    first); the question asks for every variable that ends up holding the first chain's value."""
    hay = resolve_haystack(tokenizer, haystack)
    rng = random.Random(seed)
    grid = depth_grid(num_samples, depths, rng if random_depths else None)
    samples = []
    for depth in grid:
        names = distinct(variable_name, rng, num_chains * (num_hops + 1))
        chains = [names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)] for c in range(num_chains)]
        values = distinct(lambda r: number_value(r, 5), rng, num_chains)
        needles, needle_depths = [], []
        for c, chain in enumerate(chains):
            start = depth if c == 0 else rng.random() * 0.5
            spread = (1.0 - start) / (num_hops + 1)
            for hop, name in enumerate(chain):
                rhs = values[c] if hop == 0 else f"VAR {chain[hop - 1]}"
                needles.append(encode(tokenizer, f" VAR {name} = {rhs}."))
                needle_depths.append(min(1.0, start + hop * spread))
        q_ids = question_ids(
            tokenizer, f"Find all variables that are assigned the value {values[0]} in the text above."
        )
        context, spans = build_context(tokenizer, hay, length - len(q_ids), needles, needle_depths, rng)
        samples.append(
            Sample(
                task="vt",
                context_ids=context,
                question_ids=q_ids,
                answers=list(chains[0]),
                metric="string_match_all",
                target=" " + " ".join(chains[0]),
                length=length,
                seed=seed,
                depth=depth,
                needle_spans=spans[: num_hops + 1],
                params={"num_chains": num_chains, "num_hops": num_hops},
            )
        )
    return samples


def common_words(
    tokenizer,
    length: int,
    seed: int,
    *,
    num_samples: int = 10,
    num_common: int = 10,
    freq_common: int = 30,
    freq_uncommon: int = 3,
) -> list[Sample]:
    """Common-words extraction (CWE): a numbered word list where ``num_common`` words appear
    ``freq_common`` times and all others ``freq_uncommon`` times; name the common ones."""
    pool = sorted(set(ADJECTIVES) | set(NOUNS))
    rng = random.Random(seed)
    q_ids = question_ids(tokenizer, f"What are the {num_common} most common words in the above list?")
    n_context = length - len(q_ids)
    capacity = max(1, n_context // len(encode(tokenizer, " 100. lantern")))
    # Lower the common frequency for short contexts so that the list still fits.
    freq = max(freq_uncommon + 2, min(freq_common, capacity // (2 * num_common)))
    samples = []
    for _ in range(num_samples):
        words = rng.sample(pool, len(pool))
        common, uncommon = words[:num_common], words[num_common:]
        n_uncommon = min(len(uncommon), max(0, (capacity - freq * num_common) // freq_uncommon))
        bag = common * freq + uncommon[:n_uncommon] * freq_uncommon
        rng.shuffle(bag)
        items = [encode(tokenizer, f" {i + 1}. {w}") for i, w in enumerate(bag)]
        context, n_fit = pack_items(tokenizer, n_context, items)
        top = [w for w, _ in Counter(bag[:n_fit]).most_common(num_common)]
        samples.append(
            Sample(
                task="cwe",
                context_ids=context,
                question_ids=q_ids,
                answers=top,
                metric="string_match_all",
                target=" " + ", ".join(top),
                length=length,
                seed=seed,
                params={"freq_common": freq},
            )
        )
    return samples


def frequent_words(
    tokenizer, length: int, seed: int, *, num_samples: int = 10, alpha: float = 2.0, vocab: int = 500
) -> list[Sample]:
    """Frequent-words extraction (FWE): coded words drawn from a Zipf(``alpha``) law; name the 3 most
    frequent ones."""
    rng = random.Random(seed)
    q_ids = question_ids(tokenizer, "What are the three most frequently appearing coded words in the above text?")
    weights = [1.0 / (rank**alpha) for rank in range(1, vocab + 1)]
    samples = []
    for _ in range(num_samples):
        codes = distinct(lambda r: "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)), rng, vocab)
        n_words = max(8, (length - len(q_ids)) // max(1, len(encode(tokenizer, " abcde"))))
        words = rng.choices(codes, weights=weights, k=n_words)
        items = [encode(tokenizer, " " + w) for w in words]
        context, n_fit = pack_items(tokenizer, length - len(q_ids), items)
        top = [w for w, _ in Counter(words[:n_fit]).most_common(3)]
        samples.append(
            Sample(
                task="fwe",
                context_ids=context,
                question_ids=q_ids,
                answers=top,
                metric="string_match_all",
                target=" " + ", ".join(top),
                length=length,
                seed=seed,
                params={"alpha": alpha},
            )
        )
    return samples
