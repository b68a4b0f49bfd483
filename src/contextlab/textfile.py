"""Read a context or haystack file as text, refusing what is not text instead of answering garbage.

A NUL byte means binary data (a PDF, an archive, a model file passed by mistake) and is always refused.
Bytes that are not UTF-8 are refused too, with the offset of the first one, unless the caller asks for
replacement (``errors="replace"``); then each undecodable sequence becomes U+FFFD and the count of bytes
replaced is returned so it can be reported.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

from contextlab.errors import ContextFileError

DECODE_ERRORS = ("strict", "replace")


@dataclass(frozen=True)
class TextFile:
    text: str
    replaced_bytes: int = 0  # bytes turned into U+FFFD (only with errors="replace")
    first_replaced: int | None = None  # byte offset of the first of them


def read_text_file(path: str | Path, errors: str = "strict", replace_hint: str | None = None) -> TextFile:
    """``path`` decoded as UTF-8 (see the module docstring for what is refused). ``replace_hint`` tells the
    caller's user how to ask for replacement (e.g. a command-line flag); None when they cannot."""
    if errors not in DECODE_ERRORS:
        raise ValueError(f"errors must be one of {DECODE_ERRORS}, got {errors!r}")
    path = Path(path)
    data = path.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ContextFileError(
            f"{path} looks binary (a NUL byte at byte offset {nul}); contexts must be text files (UTF-8)"
        )
    parts, pos, replaced, first = [], 0, 0, None
    view = memoryview(data)
    while True:
        try:
            parts.append(codecs.utf_8_decode(view[pos:], "strict", True)[0])
            break
        except UnicodeDecodeError as err:
            start, end = pos + err.start, pos + err.end
            if errors == "strict":
                ask = f" or ask for replacement ({replace_hint})" if replace_hint else ""
                raise ContextFileError(
                    f"{path} is not valid UTF-8 (byte 0x{data[start]:02x} at byte offset {start}); convert it "
                    f"(e.g. iconv -f latin1 -t utf-8){ask}"
                ) from None
            parts.append(codecs.utf_8_decode(view[pos:start], "strict", True)[0] + "\ufffd")
            replaced += end - start
            first = start if first is None else first
            pos = end
    return TextFile(text="".join(parts), replaced_bytes=replaced, first_replaced=first)
