"""Start or resume a run: validate, load, store, execute (in process or on Ray), with a progress bar."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from contextlab.bench.row import ResultRow
from contextlab.bench.runner import (
    RunContext,
    RunSummary,
    check_budgets,
    check_window,
    environment,
    execute_local,
    pending_indices,
    plan_cells,
)
from contextlab.bench.spec import RunSpec
from contextlab.bench.store import RunStore
from contextlab.loading import load

EXECUTORS = ("local", "ray")


def new_run_dir(out_root: str | Path, spec: RunSpec) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    digest = hashlib.sha256(spec.to_json().encode()).hexdigest()[:6]
    return Path(out_root) / f"{stamp}-{digest}"


def _link_latest(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(run_dir.name)
    except OSError:  # filesystems without symlinks: the run is still there under its own name
        pass


def run_benchmark(
    spec: RunSpec | None = None,
    *,
    out_root: str | Path = "runs",
    resume: str | Path | None = None,
    executor: str = "local",
    workers: int = 1,
    show_progress: bool = True,
) -> RunSummary:
    """Run ``spec`` into a new folder under ``out_root``, or continue the run at ``resume``."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if resume is not None:
        store = RunStore.open(resume)
        spec = store.spec()
    else:
        spec = spec or RunSpec()  # a RunSpec is checked when built
        store = None
    model, tokenizer = load(spec.model, device=spec.device or ("cuda" if torch.cuda.is_available() else None))
    device = next(model.parameters()).device
    check_window(model, spec)
    check_budgets(spec)
    env = environment(model, device)
    ctx = RunContext(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        device_name=env["device"],
        versions=f"torch {env['torch']}, transformers {env['transformers']}, contextlab {env['contextlab']}",
    )
    start, written = time.perf_counter(), 0
    done = store.done_keys() if store is not None else set()
    # Samples are built before a new run's folder exists, so a bad task (missing dataset file...) leaves nothing.
    work = [(cell, pending_indices(cell, ctx.task_samples(cell.task, cell.length), done)) for cell in plan_cells(spec)]
    total = sum(len(indices) for _, indices in work)
    if store is None:
        run_dir = new_run_dir(out_root, spec)
        store = RunStore.create(run_dir, spec, env)
        _link_latest(run_dir)

    def write(rows: list[ResultRow]) -> None:
        nonlocal written
        store.add_rows(rows)
        written += len(rows)

    try:
        with _progress(show_progress) as progress:
            bar = progress.add_task(f"run {store.run_dir.name}", total=total)
            advance = lambda n: progress.advance(bar, n)  # noqa: E731
            if executor == "ray":
                from contextlab.bench.ray_executor import execute_ray

                execute_ray(
                    spec,
                    work,
                    write,
                    advance,
                    workers=workers,
                    address=os.environ.get("RAY_ADDRESS"),
                    device_name=ctx.device_name,
                    versions=ctx.versions,
                )
            else:
                execute_local(ctx, work, write, advance)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {written} rows are safe in {store.path}; resume with "
            f"`contextlab bench --resume {store.run_dir}`"
        )
        raise
    finally:
        store.close()
    return RunSummary(
        run_dir=str(store.run_dir),
        rows_written=written,
        wall_seconds=time.perf_counter() - start,
        generation_seconds=ctx.generation_seconds,
    )


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("samples"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not enabled,
    )
