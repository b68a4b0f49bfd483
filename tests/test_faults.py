"""Fault injection on the command line (issue 15), run as real subprocesses: bad input, a missing GPU, too
little memory, damaged results files, resumes with other settings, two writers at once, and runs killed at
random points. Every bad input ends with exit code 2 and a one-line message (never a traceback); every
interrupted run resumes to the rows an uninterrupted run writes.

Each CLI process spends seconds importing torch and transformers, so independent processes run side by side
(at most ``WORKERS`` at once). No assertion is about timing.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from contextlab.engine.resources import available_bytes

CLI = (sys.executable, "-m", "contextlab.cli")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TIMEOUT = 300  # seconds, per process: a hung process fails its test instead of hanging the suite
# Processes at once: one more than the cores, so a core never idles while one process starts or ends.
WORKERS = min(4, (os.cpu_count() or 1) + 1)
KEY = ("method", "task", "length", "sample_index", "turn")
QUIET = ("--no-report", "--quiet")
# A run of a few seconds: 8 rows, two methods.
SHORT = (
    *("--model", "reference", "--methods", "full,snapkv:0.5", "--tasks", "niah_single_1"),
    *("--lengths", "300", "--samples", "4", "--batch-size", "2"),
)
SHORT_ROWS = 2 * 4
# A run long enough to be stopped in the middle: 16 rows of one sample each (a batch of one, so a resumed
# run computes every sample exactly as an uninterrupted one does).
LONG = (
    *("--model", "reference", "--methods", "full", "--tasks", "niah_single_1"),
    *("--lengths", "1500", "--samples", "16", "--batch-size", "1"),
)
LONG_ROWS = 1 * 16
SUMMARY = re.compile(r"^run: (?P<dir>.+) \((?P<rows>\d+) results in ", re.M)
PROGRESS = re.compile(r"run \S+: (\d+)/(\d+) samples")


# --- running the command line ------------------------------------------------------------------------------


def cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def start(*args: object, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *map(str, args)], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def cli_all(jobs: dict) -> dict:
    """``{name: (args, cwd)}`` run side by side -> ``{name: CompletedProcess}``."""
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {name: pool.submit(cli, *args, cwd=cwd) for name, (args, cwd) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def shown(out: subprocess.CompletedProcess) -> str:
    return f"exit {out.returncode}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"


def assert_ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, shown(out)
    assert "Traceback" not in out.stderr, shown(out)


def assert_refused(out: subprocess.CompletedProcess, command: str, *fragments) -> None:
    """Exit code 2 with ``contextlab <command>: error: ...`` naming every fragment (a tuple: any one of them)."""
    assert out.returncode == 2, shown(out)
    assert "Traceback" not in out.stderr, shown(out)
    assert f"contextlab {command}: error: " in out.stderr, shown(out)
    for fragment in fragments:
        options = fragment if isinstance(fragment, tuple) else (fragment,)
        assert any(option in out.stderr for option in options), f"{fragment!r} not in stderr\n{shown(out)}"


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stop(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if a failed test left it running."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def rows_written(out: subprocess.CompletedProcess) -> int:
    """The row count of the summary line a finished ``bench`` prints."""
    match = SUMMARY.search(out.stdout)
    assert match, shown(out)
    return int(match["rows"])


# --- reading runs ---------------------------------------------------------------------------------------------


def read_rows(run_dir: Path) -> dict[tuple, str]:
    """The run's rows as ``{key: prediction}``, checking that no key is stored twice."""
    with closing(sqlite3.connect(run_dir / "results.sqlite", timeout=30)) as conn:
        found = conn.execute(f"SELECT {', '.join(KEY)}, prediction FROM samples").fetchall()
    rows = {tuple(row[:-1]): row[-1] for row in found}
    assert len(rows) == len(found), f"duplicate keys in {run_dir}"
    return rows


def count_rows(run_dir: Path) -> int | None:
    """Rows stored so far; None while the results file is being created (no spec recorded yet)."""
    try:
        with closing(sqlite3.connect(run_dir / "results.sqlite", timeout=30)) as conn:
            spec, rows = conn.execute("SELECT (SELECT count(*) FROM meta), (SELECT count(*) FROM samples)").fetchone()
    except sqlite3.OperationalError:  # its tables are not created yet
        return None
    return rows if spec else None


