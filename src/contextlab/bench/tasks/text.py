"""Haystack text and vocabularies for synthetic tasks, all available offline.

Haystack sources:
- ``"noise"``: a few short, repeated filler sentences (RULER's "noise" haystack kind).
- ``"kjv"``: the King James Bible (public domain), shipped gzipped in the package; taken from Debian's
  ``bible-kjv`` package with the verse references removed.
- a folder or file path: every ``*.txt`` file under it, for users who bring their own text.
"""

from __future__ import annotations

import gzip
import random
import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from contextlab.textfile import read_text_file

NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

# Short everyday words for needle keys ("amber-lantern"); two of them make 40k+ distinct keys.
ADJECTIVES = """
amber ancient bitter brave bright brisk calm clever cold crimson curious dark distant dusty eager early
faint fancy fierce gentle giant golden grand green hidden hollow humble icy jolly keen lively lonely
loud lucky mellow merry mighty misty modest narrow noble odd pale patient plain polite proud purple
quick quiet rapid rare restless rough round royal rusty scarlet secret shallow sharp shiny silent silver
simple sleepy slow smooth soft solid sour spare steady stormy sturdy subtle sudden sunny sweet swift
tall tame tender tidy tiny velvet vivid warm wary wild windy wise witty young zesty
""".split()
NOUNS = """
anchor apple arrow badger banner barrel basket beacon beetle bell blossom bottle bridge brook bucket
button cabin candle canyon castle cedar chimney cliff clock cloud comet compass copper cottage crane
crystal dagger desert dolphin dragon drum eagle ember falcon feather fern fiddle forest fossil fountain
garden glacier goblet harbor harvest hammer helmet hermit island jacket kettle lantern lemon lizard
meadow mirror monkey mountain needle oak orchard otter owl paddle parrot pebble pepper piano pillow
pirate planet pocket quarry rabbit raven ribbon river rocket saddle sailor shadow shell spider spoon
squirrel stable statue stone summit teapot thimble thunder tiger tower trumpet tulip tunnel turtle
valley violin wagon walnut whistle willow window wizard
""".split()
SYLLABLES = "ka lo mi ra ve tu sen dor bal fin gar hel jus kor lan mor nel pas quin ros tal ven wil zor".split()


def haystack_sentences(source: str) -> list[str]:
    """Sentences of a haystack source (see module docstring), in reading order."""
    if source == "noise":
        return list(NOISE_SENTENCES)
    if source == "kjv":
        return split_sentences(kjv_text())
    path = Path(source)
    if path.is_file():
        return split_sentences(read_text_file(path).text)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"haystack folder {source!r} holds no *.txt files")
        return split_sentences("\n".join(read_text_file(f).text for f in files))
    raise ValueError(f"unknown haystack {source!r}: use 'noise', 'kjv', or a path to a .txt file or folder")


def kjv_text() -> str:
    data = resources.files("contextlab.data").joinpath("kjv.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")


def split_sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?;:])\s+|\n+", text)
    return [p.strip() for p in parts if p.strip()]


@dataclass
class TokenizedHaystack:
    """A haystack tokenized once per tokenizer: sentence token lists, looped over as needed.

    ``ids`` is the concatenation of all sentences and ``starts`` the token offset of each sentence, so
    filler of any length is a slice, and needles go in at sentence starts.
    """

    source: str
    ids: np.ndarray  # [N] int64
    starts: np.ndarray  # [num_sentences] int64, ascending, starts[0] == 0

    @classmethod
    def build(cls, tokenizer, source: str) -> TokenizedHaystack:
        return cls.from_sentences(tokenizer, haystack_sentences(source), source)

    @classmethod
    def from_sentences(cls, tokenizer, sentences: list[str], source: str) -> TokenizedHaystack:
        encoded = tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        ids = np.fromiter((t for e in encoded for t in e), dtype=np.int64, count=int(lengths.sum()))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        return cls(source=source, ids=ids, starts=starts)

    def filler(self, n_tokens: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        """``n_tokens`` consecutive haystack tokens from a random sentence start, and the sentence starts
        inside that span (relative offsets). The haystack is repeated if it is shorter than asked."""
        if n_tokens <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
        first = rng.randrange(len(self.starts))
        offset = int(self.starts[first])
        repeats = (offset + n_tokens) // len(self.ids) + 1
        ids = np.tile(self.ids, repeats)[offset : offset + n_tokens]
        starts = np.concatenate([self.starts + k * len(self.ids) for k in range(repeats)]) - offset
        starts = starts[(starts >= 0) & (starts < n_tokens)]
        return ids, starts


def word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def number_value(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def uuid_value(rng: random.Random) -> str:
    hexdigits = "0123456789abcdef"
    groups = (8, 4, 4, 4, 12)
    return "-".join("".join(rng.choice(hexdigits) for _ in range(g)) for g in groups)


def variable_name(rng: random.Random, letters: int = 5) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(letters))


def invented_name(rng: random.Random, syllables: int = 2) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def distinct(make, rng: random.Random, n: int, avoid: set[str] | None = None) -> list[str]:
    """``n`` distinct values from ``make(rng)``, none in ``avoid``."""
    seen = set(avoid or ())
    out: list[str] = []
    while len(out) < n:
        value = make(rng)
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out
