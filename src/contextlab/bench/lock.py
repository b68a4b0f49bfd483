"""One writer per run folder: an OS file lock held for the life of the process that writes the results.

Two ``--resume`` of the same run at once would both do all the remaining work (SQLite keeps the rows
consistent, but the time is spent twice). The writer takes an exclusive ``flock`` on ``<run>/writer.lock``
and writes its PID there; a second writer is refused at once with that PID. The operating system releases
the lock when the holder exits, however it exits (``kill -9`` included), so a stale lock file never blocks
a resume. Readers (``contextlab report``) take no lock. Platforms without ``fcntl`` run unlocked.
"""

from __future__ import annotations

import os
from pathlib import Path

from contextlab.errors import ContextlabError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = "writer.lock"


class RunLockedError(ContextlabError):
    """Another process is writing this run."""


class RunLock:
    """Held from :meth:`acquire` until :meth:`release` (or the process ends)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> RunLock:
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise RunLockedError(
                    f"{self.path.parent} is being written by another contextlab process (PID {holder}); wait for "
                    "it to finish or stop it, then resume"
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
