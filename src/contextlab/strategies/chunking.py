"""Cutting a context (token ids) into chunks: fixed token windows, or whole sentences / paragraphs.

A chunk is a ``[start, end)`` span of the context's token ids, so chunks never re-tokenize the text and a
selection of chunks is put back together from the original ids. Every chunker guarantees: the chunks cover
every token, starts and ends strictly increase, no chunk is longer than ``size``, and two neighbours share
at most ``overlap`` tokens (exactly ``overlap`` for token chunks, except where the context ends).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

UNITS = ("token", "sentence", "paragraph")
# A sentence ends at . ! or ? (closing quotes or brackets may follow) unless the next token starts with a
# lower-case letter or a digit (the point inside "3.14" or "e.g.x"); a colon or semicolon does not end one,
# so a key and its value ("the number for X is: 7") stay in one unit.
_SENTENCE_ENDS = (".", "!", "?")
_CLOSERS = "\"')]”’"


@dataclass(frozen=True)
class Chunk:
    """Token span ``[start, end)`` of the context."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


def check_chunking(size: int, overlap: int, unit: str) -> None:
    """Raise ValueError naming the bad chunking parameter."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {size!r}")
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < size:
        raise ValueError(f"overlap must be an integer in [0, chunk) = [0, {size}), got {overlap!r}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")


def chunk_tokens(length: int, size: int, overlap: int = 0) -> list[Chunk]:
    """Windows of ``size`` tokens, each starting ``size - overlap`` after the previous one."""
    check_chunking(size, overlap, "token")
    if length <= 0:
        return []
    chunks, start, step = [], 0, size - overlap
    while True:
        end = min(start + size, length)
        chunks.append(Chunk(start, end))
        if end == length:
            return chunks
        start += step


def unit_ends(pieces: Sequence[str], unit: str) -> list[int]:
    """Token indices just after each sentence (or paragraph) ends, from each token's decoded text; the
    context's end is always one."""
    ends, closing = [], False  # closing: a sentence mark came, only closing quotes/brackets since
    for i, text in enumerate(pieces):
        after = pieces[i + 1] if i + 1 < len(pieces) else ""
        if unit == "paragraph":
            hit = "\n\n" in text or (text.endswith("\n") and after.startswith("\n"))
        else:
            closing = _ends_sentence(text) or (closing and _only_closers(text))
            hit = "\n" in text or (closing and not _continues(after))
        if hit:
            ends.append(i + 1)
    if not ends or ends[-1] != len(pieces):
        ends.append(len(pieces))
    return ends


def _ends_sentence(text: str) -> bool:
    return text.rstrip().rstrip(_CLOSERS).endswith(_SENTENCE_ENDS)


def _continues(text: str) -> bool:
    """Whether a token right after a sentence mark carries the same sentence on (or closes it)."""
    return text[:1].islower() or text[:1].isdigit() or _only_closers(text)


def _only_closers(text: str) -> bool:
    return text.strip() != "" and text.strip().strip(_CLOSERS) == ""


def chunk_units(ends: Sequence[int], size: int, overlap: int = 0) -> list[Chunk]:
    """Chunks of whole units (a unit spans from the previous end to its end), packed up to ``size`` tokens;
    a unit longer than ``size`` is cut into token windows. Neighbours overlap by the whole units at the end
    of a chunk that fit in ``overlap`` tokens."""
    check_chunking(size, overlap, "sentence")
    bounds = _split_long([0, *ends], size)
    chunks: list[Chunk] = []
    first = 0  # index into bounds of the next chunk's start
    while first < len(bounds) - 1:
        last = first + 1
        while last + 1 < len(bounds) and bounds[last + 1] - bounds[first] <= size:
            last += 1
        chunks.append(Chunk(bounds[first], bounds[last]))
        if last == len(bounds) - 1:
            break
        back = last  # step back over whole units for the overlap, leaving the next chunk room to advance
        while (
            back - 1 > first
            and bounds[last] - bounds[back - 1] <= overlap
            and bounds[last + 1] - bounds[back - 1] <= size
        ):
            back -= 1
        first = back
    return chunks


def _split_long(bounds: list[int], size: int) -> list[int]:
    """Unit boundaries with extra cuts every ``size`` tokens inside units longer than ``size``."""
    out = [bounds[0]]
    for end in bounds[1:]:
        while end - out[-1] > size:
            out.append(out[-1] + size)
        if end > out[-1]:
            out.append(end)
    return out


def make_chunks(tokenizer, ids: Sequence[int], size: int, overlap: int, unit: str) -> list[Chunk]:
    """Chunks of ``ids`` by ``unit`` (see the module docstring)."""
    check_chunking(size, overlap, unit)
    if unit == "token":
        return chunk_tokens(len(ids), size, overlap)
    pieces = tokenizer.batch_decode([[t] for t in ids])
    return chunk_units(unit_ends(pieces, unit), size, overlap)


def merge_spans(chunks: Sequence[Chunk]) -> list[Chunk]:
    """The union of (possibly overlapping) chunks as disjoint spans in context order."""
    spans: list[Chunk] = []
    for c in sorted(chunks, key=lambda c: c.start):
        if spans and c.start <= spans[-1].end:
            spans[-1] = Chunk(spans[-1].start, max(spans[-1].end, c.end))
        else:
            spans.append(c)
    return spans
