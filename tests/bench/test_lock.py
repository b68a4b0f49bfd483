"""One writer per run folder, and progress as log lines when stderr is not a terminal."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from contextlab.bench.lock import LOCK_FILE, RunLock, RunLockedError
from contextlab.bench.progress import LogProgress, progress_display

fcntl = pytest.importorskip("fcntl")


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(RunLockedError, match=rf"another contextlab process \(PID {os.getpid()}\)"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released on exit: the next writer gets it
        pass


def test_a_lock_dies_with_its_process(tmp_path):
    # A holder killed without cleanup (kill -9) leaves the file behind but not the lock.
    code = f"from contextlab.bench.lock import RunLock; RunLock({str(tmp_path)!r}).acquire(); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path):
        pass


def test_log_progress_prints_a_line_per_twentieth_and_the_end():
    stream = io.StringIO()
    display = progress_display(True, stream)
    assert isinstance(display, LogProgress)
    with display as progress:
        task = progress.add_task("run x", total=40)
        for _ in range(40):
            progress.advance(task, 1)
    lines = stream.getvalue().splitlines()
    counts = [int(re.match(r"run x: (\d+)/40 samples", line).group(1)) for line in lines]
    assert counts == list(range(0, 41, 2))  # the start, every 2 samples (40 // 20), the end
    assert lines[-1].startswith("run x: 40/40 samples (100%)") and "eta" not in lines[-1]
    assert "eta" in lines[1]


def test_log_progress_also_prints_after_a_quiet_stretch(monkeypatch):
    clock = iter([0.0, 0.0, 31.0, 31.0, 40.0, 40.0])
    monkeypatch.setattr("contextlab.bench.progress.time.monotonic", lambda: next(clock))
    stream = io.StringIO()
    progress = LogProgress(stream)
    task = progress.add_task("run y", total=1000)
    progress.advance(task, 1)  # 31 s after the last line: printed although far from a twentieth
    progress.advance(task, 1)  # 9 s later: not yet
    assert [line.split(":")[1].split()[0] for line in stream.getvalue().splitlines()] == ["0/1000", "1/1000"]


def test_quiet_shows_nothing():
    stream = io.StringIO()
    with progress_display(False, stream) as progress:
        progress.advance(progress.add_task("run z", total=3), 3)
    assert stream.getvalue() == ""
