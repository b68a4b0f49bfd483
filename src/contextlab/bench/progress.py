"""Progress of a run: a live bar on a terminal, plain log lines when stderr goes to a file or a pipe.

A redirected run (``contextlab bench > run.log 2>&1``, a batch job, CI) would otherwise show nothing
between its first and last line for as long as it runs; there it prints one line per ``every`` finished
samples (a twentieth of the run) or every ``seconds`` (30), whichever comes first.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class LogProgress:
    """The two calls of ``rich.progress.Progress`` the runner uses, as log lines."""

    def __init__(self, stream: TextIO, seconds: float = 30.0) -> None:
        self.stream, self.seconds = stream, seconds
        self.description, self.total, self.done = "", 0, 0
        self.every, self.start, self.last_time, self.last_done = 1, 0.0, 0.0, 0

    def add_task(self, description: str, total: int) -> int:
        self.description, self.total = description, total
        self.every = max(1, total // 20)
        self.start = self.last_time = time.monotonic()
        self._line()
        return 0

    def advance(self, task: int, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.done - self.last_done >= self.every or now - self.last_time >= self.seconds or self.done == self.total:
            self._line()
            self.last_time, self.last_done = now, self.done

    def _line(self) -> None:
        elapsed = time.monotonic() - self.start
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = ""
        if 0 < self.done < self.total:
            eta = f", eta {_clock(elapsed / self.done * (self.total - self.done))}"
        print(
            f"{self.description}: {self.done}/{self.total} samples{share}, {_clock(elapsed)} elapsed{eta}",
            file=self.stream,
            flush=True,
        )

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None


def progress_display(enabled: bool, stream: TextIO | None = None) -> Progress | LogProgress:
    """A rich bar on stderr when it is a terminal, :class:`LogProgress` lines otherwise; nothing shown
    when not ``enabled`` (``--quiet``)."""
    stream = stream or sys.stderr
    if enabled and not stream.isatty():
        return LogProgress(stream)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("samples"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(file=stream),
        disable=not enabled,
    )


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
