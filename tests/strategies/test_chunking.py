"""Chunker invariants (coverage, order, size, overlap) as property tests, and span merging."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contextlab.strategies.chunking import Chunk, chunk_tokens, chunk_units, make_chunks, merge_spans, unit_ends


def _covered(chunks: list[Chunk]) -> set[int]:
    return {t for c in chunks for t in range(c.start, c.end)}


def _check_common(chunks: list[Chunk], length: int, size: int) -> None:
    assert _covered(chunks) == set(range(length))
    assert chunks[0].start == 0 and chunks[-1].end == length
    for a, b in itertools.pairwise(chunks):
        assert a.start < b.start and a.end < b.end  # strictly ordered
        assert b.start <= a.end  # no gap
    assert all(1 <= len(c) <= size for c in chunks)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 3000), size=st.integers(1, 600), data=st.data())
def test_token_chunks_cover_in_order_with_exact_overlap(length, size, data):
    overlap = data.draw(st.integers(0, size - 1))
    chunks = chunk_tokens(length, size, overlap)
    _check_common(chunks, length, size)
    for a, b in itertools.pairwise(chunks):
        assert a.end - b.start == overlap  # every neighbour pair shares exactly `overlap` tokens
    assert all(len(c) == size for c in chunks[:-1])


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 400), min_size=1, max_size=60),
    size=st.integers(1, 300),
    data=st.data(),
)
def test_unit_chunks_cover_in_order_and_keep_units_whole(cuts, size, data):
    ends = list(itertools.accumulate(cuts))  # unit lengths -> unit ends
    overlap = data.draw(st.integers(0, size - 1))
    chunks = chunk_units(ends, size, overlap)
    _check_common(chunks, ends[-1], size)
    boundaries = {0, *ends}
    for a, b in itertools.pairwise(chunks):
        assert a.end - b.start <= overlap
    for c in chunks:  # a chunk breaks a unit only where the unit alone is longer than the chunk size
        for edge in (c.start, c.end):
            if edge not in boundaries:
                unit = next(e for e in sorted(boundaries) if e > edge) - max(e for e in boundaries if e < edge)
                assert unit > size


def test_unit_chunks_pack_whole_sentences():
    ends = [10, 20, 30, 40]
    assert chunk_units(ends, 25) == [Chunk(0, 20), Chunk(20, 40)]
    assert chunk_units(ends, 25, overlap=10) == [Chunk(0, 20), Chunk(10, 30), Chunk(20, 40)]


def test_sentence_and_paragraph_ends_from_token_texts():
    pieces = ["The", " cat", " sat", ".", " A", " dog", "!\n", "\n", "End"]
    assert unit_ends(pieces, "sentence") == [4, 7, 8, 9]
    assert unit_ends(pieces, "paragraph") == [7, 9]


def test_make_chunks_by_sentence_on_real_text(tokenizer):
    text = "In the beginning was the word. And the word was with God! Is it so? " * 20
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = make_chunks(tokenizer, ids, 100, 0, "sentence")
    _check_common(chunks, len(ids), 100)
    for c in chunks[:-1]:  # every chunk but the last ends right after a sentence
        assert tokenizer.decode(ids[c.start : c.end]).rstrip().endswith((".", "!", "?"))


def test_merge_spans_unites_overlaps_in_order():
    assert merge_spans([Chunk(50, 60), Chunk(0, 10), Chunk(8, 20), Chunk(20, 25)]) == [Chunk(0, 25), Chunk(50, 60)]


@pytest.mark.parametrize(
    ("size", "overlap", "unit", "message"),
    [(0, 0, "token", "chunk must be"), (10, 10, "token", "overlap must be"), (10, 0, "word", "unit must be")],
)
def test_bad_chunking_is_named(size, overlap, unit, message):
    with pytest.raises(ValueError, match=message):
        make_chunks(None, [1, 2, 3], size, overlap, unit)


def test_colons_decimals_and_quotes_in_sentences():
    # "is: 7" keeps a needle's key with its value; "3.14" is one number; a quote may close a sentence.
    pieces = ["for", " X", " is", ":", " 7", ".", " Pi", " is", " 3", ".", "1", ".", '"', " Yes", ";", " no", "."]
    assert unit_ends(pieces, "sentence") == [6, 13, 17]
