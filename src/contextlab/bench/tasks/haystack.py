"""Tokenized haystacks: a named one is tokenized once per tokenizer in a process, and once per machine on disk.

Tokenizing the KJV haystack takes about 3 s, which every process of a run paid (each Ray worker too). The
disk copy, ``<cache>/haystacks/<source>-<key>.npz`` under ``$CONTEXTLAB_CACHE`` (default
``~/.cache/contextlab``), is keyed by a hash of everything the token ids depend on: the tokenizer's backend
definition (vocabulary, normalizer, pre-tokenizer, added tokens), its class, the tokenizer libraries'
versions, the haystack's sentences and a format version. A tokenizer without a serializable backend (a slow
Python tokenizer) has no stable key and is never cached on disk; user paths are never cached (files change).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import weakref
import zipfile
from pathlib import Path

import numpy as np

from contextlab.bench.tasks.text import TokenizedHaystack, haystack_sentences
from contextlab.loading.gguf import cache_root

log = logging.getLogger(__name__)

NAMED_SOURCES = ("kjv", "noise")
FORMAT_VERSION = 1
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {source: TokenizedHaystack}


def resolve_haystack(tokenizer, haystack: str | TokenizedHaystack) -> TokenizedHaystack:
    """A tokenized haystack. Named ones are memoized per tokenizer (a memo, not state: the result depends only
    on the tokenizer and the source, and dies with the tokenizer) and cached on disk; paths are re-read."""
    if isinstance(haystack, TokenizedHaystack):
        return haystack
    if haystack not in NAMED_SOURCES:
        return TokenizedHaystack.build(tokenizer, haystack)
    per_tokenizer = _MEMO.setdefault(tokenizer, {})
    if haystack not in per_tokenizer:
        per_tokenizer[haystack] = cached_haystack(tokenizer, haystack)
    return per_tokenizer[haystack]


def cached_haystack(tokenizer, source: str) -> TokenizedHaystack:
    """The named haystack ``source`` tokenized, read from the disk cache when a valid copy is there, else
    tokenized and written there (atomically; a corrupt copy is replaced)."""
    if source not in NAMED_SOURCES:
        raise ValueError(f"only named haystacks {NAMED_SOURCES} are cached on disk, got {source!r}")
    sentences = haystack_sentences(source)
    key = cache_key(tokenizer, source, sentences)
    if key is None:
        return TokenizedHaystack.from_sentences(tokenizer, sentences, source)
    path = cache_path(source, key)
    hay = _read(path, source, key)
    if hay is None:
        hay = TokenizedHaystack.from_sentences(tokenizer, sentences, source)
        _write(path, hay, key)
    return hay


def cache_path(source: str, key: str) -> Path:
    return cache_root() / "haystacks" / f"{source}-{key[:32]}.npz"


def cache_key(tokenizer, source: str, sentences: list[str]) -> str | None:
    """sha256 of what the haystack's token ids depend on, or None when the tokenizer has no stable identity."""
    try:
        backend = tokenizer.backend_tokenizer.to_str()
    except Exception:  # no backend (slow tokenizer), or one that cannot serialize itself: many error types
        return None
    import tokenizers
    import transformers

    header = {
        "format": FORMAT_VERSION,
        "source": source,
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "split_special_tokens": getattr(tokenizer, "split_special_tokens", None),
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for part in (backend, "\n".join(sentences)):
        digest.update(b"\0" + part.encode("utf-8"))
    return digest.hexdigest()


def _read(path: Path, source: str, key: str) -> TokenizedHaystack | None:
    """The cached haystack, or None when the file is absent, unreadable, or not the one ``key`` names."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            ids, starts = data["ids"].astype(np.int64), data["starts"].astype(np.int64)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        log.warning("ignoring corrupt haystack cache %s (%s); rebuilding it", path, err)
        return None
    if not _consistent(ids, starts):
        log.warning("ignoring inconsistent haystack cache %s; rebuilding it", path)
        return None
    return TokenizedHaystack(source=source, ids=ids, starts=starts)


def _consistent(ids: np.ndarray, starts: np.ndarray) -> bool:
    """Sentence starts non-decreasing from 0, inside the ids."""
    if ids.ndim != 1 or starts.ndim != 1 or len(ids) == 0 or len(starts) == 0:
        return False
    return bool(starts[0] == 0 and starts[-1] < len(ids) and (np.diff(starts) >= 0).all())


def _write(path: Path, hay: TokenizedHaystack, key: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a partial file. A cache
    that cannot be written (read-only home...) only costs the next process its tokenization."""
    # Token ids fit in int32 for any real vocabulary: half the file, widened back to int64 on reading.
    narrow = hay.ids.astype(np.int32) if hay.ids.max(initial=0) < 2**31 else hay.ids
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, key=np.array(key), ids=narrow, starts=hay.starts)
        tmp.chmod(0o644)  # a temporary file is private; the cache may be shared ($CONTEXTLAB_CACHE)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write the haystack cache %s (%s)", path, err)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
