"""Context and haystack files: text is read, binary and non-UTF-8 input is refused with the byte offset."""

from __future__ import annotations

import pytest

from contextlab.errors import ContextFileError
from contextlab.textfile import read_text_file


def test_utf8_text_reads_unchanged(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("naïve café — 東京\n", encoding="utf-8")
    read = read_text_file(path)
    assert read.text == "naïve café — 東京\n" and read.replaced_bytes == 0 and read.first_replaced is None


def test_nul_byte_is_binary_even_with_replacement(tmp_path):
    path = tmp_path / "b.bin"
    path.write_bytes(b"header" + b"\x00" + b"rest")
    for errors in ("strict", "replace"):
        with pytest.raises(ContextFileError, match=r"looks binary.*byte offset 6"):
            read_text_file(path, errors)


def test_invalid_utf8_names_the_first_bad_byte(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"ok " + b"caf\xe9 and \xff\xfe")
    with pytest.raises(ContextFileError, match=r"byte 0xe9 at byte offset 6\).*--flag"):
        read_text_file(path, replace_hint="--flag")
    with pytest.raises(ContextFileError) as err:
        read_text_file(path)
    assert "replacement" not in str(err.value)  # no way to ask for it: not offered


def test_replacement_counts_every_replaced_byte(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9, \xff\xfe end \xe2\x82\xac and a cut \xe2\x82")
    read = read_text_file(path, "replace")
    assert read.text == "caf\ufffd, \ufffd\ufffd end € and a cut \ufffd"
    assert read.replaced_bytes == 1 + 2 + 2 and read.first_replaced == 3


def test_unknown_errors_mode_is_refused(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="errors must be one of"):
        read_text_file(path, "ignore")
