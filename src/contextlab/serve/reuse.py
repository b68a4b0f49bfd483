"""Compressed shared contexts kept between requests (SCBench's multi-request setting).

A request that names a shared prefix (chat: every message before the last, when long enough; completions:
``"contextlab": {"prefix_tokens": N}``) is answered as ``prefix`` compressed alone by the method, then the
rest of the prompt fed after it (the question-agnostic protocol). The compressed prefix is kept under the
key (method, sha256 of its token ids); the next request with the same prefix and method starts from a copy
of it instead of prefilling again. Entries are evicted least recently used first when their bytes (the KV
each holds) would pass the cap.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

from contextlab.engine.steps import Prefilled


def prefix_key(method: str, ids: list[int]) -> tuple[str, str]:
    digest = hashlib.sha256(b"".join(t.to_bytes(4, "little", signed=True) for t in ids)).hexdigest()
    return method, digest


@dataclass
class Entry:
    prefilled: Prefilled
    nbytes: int


class PrefixCache:
    """LRU of compressed prefixes, bounded by ``capacity`` bytes of KV (0 disables reuse)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        with self.lock:
            return sum(e.nbytes for e in self.entries.values())

    def get(self, key: tuple[str, str]) -> Prefilled | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return entry.prefilled

    def put(self, key: tuple[str, str], prefilled: Prefilled) -> bool:
        """Keep ``prefilled`` (evicting the least recently used); False when it alone exceeds the cap."""
        nbytes = prefilled.cache.kv_bytes()
        with self.lock:
            if nbytes > self.capacity:
                return False
            self.entries.pop(key, None)
            while self.entries and sum(e.nbytes for e in self.entries.values()) + nbytes > self.capacity:
                self.entries.popitem(last=False)
                self.evictions += 1
            self.entries[key] = Entry(prefilled, nbytes)
            return True
