"""Start or resume a run: validate, load, store, execute (in process or on Ray), with a progress bar."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import torch

from contextlab.bench.endpoint import EndpointClient
from contextlab.bench.lock import RunLock
from contextlab.bench.progress import progress_display
from contextlab.bench.row import ResultRow
from contextlab.bench.runner import (
    RunContext,
    RunSummary,
    check_budgets,
    check_memory_fits,
    check_window,
    environment,
    execute_local,
    pending_indices,
    plan_cells,
)
from contextlab.bench.spec import RunSpec, resumed_spec
from contextlab.bench.store import RunStore, StoreError
from contextlab.engine.resources import check_device
from contextlab.loading import load, resolve

EXECUTORS = ("local", "ray")


def new_run_dir(out_root: str | Path, spec: RunSpec) -> Path:
    """A fresh folder ``<stamp>-<spec digest>`` under ``out_root``, created here (``-2``, ``-3``... when two runs
    of one spec start in the same second, so concurrent launches never share a folder)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    digest = hashlib.sha256(spec.to_json().encode()).hexdigest()[:6]
    base = Path(out_root) / f"{stamp}-{digest}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        run_dir = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise StoreError(f"cannot create a run folder next to {base}: 999 runs of this spec started this second")


def _link_latest(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(run_dir.name)
    except OSError:  # filesystems without symlinks, or a concurrent launch relinked it first
        pass


def run_benchmark(
    spec: RunSpec | None = None,
    *,
    out_root: str | Path = "runs",
    resume: str | Path | None = None,
    changes: dict | None = None,
    extend: bool = False,
    executor: str = "local",
    workers: int = 1,
    show_progress: bool = True,
) -> RunSummary:
    """Run ``spec`` into a new folder under ``out_root``, or continue the run at ``resume``.

    On resume, ``changes`` holds settings passed again (field -> value): they must match the stored spec,
    except that ``extend=True`` lets them add methods, tasks or lengths (see :func:`resumed_spec`). One
    process writes a run at a time (:class:`RunLock`); a second is refused naming the first's PID."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    with ExitStack() as held:
        store = None
        if resume is not None:
            store = RunStore.open(resume)
            held.callback(store.close)
            held.enter_context(RunLock(store.run_dir))
            stored = store.spec()
            spec = resumed_spec(stored, changes or {}, extend)
        else:
            spec = spec or RunSpec()  # a RunSpec is checked when built
        return _run(spec, store, out_root, executor, workers, show_progress, held)


def _local_context(spec: RunSpec) -> tuple[RunContext, dict]:
    """Load the model and check that every cell fits it (window, budgets, memory)."""
    check_device(spec.device)
    model, tokenizer = load(spec.model, device=spec.device or ("cuda" if torch.cuda.is_available() else None))
    device = next(model.parameters()).device
    check_window(model, spec)
    check_budgets(spec)
    check_memory_fits(model, spec)
    env = environment(model, device)
    versions = f"torch {env['torch']}, transformers {env['transformers']}, contextlab {env['contextlab']}"
    return RunContext(model, tokenizer, spec, env["device"], versions), env


def _endpoint_context(spec: RunSpec, held: ExitStack) -> tuple[RunContext, dict]:
    """Check the endpoint serves the model and load the tokenizer that builds the prompts (no model)."""
    from transformers import AutoTokenizer

    import contextlab

    client = EndpointClient(spec.endpoint, spec.model)
    held.callback(client.close)
    served = client.check()
    check_budgets(spec)
    tokenizer = AutoTokenizer.from_pretrained(resolve(spec.tokenizer or spec.model))
    env = {
        "endpoint": spec.endpoint,
        "served_model": served,
        "tokenizer": spec.tokenizer or spec.model,
        "contextlab": contextlab.__version__,
        "device": f"endpoint {spec.endpoint}",
    }
    versions = f"endpoint {spec.endpoint} ({spec.model}), contextlab {contextlab.__version__}"
    return RunContext(None, tokenizer, spec, env["device"], versions, client=client), env


def _run(spec, store, out_root, executor, workers, show_progress, held: ExitStack) -> RunSummary:
    if spec.endpoint is not None and executor != "local":
        raise ValueError("endpoint runs use the local executor (the server does the work); drop --executor ray")
    ctx, env = _endpoint_context(spec, held) if spec.endpoint is not None else _local_context(spec)
    start, written = time.perf_counter(), 0
    done = store.done_keys() if store is not None else set()
    # Samples are built before a new run's folder exists, so a bad task (missing dataset file...) leaves nothing.
    work = [(cell, pending_indices(cell, ctx.task_samples(cell.task, cell.length), done)) for cell in plan_cells(spec)]
    total = sum(len(indices) for _, indices in work)
    if store is None:
        run_dir = new_run_dir(out_root, spec)
        held.enter_context(RunLock(run_dir))
        store = RunStore.create(run_dir, spec, env)
        held.callback(store.close)
        _link_latest(run_dir)
    elif store.spec() != spec:
        store.replace_spec(spec)  # --extend: the grown spec is checked above before it is recorded

    def write(rows: list[ResultRow]) -> None:
        nonlocal written
        store.add_rows(rows)
        written += len(rows)

    try:
        with progress_display(show_progress) as progress:
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
            f"`contextlab bench --resume {store.run_dir}`",
            file=sys.stderr,
        )
        raise
    return RunSummary(
        run_dir=str(store.run_dir),
        rows_written=written,
        wall_seconds=time.perf_counter() - start,
        generation_seconds=ctx.generation_seconds,
    )
