"""The benchmark runner: rows in SQLite, resume after Ctrl-C, refusal of foreign files, reports, Ray."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contextlab.bench.report import interval, pareto_front, write_report
from contextlab.bench.run import run_benchmark
from contextlab.bench.spec import RunSpec
from contextlab.bench.store import RESULTS_FILE, RunStore, StoreError

COMPARED = (
    "method",
    "task",
    "length",
    "sample_index",
    "turn",
    "score",
    "prediction",
    "kv_bytes",
    "kv_bytes_full",
    "prompt_tokens",
    "new_tokens",
)


def small_spec(model_dir, **overrides) -> RunSpec:
    settings = dict(
        model=str(model_dir),
        methods=["full", "snapkv:0.5", "streaming:0.5"],
        tasks=["niah_single_1", "scbench_kv:num_turns=2,num_needles=3"],
        lengths=[400, 600],
        samples=3,
        batch_size=2,
        max_new_tokens=8,
    )
    return RunSpec(**{**settings, **overrides})


def compared(rows: list[dict], columns: tuple[str, ...] = COMPARED) -> list[tuple]:
    return sorted(tuple(r[k] for k in columns) for r in rows)


@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    summary = run_benchmark(small_spec(model_dir), out_root=out, show_progress=False)
    return summary


def test_every_cell_sample_and_turn_is_stored(finished_run):
    store = RunStore.open(finished_run.run_dir)
    rows = store.rows()
    # 3 methods x (niah: 2 lengths x 3 samples + scbench: 2 lengths x 3 samples x 2 turns)
    assert len(rows) == finished_run.rows_written == 3 * (2 * 3 + 2 * 3 * 2)
    for r in rows:
        assert 0.0 <= r["score"] <= 1.0 and r["kv_bytes"] > 0 and r["prefill_seconds"] >= 0
        assert r["model"] and r["device"] and "transformers" in r["versions"]
    snap = [r for r in rows if r["method"] == "snapkv:0.5" and r["task"] == "niah_single_1"]
    full = [r for r in rows if r["method"] == "full" and r["task"] == "niah_single_1"]
    assert sum(r["kv_bytes"] for r in snap) < sum(r["kv_bytes"] for r in full)
    assert {r["turn"] for r in rows if r["task"].startswith("scbench")} == {0, 1}
    assert store.spec() == small_spec(Path(store.spec().model))
    store.close()


def test_resume_after_ctrl_c_redoes_nothing_and_matches_an_uninterrupted_run(model_dir, tmp_path, finished_run):
    spec = small_spec(model_dir, batch_size=1)
    cmd = [
        sys.executable,
        "-m",
        "contextlab.cli",
        "bench",
        "--model",
        str(model_dir),
        "--methods",
        ",".join(spec.methods),
        "--tasks",
        ",".join(spec.tasks),
        "--lengths",
        "400,600",
        "--samples",
        "3",
        "--batch-size",
        "1",
        "--max-new-tokens",
        "8",
        "--out",
        str(tmp_path),
        "--quiet",
        "--no-report",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        # a shell's background job inherits SIGINT ignored; Ctrl-C handling is what this test checks
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    results = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.glob(f"*/{RESULTS_FILE}"))
        if found and _row_count(found[0]) >= 1:
            proc.send_signal(signal.SIGSTOP)  # freeze it, so the interrupt lands mid-run however fast it is
            results = found[0]
            break
        time.sleep(0.02)
    assert results is not None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err or "--resume" in _
    partial = RunStore.open(results.parent)
    stored = partial.rows()
    partial.close()
    assert 1 <= len(stored) < finished_run.rows_written  # the file is readable and holds what finished
    summary = run_benchmark(resume=results.parent, show_progress=False)
    assert summary.rows_written == finished_run.rows_written - len(stored)  # nothing redone
    resumed = RunStore.open(results.parent).rows()
    complete = RunStore.open(finished_run.run_dir).rows()
    # Batch size 1 here, 2 there: answers must match; amortised KV bytes legitimately differ with padding.
    content = tuple(c for c in COMPARED if not c.startswith("kv_"))
    assert compared(resumed, content) == compared(complete, content)


def _row_count(path: Path) -> int:
    try:
        with sqlite3.connect(path, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_foreign_and_corrupt_files_are_refused(tmp_path):
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match="not a readable SQLite file"):
        RunStore.open(corrupt)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    before = foreign.read_bytes()
    with pytest.raises(StoreError, match="not a contextlab run"):
        RunStore.open(foreign)
    assert foreign.read_bytes() == before  # untouched
    with pytest.raises(StoreError, match="no contextlab run"):
        RunStore.open(tmp_path / "missing")


def test_report_renders_offline(finished_run, tmp_path):
    page = write_report(finished_run.run_dir, tmp_path / "report")
    text = page.read_text()
    assert "snapkv:0.5" in text and "95%" in text and "turn 2" in text
    assert "http://" not in text and "https://" not in text  # nothing to fetch
    for name in ("pareto_memory.png", "pareto_latency.png", "accuracy_by_length.png", "heatmap_niah_single_1.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000


@pytest.mark.skipif(
    not any(Path(p).exists() for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")),
    reason="Debian's chromium is not installed: run `make browser` once to enable this test (CI installs it)",
)
def test_report_page_renders_in_headless_chromium(finished_run, tmp_path):
    page = write_report(finished_run.run_dir, tmp_path / "report")
    shot = tmp_path / "shot.png"
    browser = next(p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists())
    out = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,2000",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 20_000, out.stderr[-2000:]


def test_intervals_and_pareto_front():
    stat = interval([1.0] * 9 + [0.0])
    assert stat.mean == 0.9 and 0.55 < stat.low < 0.6 and 0.98 < stat.high <= 1.0
    assert interval([0.5, 0.5]).low == interval([0.5, 0.5]).high == 0.5
    for n in range(1, 120):  # all-correct and all-wrong cells: the interval contains the mean (rounding too)
        for scores in ([1.0] * n, [0.0] * n):
            stat = interval(scores)
            assert stat.low <= stat.mean <= stat.high
    points = {"full": (1.0, 0.9), "a": (0.5, 0.9), "b": (0.25, 0.5), "c": (0.5, 0.4)}
    assert pareto_front(points) == {"a", "b"}


@pytest.mark.slow
def test_ray_executor_matches_in_process(model_dir, tmp_path, finished_run):
    pytest.importorskip("ray")
    summary = run_benchmark(small_spec(model_dir), out_root=tmp_path, executor="ray", workers=2, show_progress=False)
    ray_rows = RunStore.open(summary.run_dir).rows()
    assert compared(ray_rows) == compared(RunStore.open(finished_run.run_dir).rows())
