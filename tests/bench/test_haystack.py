"""The on-disk haystack cache: read back without tokenizing, keyed by the tokenizer, corrupt files rebuilt."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from contextlab.bench.tasks import haystack as haystack_module
from contextlab.bench.tasks.haystack import cache_key, cached_haystack, resolve_haystack
from contextlab.bench.tasks.text import TokenizedHaystack, haystack_sentences
from contextlab.reference.tokenizer import build_byte_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTEXTLAB_CACHE", str(tmp_path))
    return tmp_path / "haystacks"


def no_tokenizing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized although a cached copy was there")

    monkeypatch.setattr(TokenizedHaystack, "from_sentences", classmethod(refuse))


def same(a: TokenizedHaystack, b: TokenizedHaystack) -> bool:
    return (
        a.source == b.source
        and a.ids.dtype == b.ids.dtype == b.starts.dtype == np.int64
        and (np.array_equal(a.ids, b.ids) and np.array_equal(a.starts, b.starts))
    )


def test_second_read_comes_from_disk_and_equals_a_fresh_tokenization(cache, tokenizer, monkeypatch):
    fresh = TokenizedHaystack.build(tokenizer, "noise")
    assert same(cached_haystack(tokenizer, "noise"), fresh)
    [file] = cache.glob("noise-*.npz")
    assert file.stat().st_mode & 0o777 == 0o644 and not list(cache.glob(".*"))  # no temporary file left
    no_tokenizing(monkeypatch)
    assert same(cached_haystack(tokenizer, "noise"), fresh)


@pytest.mark.parametrize("damage", [b"not a zip file at all", b"PK\x03\x04 truncated", None])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(cache, tokenizer, monkeypatch, caplog, damage):
    fresh = cached_haystack(tokenizer, "noise")
    [file] = cache.glob("noise-*.npz")
    if damage is None:  # a readable file under the right key whose sentence starts overrun its ids
        key = cache_key(tokenizer, "noise", haystack_sentences("noise"))
        with file.open("wb") as f:
            np.savez(f, key=np.array(key), ids=np.arange(3), starts=np.array([0, 5]))
    else:
        file.write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger=haystack_module.__name__):
        assert same(cached_haystack(tokenizer, "noise"), fresh)
    assert "haystack cache" in caplog.text
    no_tokenizing(monkeypatch)
    assert same(cached_haystack(tokenizer, "noise"), fresh)  # the rewritten file reads back


def test_the_key_follows_the_tokenizer_and_the_source(tokenizer):
    sentences = haystack_sentences("noise")
    other = build_byte_tokenizer()
    assert cache_key(other, "noise", sentences) == cache_key(tokenizer, "noise", sentences)
    other.add_tokens(["grass"])
    assert cache_key(other, "noise", sentences) != cache_key(tokenizer, "noise", sentences)
    assert cache_key(tokenizer, "kjv", sentences) != cache_key(tokenizer, "noise", sentences)
    assert cache_key(tokenizer, "noise", sentences[:-1]) != cache_key(tokenizer, "noise", sentences)


class SlowTokenizer:
    """A tokenizer without a serializable backend: no stable cache key."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_no_disk_cache_without_a_stable_key_or_for_user_paths(cache, tokenizer, tmp_path):
    slow = SlowTokenizer(tokenizer)
    assert cache_key(slow, "noise", haystack_sentences("noise")) is None
    assert same(cached_haystack(slow, "noise"), TokenizedHaystack.build(tokenizer, "noise"))
    text = tmp_path / "mine.txt"
    text.write_text("My own haystack. Two sentences.")
    assert len(resolve_haystack(tokenizer, str(text)).starts) == 2
    assert not cache.exists()
    with pytest.raises(ValueError, match="only named haystacks"):
        cached_haystack(tokenizer, str(text))


def test_named_haystacks_are_memoized_per_tokenizer(cache, tokenizer):
    assert resolve_haystack(tokenizer, "noise") is resolve_haystack(tokenizer, "noise")
