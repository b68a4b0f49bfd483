"""Choosing chunks by score under a count and token budget, returned in context order."""

from __future__ import annotations

from collections.abc import Sequence

from contextlab.strategies.chunking import Chunk


def select_top(
    scores: Sequence[float], chunks: Sequence[Chunk], k: int | None = None, tokens: int | None = None
) -> list[int]:
    """Indices of the best-scoring chunks, at most ``k`` of them and at most ``tokens`` tokens in all
    (a chunk that would overflow the budget is skipped, a smaller one after it may still fit), sorted back
    into context order. Ties keep the earlier chunk. Raises ValueError when nothing can be chosen."""
    if len(scores) != len(chunks):
        raise ValueError(f"got {len(scores)} scores for {len(chunks)} chunks")
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if tokens is not None and tokens < 1:
        raise ValueError(f"the token budget must be at least 1, got {tokens}")
    order = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))
    chosen, used = [], 0
    for i in order:
        if k is not None and len(chosen) == k:
            break
        if tokens is not None and used + len(chunks[i]) > tokens:
            continue
        chosen.append(i)
        used += len(chunks[i])
    if not chosen:
        raise ValueError(f"no chunk fits the budget of {tokens} tokens (the smallest has {min(map(len, chunks))})")
    return sorted(chosen)
