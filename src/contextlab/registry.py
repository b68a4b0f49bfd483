"""One registry class for methods and benchmark tasks.

Entries are registered by name, either as an object or as a lazy ``"module:attr"`` target that is imported
on first use, so listing what exists never imports heavy code. A misspelt name gets a "did you mean" hint.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> entry mapping with lazy targets and helpful errors.

    ``kind`` names what is registered ("method", "task") so errors read well.
    ``base`` is checked against every entry when it is first resolved.
    """

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind = kind
        self.base = base
        self._targets: dict[str, str | T] = {}

    def register(self, name: str, target: str | T) -> None:
        if not name or name != name.strip().lower():
            raise ValueError(f"{self.kind} name must be a non-empty lower-case string, got {name!r}")
        if name in self._targets:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if not isinstance(target, str):
            self._check(name, target)
        self._targets[name] = target

    def get(self, name: str) -> T:
        key = name.strip().lower()
        if key not in self._targets:
            raise ValueError(self.unknown_message(name))
        target = self._targets[key]
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module_name), attr)
            self._check(key, target)
            self._targets[key] = target
        return target

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name.strip().lower(), list(self._targets), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._targets))})"

    def names(self) -> list[str]:
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.strip().lower() in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _check(self, name: str, target: object) -> None:
        if self.base is None:
            return
        ok = issubclass(target, self.base) if isinstance(target, type) else isinstance(target, self.base)
        if not ok:
            raise TypeError(f"{self.kind} {name!r} must be a {self.base.__name__}, got {target!r}")
