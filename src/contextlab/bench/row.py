"""One result row: a finished sample (and turn) of one method. Its fields are the results table's columns.

The runner builds rows and the store writes them, both from this one definition: a column's SQL type follows
from its field's type (``str`` TEXT, ``int`` INTEGER, ``float`` REAL; ``| None`` allows NULL), and a field
with a ``db_default`` gets ``NOT NULL DEFAULT ...``. Fields left out of ``__init__`` (``created_at``) are
filled by SQLite on insert.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields

SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL"}


def db_default(sql: str, **kwargs):
    """A field whose column has SQL default ``sql``."""
    return field(metadata={"db_default": sql}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class ResultRow:
    """A finished sample (and turn) of one method in one (task, length) cell, with its score and its costs."""

    method: str
    task: str  # the task's key, parameters included
    length: int
    sample_index: int
    turn: int = db_default("0")
    task_name: str
    task_params: str  # JSON
    seed: int
    depth: float | None
    metric: str
    score: float
    prediction: str
    answers: str  # JSON list
    prompt_tokens: int
    prompt_chars: int
    new_tokens: int
    kv_bytes: int  # per sample: the batch's bytes / batch size
    kv_bytes_full: int
    peak_memory_bytes: int  # the whole batch's
    prefill_seconds: float  # per sample: the batch's seconds / batch size
    decode_seconds: float
    batch_size: int
    model: str
    device: str
    versions: str
    created_at: str | None = db_default("CURRENT_TIMESTAMP", default=None, init=False)
    # Schema version 2 (input-level strategies); a version-1 file gains these columns when opened.
    calls: int = db_default("1", default=1)  # model calls behind the row (an input-level strategy makes many)
    tokens_processed: int | None = None  # tokens through the model in those calls (prompts + generated)
    route: str | None = None  # the path an input-level strategy took (a router's choice)

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> ResultRow:
        """A row from ``{column: value}``, every required column named (``created_at``, if there, is dropped:
        SQLite sets it)."""
        unknown, missing = sorted(set(values) - set(COLUMNS)), sorted(set(REQUIRED) - set(values))
        if unknown or missing:
            raise ValueError(f"a result row needs exactly the result columns: unknown {unknown}, missing {missing}")
        return cls(**{name: values[name] for name in INSERTED if name in values})


def sql_columns(row_type: type) -> dict[str, str]:
    """``{column: SQL type and constraints}`` of a row dataclass, in field order."""
    hints = typing.get_type_hints(row_type)
    return {f.name: _sql(hints[f.name], f.metadata.get("db_default")) for f in fields(row_type)}


def _sql(hint, default: str | None) -> str:
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    base = [a for a in args if a is not type(None)]
    if len(base) != 1 or base[0] not in SQL_TYPES:
        raise TypeError(f"no SQL column type for {hint!r}")
    kind = SQL_TYPES[base[0]]
    if default is not None:
        return f"{kind} NOT NULL DEFAULT {default}"
    return kind if len(args) > 1 else f"{kind} NOT NULL"


COLUMNS = sql_columns(ResultRow)
INSERTED = tuple(f.name for f in fields(ResultRow) if f.init)  # the others are filled by SQLite
# Columns every row must name; the others (added after version 0.1 results files) have defaults.
REQUIRED = tuple(f.name for f in fields(ResultRow) if f.init and f.default is MISSING)
