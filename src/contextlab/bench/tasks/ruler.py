"""RULER's 13 synthetic task kinds, written from the task definitions in the RULER paper
("RULER: What's the Real Context Size of Your Long-Context Language Models?", Hsieh et al., 2024).

Retrieval (NIAH): single 1/2/3, multikey 1/2/3, multivalue, multiquery. Multi-hop tracing: variable
tracking. Aggregation: common-words and frequent-words extraction. QA: single-hop and two-hop questions
over generated facts (``qa_1``, ``qa_2``). The wording of needles and questions is ours.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import numpy as np

from contextlab.bench.tasks.base import (
    Needles,
    Sample,
    encode,
    needle_samples,
    pack_items,
    question_ids,
)
from contextlab.bench.tasks.haystack import resolve_haystack  # noqa: F401  (its former home; still importable)
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
    return needle_samples(
        tokenizer,
        None if spec.needle_haystack else haystack or spec.haystack,
        lambda rng, depth: _niah_needles(tokenizer, spec, depth, rng),
        task=task,
        length=length,
        seed=seed,
        num_samples=num_samples,
        depths=depths,
        random_depths=random_depths,
        params={"num_keys": spec.num_keys, "num_values": spec.num_values, "num_queries": spec.num_queries},
    )


def _niah_needles(tokenizer, spec: NeedleSpec, depth: float, rng: random.Random) -> Needles:
    keys = distinct(lambda r: _make(spec.key_kind, r), rng, spec.num_keys)
    asked = keys[: spec.num_queries] if spec.num_queries > 1 else [keys[0]]
    values = {k: [_make(spec.value_kind, rng) for _ in range(spec.num_values if k == keys[0] else 1)] for k in keys}
    texts = [(k, v) for k in keys for v in values[k]]
    rng.shuffle(texts)
    # The first asked needle sits at `depth`; the others are spread at random depths.
    first = next(i for i, (k, _) in enumerate(texts) if k == asked[0])
    return Needles(
        ids=[encode(tokenizer, " " + needle_text(k, v, spec.value_kind)) for k, v in texts],
        depths=[depth if i == first else rng.random() for i in range(len(texts))],
        question=niah_question(asked, spec.value_kind, spec.num_values),
        answers=[v for k in asked for v in values[k]],
        reported=[first, *(i for i in range(len(texts)) if i != first)],
        haystack=_DistractorNeedles(tokenizer, spec, set(keys)) if spec.needle_haystack else None,
    )


class _DistractorNeedles:
    """RULER's multikey 2/3 filler: needles with keys other than ``used_keys``, drawn for one sample."""

    def __init__(self, tokenizer, spec: NeedleSpec, used_keys: set[str]) -> None:
        self.tokenizer, self.spec, self.used_keys = tokenizer, spec, used_keys

    def filler(self, n_tokens: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        kind = self.spec.value_kind
        ids: list[int] = []
        starts: list[int] = []
        while len(ids) < n_tokens:
            key = distinct(lambda r: _make(self.spec.key_kind, r), rng, 1, avoid=self.used_keys)[0]
            self.used_keys.add(key)
            starts.append(len(ids))
            ids += encode(self.tokenizer, " " + needle_text(key, _make(kind, rng), kind))[: n_tokens - len(ids)]
        return np.asarray(ids, dtype=np.int64), np.asarray(starts or [0], dtype=np.int64)


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

    def make(rng: random.Random, depth: float) -> Needles:
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
        return Needles(
            ids=needles,
            depths=needle_depths,
            question=f"Find all variables that are assigned the value {values[0]} in the text above.",
            answers=list(chains[0]),
            target=" " + " ".join(chains[0]),
            reported=list(range(num_hops + 1)),
        )

    return needle_samples(
        tokenizer,
        haystack,
        make,
        task="vt",
        length=length,
        seed=seed,
        num_samples=num_samples,
        depths=depths,
        random_depths=random_depths,
        params={"num_chains": num_chains, "num_hops": num_hops},
    )


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