def run_folders(root: Path) -> list[Path]:
    """Run folders under an ``--out`` folder (``latest`` is a link to one of them)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()) if root.is_dir() else []


def wait_for_run(proc: subprocess.Popen, out_root: Path, min_rows: int = 0, deadline: float = 120) -> Path:
    """The folder ``proc`` is writing, once its ``writer.lock`` holds the PID and its results file is created
    and holds ``min_rows`` rows (polled; the process ending first fails the test with its output)."""
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before it could be caught\n{out}\n{err}")
        for run_dir in run_folders(out_root):
            lock, results = run_dir / "writer.lock", run_dir / "results.sqlite"
            if not (results.is_file() and lock.is_file() and lock.read_text().strip() == str(proc.pid)):
                continue
            stored = count_rows(run_dir)
            if stored is not None and stored >= min_rows:
                return run_dir
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    pytest.fail(f"no run of PID {proc.pid} under {out_root} within {deadline}s")


def snapshot(run_dir: Path, dest: Path) -> Path:
    """A copy of a finished run (its writer has exited): the WAL folded into the file, no -wal/-shm copied."""
    with closing(sqlite3.connect(run_dir / "results.sqlite")) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copytree(run_dir, dest)
    for extra in ("results.sqlite-wal", "results.sqlite-shm"):
        (dest / extra).unlink(missing_ok=True)
    return dest


@dataclass(frozen=True)
class Run:
    dir: Path
    rows: dict[tuple, str]
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory) -> dict[str, Run]:
    """The short run (with progress lines) and the long one (``--quiet``), uninterrupted, made side by side."""
    root = tmp_path_factory.mktemp("reference")
    outs = cli_all(
        {
            "short": (("bench", *SHORT, "--no-report", "--out", "short"), root),
            "long": (("bench", *LONG, *QUIET, "--out", "long"), root),
        }
    )
    runs = {}
    for name, out in outs.items():
        assert_ok(out)
        (run_dir,) = run_folders(root / name)
        runs[name] = Run(run_dir, read_rows(run_dir), out.stdout, out.stderr)
    assert len(runs["short"].rows) == SHORT_ROWS and len(runs["long"].rows) == LONG_ROWS
    return runs


@pytest.fixture(scope="module")
def short_run(reference_runs) -> Run:
    return reference_runs["short"]


@pytest.fixture(scope="module")
def long_run(reference_runs) -> Run:
    return reference_runs["long"]


def selected_params(request, test: Callable) -> list[dict]:
    """The parameters of this module's ``test`` items that this session runs (deselected ones are not run)."""
    return [
        item.callspec.params
        for item in request.session.items
        if getattr(item, "path", None) == request.path and getattr(item, "originalname", None) == test.__name__
    ]


# --- bad input: one row per case -----------------------------------------------------------------------------


NO_CUDA = "skip: a CUDA GPU is present" if torch.cuda.is_available() else ""


def _free_gib() -> float:
    free = available_bytes(torch.device("cpu"))
    return 0.0 if free is None else free / 2**30


LOW_MEMORY = "skip: more than 150 GiB free, a 10M-token prefill may fit" if _free_gib() > 150 else ""


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]  # {placeholders} name the input files made by bad_input_results
    code: int
    says: tuple = ()  # fragments of stderr (a tuple: any one of them)
    never: tuple[str, ...] = ()  # never in stderr
    leaves_no_run: bool = False  # nothing under --out (bench cases: ``--out runs``)
    skip: str = ""

    @property
    def command(self) -> str:
        return self.args[0]


