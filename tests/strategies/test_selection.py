"""Top-k selection under a token budget, in context order."""

from __future__ import annotations

import pytest

from contextlab.strategies.chunking import Chunk
from contextlab.strategies.selection import select_top

CHUNKS = [Chunk(0, 10), Chunk(10, 30), Chunk(30, 35), Chunk(35, 50)]


def test_top_k_back_in_context_order():
    assert select_top([0.1, 0.9, 0.5, 0.7], CHUNKS, k=2) == [1, 3]


def test_token_budget_skips_what_overflows_and_takes_smaller_later_chunks():
    # best is chunk 1 (20 tokens); chunk 3 (15) would overflow 30; chunk 2 (5) still fits
    assert select_top([0.1, 0.9, 0.5, 0.7], CHUNKS, tokens=30) == [1, 2]


def test_ties_keep_the_earlier_chunk():
    assert select_top([1.0, 1.0, 1.0, 1.0], CHUNKS, k=1) == [0]


@pytest.mark.parametrize(("kwargs", "message"), [({"k": 0}, "k must be"), ({"tokens": 0}, "budget must be")])
def test_bad_selection_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_top([1.0] * 4, CHUNKS, **kwargs)


def test_nothing_fits_is_an_error():
    with pytest.raises(ValueError, match="no chunk fits"):
        select_top([1.0] * 4, CHUNKS, tokens=3)
