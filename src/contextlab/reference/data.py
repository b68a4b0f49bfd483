"""Training data for the reference model: plain text plus long-context synthetic tasks.

Every training sequence is ``(input_ids, loss_mask)``. Plain text (the King James Bible, training split)
is trained on every token; task samples only on their answers (and the end-of-sequence token after each
answer). The tasks are the same generators the benchmark uses, so the model is trained in exactly the
prompt format it is evaluated in. To get more learning signal per long sequence, the "dense" multikey
kind asks several questions about the same context, one after another.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from contextlab.bench.tasks import TASKS
from contextlab.bench.tasks.base import build_context, encode, question_ids
from contextlab.bench.tasks.ruler import NeedleSpec, needle_text, niah, niah_question
from contextlab.bench.tasks.text import (
    TokenizedHaystack,
    distinct,
    kjv_text,
    number_value,
    split_sentences,
    uuid_value,
    word_key,
)
from contextlab.reference.tokenizer import BOS_ID, EOS_ID

HELDOUT_FRACTION = 0.05  # the last 5% of the KJV text (by lines) is never trained on; perplexity uses it


def kjv_split() -> tuple[str, str]:
    """(training text, held-out text) of the bundled KJV, split by line at 95%."""
    lines = kjv_text().splitlines()
    cut = int(len(lines) * (1 - HELDOUT_FRACTION))
    return "\n".join(lines[:cut]), "\n".join(lines[cut:])


@dataclass(frozen=True)
class Mixture:
    """Sampling weights of the training kinds (normalised when drawn)."""

    text: float = 0.10
    recall: float = 0.22
    repeat: float = 0.08
    niah_single: float = 0.12
    niah_uuid: float = 0.03
    multikey_dense: float = 0.13
    needle_haystack: float = 0.06
    multivalue: float = 0.03
    multiquery: float = 0.03
    vt: float = 0.14
    qa: float = 0.04
    aggregation: float = 0.02
    induction: float = 0.0


# The first phase is dominated by dense copying tasks: retrieval circuits (previous-token + induction heads)
# form only after many copy episodes, and short recall/repeat sequences give the most episodes per step.
COPY_PHASE = Mixture(
    text=0.10,
    recall=0.35,
    repeat=0.25,
    niah_single=0.08,
    niah_uuid=0.0,
    multikey_dense=0.10,
    needle_haystack=0.0,
    multivalue=0.0,
    multiquery=0.0,
    vt=0.12,
    qa=0.0,
    aggregation=0.0,
)

# Training starts with a short stage of pure induction data (a random string, then the same string again).
# A copying (induction) circuit forms abruptly after a plateau (Olsson et al., 2022, "In-context learning
# and induction heads"); on pure copy data the plateau is a few hundred steps, while copy data diluted in
# the full mixture had not left it after 800 steps of 8K tokens (measured on the CPU preset).
INDUCTION_PHASE = Mixture(**{**{name: 0.0 for name in vars(Mixture())}, "induction": 1.0})


class TrainingStream:
    """Draws training sequences of a requested length, deterministically from a seed."""

    def __init__(self, tokenizer, seed: int, mixture: Mixture | None = None) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.mixture = mixture or Mixture()
        train_text, _ = kjv_split()
        self.text_ids = np.frombuffer(train_text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        self.kjv = TokenizedHaystack.from_sentences(tokenizer, split_sentences(train_text), "kjv-train")
        self.noise = TokenizedHaystack.build(tokenizer, "noise")

    def sample(self, length: int, mixture: Mixture | None = None) -> tuple[list[int], list[int]]:
        """One sequence of at most ``length`` tokens and its 0/1 loss mask (``mixture`` overrides the
        stream's own weights for this draw)."""
        mixture = mixture or self.mixture
        kinds = list(vars(mixture))
        for _ in range(4):
            kind = self.rng.choices(kinds, weights=[getattr(mixture, k) for k in kinds])[0]
            try:
                ids, mask = getattr(self, f"_{kind}")(length)
            except ValueError:  # this kind does not fit in `length` tokens; draw another
                continue
            return ids[:length], mask[:length]
        return self._text(length)

    # -- kinds ------------------------------------------------------------------------------------------
    def _text(self, length: int):
        start = self.rng.randrange(len(self.text_ids) - length)
        ids = [BOS_ID, *self.text_ids[start : start + length - 1].tolist()]
        return ids, [1] * len(ids)

    def _recall(self, length: int):
        """Dense associative recall: ``key = value`` lines, then ``key ?`` queries answered with the value.
        Every answer is a loss target, so copying circuits get far more signal per token than in NIAH."""
        rng = self.rng
        ids, mask = [BOS_ID], [0]
        n_pairs = rng.randint(4, max(4, min(64, length // 60)))
        keys = distinct(word_key, rng, n_pairs)
        values = [number_value(rng) if rng.random() < 0.7 else uuid_value(rng)[:13] for _ in keys]
        for k, v in zip(keys, values, strict=True):
            ids += encode(self.tokenizer, f"{k} = {v}\n")
        mask += [0] * (len(ids) - 1)
        for i in rng.sample(range(n_pairs), n_pairs):
            query, answer = encode(self.tokenizer, f"{keys[i]} ?"), encode(self.tokenizer, f" {values[i]}\n")
            if len(ids) + len(query) + len(answer) > length:
                break
            ids += query + answer
            mask += [0] * len(query) + [1] * len(answer)
        return ids, mask

    def _repeat(self, length: int):
        """Random strings that come back later in the text; loss on every repeated copy (induction)."""
        rng, alphabet = self.rng, "abcdefghijklmnopqrstuvwxyz0123456789 "
        longest = max(8, min(60, length // 8))  # short sequences get short pieces, so they still repeat
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(5, longest))) for _ in range(8)]
        ids, mask, seen = [BOS_ID], [0], set()
        while len(ids) < length:
            piece = rng.randrange(len(pieces))
            tokens = encode(self.tokenizer, pieces[piece] + ". ")
            ids += tokens
            mask += [1 if piece in seen else 0] * len(tokens)
            seen.add(piece)
        return ids[:length], mask[:length]

    def _induction(self, length: int):
        """A random string, then the same string again; loss on the second copy (the classic induction
        task). Filler after the copy is random too, so only copying lowers the loss."""
        rng, alphabet = self.rng, "abcdefghijklmnopqrstuvwxyz0123456789"
        n = rng.randint(min(8, length // 3), max(8, length // 2 - 2))
        piece = encode(self.tokenizer, "".join(rng.choice(alphabet) for _ in range(n)))
        tail = encode(self.tokenizer, "".join(rng.choice(alphabet) for _ in range(max(0, length - 1 - 2 * n))))
        ids = [BOS_ID, *piece, *piece, *tail]
        mask = [0] * (1 + n) + [1] * n + [0] * len(tail)
        return ids[:length], mask[:length]

    def _haystack(self) -> TokenizedHaystack:
        return self.kjv if self.rng.random() < 0.7 else self.noise

    def _task(self, length: int, name: str, **params):
        seed = self.rng.randrange(1 << 30)
        reserve = 96  # room for the longest answers (ten words for CWE) and <eos>
        sample = TASKS.get(name)(self.tokenizer, length - reserve, seed, num_samples=1, **params)[0]
        return _with_answer(self.tokenizer, sample.context_ids + sample.question_ids, sample.target)

    def _niah_single(self, length: int):
        return self._niah(length, NeedleSpec(haystack="kjv"))

    def _niah_uuid(self, length: int):
        return self._niah(length, NeedleSpec(value_kind="uuid"))

    def _multivalue(self, length: int):
        return self._niah(length, NeedleSpec(num_values=self.rng.randint(2, 4)))

    def _multiquery(self, length: int):
        k = self.rng.randint(2, 4)
        return self._niah(length, NeedleSpec(num_keys=k + self.rng.randint(0, 2), num_queries=k))

    def _needle_haystack(self, length: int):
        uuid = self.rng.random() < 0.4
        spec = NeedleSpec(
            key_kind="uuid" if uuid else "word", value_kind="uuid" if uuid else "number", needle_haystack=True
        )
        return self._niah(length, spec)

    def _niah(self, length: int, spec: NeedleSpec):
        reserve = 50 * max(spec.num_values, spec.num_queries) + 2
        sample = niah(
            self.tokenizer,
            length - reserve,
            self.rng.randrange(1 << 30),
            spec=spec,
            num_samples=1,
            random_depths=True,
            haystack=None if spec.needle_haystack else self._haystack(),
        )[0]
        return _with_answer(self.tokenizer, sample.context_ids + sample.question_ids, sample.target)

    def _multikey_dense(self, length: int):
        """Several needles with distinct keys, then several questions about them, each answered."""
        rng = self.rng
        n_keys = rng.randint(2, max(2, min(16, length // 160)))
        keys = distinct(word_key, rng, n_keys)
        values = [number_value(rng) for _ in keys]
        needles = [encode(self.tokenizer, " " + needle_text(k, v, "number")) for k, v in zip(keys, values, strict=True)]
        asked = rng.sample(range(n_keys), k=min(n_keys, rng.randint(1, 6)))
        blocks = [question_ids(self.tokenizer, niah_question([keys[i]], "number", 1)) for i in asked]
        answers = [[*encode(self.tokenizer, " " + values[i]), EOS_ID] for i in asked]
        n_context = length - sum(len(b) + len(a) for b, a in zip(blocks, answers, strict=True))
        if n_context < sum(len(n) for n in needles) + 8:
            return self._niah_single(length)
        context, _ = build_context(
            self.tokenizer, self._haystack(), n_context, needles, [rng.random() for _ in needles], rng
        )
        ids, mask = list(context), [0] * len(context)
        for block, answer in zip(blocks, answers, strict=True):
            ids += block + answer
            mask += [0] * len(block) + [1] * len(answer)
        return ids, mask

    def _vt(self, length: int):
        return self._task(
            length,
            "vt",
            num_chains=self.rng.randint(1, 2),
            num_hops=self.rng.randint(1, 4),
            haystack=self._haystack(),
            random_depths=True,
        )

    def _qa(self, length: int):
        return self._task(length, self.rng.choice(["qa_1", "qa_2"]), haystack=self.kjv, random_depths=True)

    def _aggregation(self, length: int):
        if self.rng.random() < 0.5:
            return self._task(length, "fwe")
        return self._task(length, "cwe", num_common=self.rng.choice([3, 5, 10]))


def _with_answer(tokenizer, prompt: list[int], target: str) -> tuple[list[int], list[int]]:
    answer = [*encode(tokenizer, target), EOS_ID]
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)