GENERATE = ("generate", "--model", "reference")
BENCH = ("bench", "--model", "reference", "--methods", "full", "--tasks", "niah_single_1", "--samples", "1")
CASES = {
    "model_missing": Case(
        ("generate", "--model", "{nomodel}", "--context-file", "{text}"), 2, ("model folder not found",)
    ),
    "model_config_not_json": Case(
        ("generate", "--model", "{badjson}", "--context-file", "{text}"), 2, ("is not valid JSON",)
    ),
    "generate_on_missing_cuda": Case(
        (*GENERATE, "--device", "cuda", "--context-file", "{text}"), 2, ("no CUDA GPU",), skip=NO_CUDA
    ),
    # The context is read before the model loads: its error wins over the missing model.
    "binary_context_checked_first": Case(
        ("generate", "--model", "{nomodel}", "--context-file", "{binary}"),
        2,
        ("looks binary", "byte offset 500"),
        never=("model folder not found",),
    ),
    "latin1_context": Case((*GENERATE, "--context-file", "{latin1}"), 2, ("not valid UTF-8", "byte offset 3")),
    # A successful generate: also shows that transformers' weight-loading bars stay off the command line.
    "latin1_context_replaced": Case(
        (*GENERATE, "--context-file", "{latin1}", "--decode-errors", "replace", "--question", "Where?"),
        0,
        ("1 undecodable byte(s)", "replaced", "byte offset 3"),
        never=("Loading weights", "error:"),
    ),
    # The method is parsed before the model loads: its error wins over the missing model.
    "method_typo_checked_first": Case(
        ("generate", "--model", "{nomodel}", "--method", "snpkv:0.5", "--context-file", "{text}"),
        2,
        ("did you mean 'snapkv'",),
        never=("model folder not found",),
    ),
    "context_beyond_window": Case(
        (*GENERATE, "--context-file", "{long}", "--question", "What is the code?"),
        2,
        ("--allow-beyond-window",),
        never=("allow_beyond_window=True",),
    ),
    "bench_on_missing_cuda": Case(
        (*BENCH, "--lengths", "300", "--device", "cuda", "--out", "runs"),
        2,
        ("no CUDA GPU",),
        leaves_no_run=True,
        skip=NO_CUDA,
    ),
    "bench_beyond_memory": Case(
        (*BENCH, "--lengths", "10000000", "--allow-beyond-window", "--out", "runs"),
        2,
        ("needs at least", "GiB", "is free"),
        leaves_no_run=True,
        skip=LOW_MEMORY,
    ),
    "extend_without_resume": Case(
        (*BENCH, "--lengths", "300", "--extend", "--out", "runs"), 2, ("--extend", "--resume"), leaves_no_run=True
    ),
}


def make_inputs(root: Path) -> dict[str, str]:
    badjson = root / "badjson"
    badjson.mkdir()
    (badjson / "config.json").write_text("{not json")
    files = {
        "text": b"The vault code is 4417. The garden is quiet. " * 20,
        "binary": b"A" * 500 + b"\x00" + b"B" * 523,  # 1 KB, one NUL byte at offset 500
        "latin1": b"caf\xe9 on the corner sells bread. " + b"The vault code is 4417. " * 10,  # one latin-1 byte
        "long": (b"The quick brown fox jumps over the lazy dog. " * 140)[:6000],  # ~6000 tokens, window 4096
    }
    paths = {"nomodel": str(root / "no" / "such" / "model"), "badjson": str(badjson)}
    for name, data in files.items():
        (root / f"{name}.txt").write_bytes(data)
        paths[name] = str(root / f"{name}.txt")
    return paths


