"""One SQLite file per run: the spec, the environment, and one row per finished sample (and turn).

Rows are written in a transaction as soon as their batch finishes, so a run killed at any point loses at
most the batch in flight and resumes without redoing anything. The file is marked with an application id,
so a foreign or corrupt file is refused instead of being appended to. The ``samples`` table's columns are
the fields of :class:`~contextlab.bench.row.ResultRow`.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import closing
from pathlib import Path

from contextlab import __version__
from contextlab.bench.row import COLUMNS, INSERTED, ResultRow
from contextlab.bench.spec import RunSpec
from contextlab.errors import ContextlabError

APPLICATION_ID = 0x434C4142  # "CLAB"
# Version 2 added the calls, tokens_processed and route columns; a version-1 file is upgraded when opened.
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
# Version of the run spec's JSON (the fields of RunSpec). Runs written before it was recorded hold version 1;
# version 2 added the endpoint fields (a version-1 spec reads with them unset).
SPEC_VERSION = 2
READABLE_SPEC_VERSIONS = (1, 2)
RESULTS_FILE = "results.sqlite"
KEY = ("method", "task", "length", "sample_index", "turn")


class StoreError(ContextlabError):
    """The results file is missing, foreign or corrupt (exit code 2 on the command line)."""


class RunStore:
    """Results of one run in ``<run_dir>/results.sqlite``."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path, self.conn = path, conn

    @classmethod
    def create(cls, run_dir: str | Path, spec: RunSpec, environment: dict) -> RunStore:
        """A new results file, written whole under a temporary name and renamed into place, so a process
        killed while creating it leaves no half-made file that a resume would trip on."""
        path = Path(run_dir) / RESULTS_FILE
        if path.exists():
            raise StoreError(f"{path} exists already; use --resume to continue that run")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{RESULTS_FILE}.{os.getpid()}.partial")
        partial.unlink(missing_ok=True)
        columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
        with closing(sqlite3.connect(partial)) as conn, conn:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute(f"CREATE TABLE samples ({columns}, PRIMARY KEY ({', '.join(KEY)}))")
            conn.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [
                    ("spec", spec.to_json()),
                    ("spec_version", str(SPEC_VERSION)),
                    ("environment", json.dumps(environment)),
                ],
            )
        os.replace(partial, path)
        return cls(path, _connect(path))

    @classmethod
    def open(cls, run: str | Path) -> RunStore:
        """Open ``run`` (a run folder or its results file), refusing anything that is not a contextlab run."""
        path = Path(run).resolve()  # runs/latest is a link: name the run by its real folder
        path = path / RESULTS_FILE if path.is_dir() else path
        if not path.is_file():
            raise StoreError(f"no contextlab run at {run} (expected a run folder holding {RESULTS_FILE})")
        try:
            conn = sqlite3.connect(path, timeout=30)  # no WAL switch before we know the file is ours
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{path} is not a readable SQLite file ({err}); it may be corrupt") from None
        if app_id != APPLICATION_ID:
            conn.close()
            raise StoreError(f"{path} is a SQLite file but not a contextlab run (foreign file)")
        if version not in READABLE_SCHEMAS:
            conn.close()
            raise StoreError(f"{path} has results schema {version}; this contextlab reads {READABLE_SCHEMAS}")
        problems = _integrity_problems(conn)
        conn.close()
        if problems:
            raise StoreError(
                f"{path} is corrupt ({problems}); its readable rows can be copied out with "
                f"`sqlite3 {path} .recover`, or start a new run"
            )
        store = cls(path, _connect(path))
        if version < SCHEMA_VERSION:
            store._upgrade()
        return store

    def _upgrade(self) -> None:
        """Add the columns of later schema versions (each has a default or allows NULL), so an older run
        resumes and reports; a read-only file is read as it is (its rows lack the new columns)."""
        present = {row[1] for row in self._query("PRAGMA table_info(samples)")}
        try:
            with self.conn:
                for name, kind in COLUMNS.items():
                    if name not in present:
                        self.conn.execute(f"ALTER TABLE samples ADD COLUMN {name} {kind}")
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.OperationalError as err:
            if "readonly" not in str(err).replace(" ", "").lower():  # a missing table, a locked file...
                raise StoreError(f"{self.path} cannot be read as a contextlab run ({err}); it may be corrupt") from None

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def spec(self) -> RunSpec:
        """The run's spec; a run written by another contextlab version is refused naming both versions."""
        version = int(self._meta("spec_version", default="1"))
        writer = json.loads(self._meta("environment")).get("contextlab", "an unknown version")
        if version not in READABLE_SPEC_VERSIONS:
            raise StoreError(
                f"{self.path} was written by contextlab {writer} (run spec version {version}); this contextlab "
                f"({__version__}) reads version {SPEC_VERSION}: resume it with contextlab {writer}, or start a new run"
            )
        try:
            return RunSpec.from_json(self._meta("spec"))
        except ValueError as err:
            raise StoreError(
                f"{self.path}: cannot read its run spec (written by contextlab {writer}; this is {__version__}): {err}"
            ) from None

    def replace_spec(self, spec: RunSpec) -> None:
        """Record a spec grown by ``--extend`` (new methods, tasks or lengths; the rows already stored stay)."""
        with self.conn:
            self.conn.execute("UPDATE meta SET value = ? WHERE key = 'spec'", (spec.to_json(),))

    def environment(self) -> dict:
        return json.loads(self._meta("environment"))

    def done_keys(self) -> set[tuple]:
        return set(self._query(f"SELECT {', '.join(KEY)} FROM samples"))

    def add_rows(self, rows: Sequence[ResultRow | Mapping[str, object]]) -> None:
        """Insert finished rows (or ``{column: value}`` mappings, checked against the columns) in one
        transaction (all or nothing)."""
        if not rows:
            return
        rows = [r if isinstance(r, ResultRow) else ResultRow.from_mapping(r) for r in rows]
        sql = f"INSERT OR REPLACE INTO samples ({', '.join(INSERTED)}) VALUES ({', '.join('?' * len(INSERTED))})"
        with self.conn:
            self.conn.executemany(sql, [tuple(getattr(r, name) for name in INSERTED) for r in rows])

    def rows(self) -> list[dict]:
        cursor = self._query("SELECT * FROM samples ORDER BY method, task, length, sample_index, turn")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, r, strict=True)) for r in cursor]

    def close(self) -> None:
        self.conn.close()

    def _query(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        """A read; a file whose tables are missing or unreadable is a :class:`StoreError`, not a traceback."""
        try:
            return self.conn.execute(sql, params)
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path} cannot be read as a contextlab run ({err}); it may be corrupt") from None

    def _meta(self, key: str, default: str | None = None) -> str:
        row = self._query("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is not None:
            return row[0]
        if default is not None:
            return default
        raise StoreError(f"{self.path} lacks its {key!r} record; it may be corrupt")


def _integrity_problems(conn: sqlite3.Connection) -> str:
    """SQLite's quick check (every page and index readable; linear in the file size, which is small),
    as one line; empty when the file is sound."""
    try:
        found = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as err:
        return str(err)
    if found == ["ok"]:
        return ""
    lines = (line.strip() for item in found for line in item.splitlines())
    text = "; ".join(line for line in lines if line and not line.startswith("***"))  # "*** in database main ***"
    return text[:300]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn
