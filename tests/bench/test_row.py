"""ResultRow is the results table's schema: files written before it existed open, and rows round-trip."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest

from contextlab.bench.row import COLUMNS, ResultRow
from contextlab.bench.spec import RunSpec
from contextlab.bench.store import APPLICATION_ID, KEY, RESULTS_FILE, SCHEMA_VERSION, RunStore, StoreError

# The samples table as schema version 1 wrote it, before the row type existed (kept literally: a change here
# means results files already on disk no longer match, so SCHEMA_VERSION must change with it).
SCHEMA_V1 = {
    "method": "TEXT NOT NULL",
    "task": "TEXT NOT NULL",
    "length": "INTEGER NOT NULL",
    "sample_index": "INTEGER NOT NULL",
    "turn": "INTEGER NOT NULL DEFAULT 0",
    "task_name": "TEXT NOT NULL",
    "task_params": "TEXT NOT NULL",
    "seed": "INTEGER NOT NULL",
    "depth": "REAL",
    "metric": "TEXT NOT NULL",
    "score": "REAL NOT NULL",
    "prediction": "TEXT NOT NULL",
    "answers": "TEXT NOT NULL",
    "prompt_tokens": "INTEGER NOT NULL",
    "prompt_chars": "INTEGER NOT NULL",
    "new_tokens": "INTEGER NOT NULL",
    "kv_bytes": "INTEGER NOT NULL",
    "kv_bytes_full": "INTEGER NOT NULL",
    "peak_memory_bytes": "INTEGER NOT NULL",
    "prefill_seconds": "REAL NOT NULL",
    "decode_seconds": "REAL NOT NULL",
    "batch_size": "INTEGER NOT NULL",
    "model": "TEXT NOT NULL",
    "device": "TEXT NOT NULL",
    "versions": "TEXT NOT NULL",
    "created_at": "TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP",
}


def row(**overrides) -> ResultRow:
    values = dict(
        method="full",
        task="niah_single_1",
        length=512,
        sample_index=0,
        turn=0,
        task_name="niah_single_1",
        task_params="{}",
        seed=7,
        depth=0.5,
        metric="string_match_all",
        score=1.0,
        prediction=" 1234567",
        answers='["1234567"]',
        prompt_tokens=512,
        prompt_chars=2000,
        new_tokens=4,
        kv_bytes=1000,
        kv_bytes_full=2000,
        peak_memory_bytes=3000,
        prefill_seconds=0.25,
        decode_seconds=0.5,
        batch_size=2,
        model="reference",
        device="cpu: test",
        versions="torch x",
    )
    return ResultRow(**{**values, **overrides})


def spec() -> RunSpec:
    return RunSpec(model="reference", methods=["full"], tasks=["niah_single_1"], lengths=[512], samples=2)


# Version 2 appended these (a version-1 file gains them, in this order, when opened).
SCHEMA_V2 = {
    **SCHEMA_V1,
    "calls": "INTEGER NOT NULL DEFAULT 1",
    "tokens_processed": "INTEGER",
    "route": "TEXT",
}


def test_row_fields_are_the_v2_columns_in_order():
    assert SCHEMA_VERSION == 2
    assert list(COLUMNS.items()) == list(SCHEMA_V2.items())
    assert [f.name for f in dataclasses.fields(ResultRow)] == list(SCHEMA_V2)


def test_rows_round_trip_and_sqlite_fills_created_at(tmp_path):
    store = RunStore.create(tmp_path / "run", spec(), {"python": "3"})
    store.add_rows([row(), row(sample_index=1, depth=None, score=0.0)])
    stored = store.rows()
    store.close()
    assert [r["sample_index"] for r in stored] == [0, 1] and stored[1]["depth"] is None
    expected = dataclasses.asdict(row())
    assert {k: v for k, v in stored[0].items() if k != "created_at"} == {
        k: v for k, v in expected.items() if k != "created_at"
    }
    assert stored[0]["created_at"]  # filled by SQLite


def test_a_results_file_written_with_the_v1_schema_opens_and_takes_rows(tmp_path):
    path = tmp_path / "old" / RESULTS_FILE
    path.parent.mkdir()
    columns = ", ".join(f"{name} {kind}" for name, kind in SCHEMA_V1.items())
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 1")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(f"CREATE TABLE samples ({columns}, PRIMARY KEY ({', '.join(KEY)}))")
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [("spec", spec().to_json()), ("environment", "{}")])
    conn.close()
    store = RunStore.open(path.parent)
    store.add_rows([row()])
    assert (
        store.spec() == spec()
        and len(store.rows()) == 1
        and store.done_keys() == {("full", "niah_single_1", 512, 0, 0)}
    )
    (stored,) = store.rows()
    assert (stored["calls"], stored["tokens_processed"], stored["route"]) == (1, None, None)
    store.close()
    with sqlite3.connect(path) as conn:  # upgraded in place: the version-2 columns, in order
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert [r[1] for r in conn.execute("PRAGMA table_info(samples)")] == list(SCHEMA_V2)
    conn.close()


def test_add_rows_checks_mappings_against_the_columns(tmp_path):
    store = RunStore.create(tmp_path / "run", spec(), {})
    store.add_rows([{**dataclasses.asdict(row()), "sample_index": 1}])  # created_at among them: SQLite sets it
    assert [r["sample_index"] for r in store.rows()] == [1]
    with pytest.raises(ValueError, match=r"unknown \['scroe'\], missing \['score'\]"):
        store.add_rows([{("scroe" if k == "score" else k): v for k, v in dataclasses.asdict(row()).items()}])
    store.close()


def test_a_spec_from_another_version_is_a_store_error(tmp_path):
    store = RunStore.create(tmp_path / "run", spec(), {})
    with store.conn:
        store.conn.execute("UPDATE meta SET value = ? WHERE key = 'spec'", ('{"model": "x", "prefill_chunk": 1}',))
    with pytest.raises(StoreError, match=r"unknown keys \['prefill_chunk'\]"):
        store.spec()
    store.close()


def test_a_spec_version_this_contextlab_does_not_read_is_named(tmp_path):
    store = RunStore.create(tmp_path / "run", spec(), {"contextlab": "9.9"})
    with store.conn:
        store.conn.execute("UPDATE meta SET value = '99' WHERE key = 'spec_version'")
    with pytest.raises(StoreError, match=r"written by contextlab 9.9 \(run spec version 99\)"):
        store.spec()
    store.close()


def test_replace_spec_records_a_grown_spec(tmp_path):
    store = RunStore.create(tmp_path / "run", spec(), {})
    grown = dataclasses.replace(spec(), methods=["full", "snapkv:0.5"])
    store.replace_spec(grown)
    store.close()
    reopened = RunStore.open(tmp_path / "run")
    assert reopened.spec() == grown
    reopened.close()


def test_corrupt_pages_are_refused_when_opened(tmp_path):
    store = RunStore.create(tmp_path / "run", spec(), {})
    store.add_rows([row(sample_index=i, prediction="x" * 200) for i in range(60)])
    store.close()  # the last connection checkpoints the WAL into the file
    path = tmp_path / "run" / RESULTS_FILE
    data = bytearray(path.read_bytes())
    assert len(data) > 3 * 4096
    data[4096 + 100 :: 7] = b"\xab" * len(data[4096 + 100 :: 7])
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"is corrupt \(.*\.recover"):
        RunStore.open(path.parent)