@pytest.fixture(scope="module")
def bad_input_results(request, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every selected case of the table, run side by side, each in its own folder."""
    root = tmp_path_factory.mktemp("bad-input")
    paths = make_inputs(root)
    jobs = {}
    for params in selected_params(request, test_bad_input_exits_with_a_message):
        name = params["name"]
        if CASES[name].skip:
            continue
        cwd = root / name
        cwd.mkdir()
        jobs[name] = ([arg.format(**paths) for arg in CASES[name].args], cwd)
    return {name: (out, jobs[name][1]) for name, out in cli_all(jobs).items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_with_a_message(name, bad_input_results):
    case = CASES[name]
    if case.skip:
        pytest.skip(case.skip)
    out, cwd = bad_input_results[name]
    if case.code == 2:
        assert_refused(out, case.command, *case.says)
    else:
        assert out.returncode == case.code, shown(out)
        assert "Traceback" not in out.stderr, shown(out)
        for fragment in case.says:
            assert fragment in out.stderr, shown(out)
    for fragment in case.never:
        assert fragment not in out.stderr, shown(out)
    if case.leaves_no_run:
        left = list((cwd / "runs").rglob("*")) if (cwd / "runs").exists() else []
        assert not left, f"left behind: {left}"


# --- damaged results files --------------------------------------------------------------------------------


def _garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:100] = b"\xde\xad\xbe\xef" * 25
    path.write_bytes(bytes(data))


def _foreign(path: Path) -> None:
    path.unlink()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
        conn.execute("INSERT INTO invoices (amount) VALUES (12.5)")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:2000])


def _damaged_pages(path: Path) -> None:
    data = bytearray(path.read_bytes())
    assert len(data) > 4096
    for i in range(4096, len(data), 7):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _half_created(path: Path) -> None:
    """What a results file looked like when a writer was killed between marking it and creating its tables
    (before files were created under a temporary name): the marker, no tables."""
    path.unlink()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA application_id = {0x434C4142}")
        conn.execute("PRAGMA user_version = 1")


def _set_meta(key: str, value: Callable[[str], str]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with closing(sqlite3.connect(path)) as conn, conn:
            (old,) = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value(old), key))

    return damage


def _spec_with_unknown_key(spec: str) -> str:
    return json.dumps({**json.loads(spec), "frobnicate": 1})


DAMAGES = {
    # header level
    "garbage_header": (_garbage_header, (("not a readable SQLite file", "corrupt"),)),
    "foreign_sqlite": (_foreign, ("not a contextlab run",)),
    "truncated": (_truncated, ()),
    # page level
    "damaged_pages": (_damaged_pages, ("is corrupt", ".recover")),
    # record level
    "spec_with_unknown_key": (
        _set_meta("spec", _spec_with_unknown_key),
        ("another contextlab version", "written by contextlab", "frobnicate"),
    ),
    "spec_version_99": (_set_meta("spec_version", lambda _: "99"), ("version 99",)),
    "half_created": (_half_created, ("cannot be read as a contextlab run",)),
}
COMMANDS = {
    "report": lambda run: ("report", run),
    "resume": lambda run: ("bench", "--resume", run, *QUIET),
}


@pytest.fixture(scope="module")
def damaged_results(request, short_run, tmp_path_factory) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """Each selected (damage, command) on its own damaged copy of the short run, run side by side."""
    root = tmp_path_factory.mktemp("damaged")
    jobs = {}
    for params in selected_params(request, test_damaged_results_file_is_refused):
        damage, command = params["damage"], params["command"]
        run_dir = snapshot(short_run.dir, root / f"{damage}-{command}")
        DAMAGES[damage][0](run_dir / "results.sqlite")
        for extra in ("results.sqlite-wal", "results.sqlite-shm"):
            (run_dir / extra).unlink(missing_ok=True)
        jobs[damage, command] = (COMMANDS[command](run_dir), root)
    return cli_all(jobs)


# Each damage through one command (alternating, to bound the processes started); page damage and a half-created
# file through both.
DAMAGE_CASES = [
    *((damage, list(COMMANDS)[i % 2]) for i, damage in enumerate(DAMAGES)),
    ("damaged_pages", "report"),
    ("half_created", "resume"),
]


@pytest.mark.parametrize(("damage", "command"), DAMAGE_CASES)
def test_damaged_results_file_is_refused(damage, command, damaged_results):
    out = damaged_results[damage, command]
    assert_refused(out, "report" if command == "report" else "bench", *DAMAGES[damage][1])


# --- resuming with other settings ----------------------------------------------------------------------------


def test_resume_refuses_other_settings_and_accepts_the_stored_ones(short_run, tmp_path):
    other, same = snapshot(short_run.dir, tmp_path / "other"), snapshot(short_run.dir, tmp_path / "same")
    outs = cli_all(
        {
            "other": (("bench", "--resume", other, "--methods", "tova:0.5", "--lengths", "500", *QUIET), tmp_path),
            "same": (("bench", "--resume", same, "--samples", "4", *QUIET), tmp_path),
        }
    )
    assert_refused(outs["other"], "bench", "methods", "lengths", "--extend")
    assert read_rows(other) == short_run.rows
    assert_ok(outs["same"])
    assert rows_written(outs["same"]) == 0
    assert read_rows(same) == short_run.rows


def test_resume_extend_adds_a_method_and_keeps_the_stored_rows(short_run, tmp_path):
    run_dir = snapshot(short_run.dir, tmp_path / "run")
    out = cli("bench", "--resume", run_dir, "--extend", "--methods", "tova:0.5", *QUIET, cwd=tmp_path)
    assert_ok(out)
    rows = read_rows(run_dir)
    assert {key: rows.get(key) for key in short_run.rows} == short_run.rows
    added = set(rows) - set(short_run.rows)
    assert len(added) == rows_written(out) == 4, sorted(added)
    old_methods = {key[0] for key in short_run.rows}
    assert all(key[0].startswith("tova") and key[0] not in old_methods for key in added), sorted(added)


# --- one writer per run ----------------------------------------------------------------------------------------


def test_second_writer_is_refused_with_the_first_ones_pid(long_run, tmp_path):
    first = start("bench", *LONG, *QUIET, "--out", "runs", cwd=tmp_path)
    try:
        run_dir = wait_for_run(first, tmp_path / "runs", min_rows=1)
        # Paused while the second process tries, so the first is certainly still writing (it holds its lock).
        first.send_signal(signal.SIGSTOP)
        try:
            second = cli("bench", "--resume", run_dir, *QUIET, cwd=tmp_path)
        finally:
            first.send_signal(signal.SIGCONT)
        done = finish(first)
    finally:
        stop(first)
    assert_refused(second, "bench", "being written by another contextlab process", f"PID {first.pid}")
    assert_ok(done)
    assert rows_written(done) == LONG_ROWS
    after = cli("bench", "--resume", run_dir, *QUIET, cwd=tmp_path)
    assert_ok(after)
    assert rows_written(after) == 0
    assert read_rows(run_dir) == long_run.rows


def test_two_new_runs_at_once_get_two_folders(tmp_path):
    procs = [start("bench", *SHORT, *QUIET, "--out", "runs", cwd=tmp_path) for _ in range(2)]
    try:
        outs = [finish(proc) for proc in procs]
    finally:
        for proc in procs:
            stop(proc)
    for out in outs:
        assert_ok(out)
        assert "exists already" not in out.stderr
    folders = run_folders(tmp_path / "runs")
    assert len(folders) == 2, folders
    assert {Path(SUMMARY.search(out.stdout)["dir"]).name for out in outs} == {f.name for f in folders}
    first, second = (read_rows(f) for f in folders)
    assert len(first) == SHORT_ROWS and first == second


# --- interrupted runs ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_gives_the_uninterrupted_rows(long_run, tmp_path):
    def kill_and_resume(seed: int):
        # A random point of the run whatever the machine's speed: once a random number of rows is stored
        # (0: as soon as the results file appears), a random fraction of a batch later.
        rng = random.Random(seed)
        after_rows, then = rng.randint(0, LONG_ROWS - 4), rng.uniform(0.0, 0.25)
        cwd = tmp_path / f"seed-{seed}"
        cwd.mkdir()
        proc = start("bench", *LONG, *QUIET, "--out", "runs", cwd=cwd)
        try:
            run_dir = wait_for_run(proc, cwd / "runs", min_rows=after_rows)
            time.sleep(then)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=TIMEOUT)
        finally:
            stop(proc)
        killed = proc.returncode == -signal.SIGKILL
        assert killed or proc.returncode == 0, f"seed {seed}: exit {proc.returncode}"
        stored = count_rows(run_dir)
        resumed = cli("bench", "--resume", run_dir, *QUIET, cwd=cwd)
        where = f"seed {seed}: {'killed' if killed else 'finished'} {then:.2f}s after row {after_rows}, {stored} stored"
        return where, killed, stored, resumed, read_rows(run_dir)

    seeds = (0, 1, 2)
    with ThreadPoolExecutor(len(seeds)) as pool:
        outcomes = list(pool.map(kill_and_resume, seeds))
    for where, _, stored, resumed, rows in outcomes:
        assert_ok(resumed)
        assert rows_written(resumed) == LONG_ROWS - stored, where
        assert len(rows) == LONG_ROWS and rows == long_run.rows, where
    assert any(killed and stored < LONG_ROWS for _, killed, stored, _, _ in outcomes), "no kill landed mid-run"


def test_sigterm_stops_a_run_with_the_resume_command(long_run, tmp_path):
    proc = start("bench", *LONG, *QUIET, "--out", "runs", cwd=tmp_path)
    try:
        run_dir = wait_for_run(proc, tmp_path / "runs", min_rows=1)
        proc.send_signal(signal.SIGTERM)
        stopped = finish(proc)
    finally:
        stop(proc)
    assert stopped.returncode == 130, shown(stopped)
    for fragment in ("resume with", "contextlab bench --resume"):
        assert fragment in stopped.stderr, shown(stopped)
    assert "Traceback" not in stopped.stderr, shown(stopped)
    stored = count_rows(run_dir)
    resumed = cli("bench", "--resume", run_dir, *QUIET, cwd=tmp_path)
    assert_ok(resumed)
    assert rows_written(resumed) == LONG_ROWS - stored
    assert read_rows(run_dir) == long_run.rows


# --- what the command line shows -------------------------------------------------------------------------------


def test_progress_lines_when_stderr_is_not_a_terminal(short_run, long_run):
    lines = [line for line in short_run.stderr.splitlines() if PROGRESS.search(line)]
    assert lines, short_run.stderr
    assert f"{SHORT_ROWS}/{SHORT_ROWS} samples (100%)" in lines[-1], lines
    assert not PROGRESS.search(long_run.stderr), long_run.stderr  # --quiet


def test_methods_at_80_columns_keeps_urls_whole(tmp_path):
    from contextlab.methods.spec import list_methods

    out = cli("methods", "--width", "80", cwd=tmp_path)
    assert_ok(out)
    lines = out.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    assert "``" not in out.stdout
    urls = {url for info in list_methods() for url in re.findall(r"https://arxiv\.org/abs/\d{4}\.\d{4,5}", info.paper)}
    assert urls
    for url in sorted(urls):
        assert any(url in line for line in lines), f"{url} is not whole on one line"
