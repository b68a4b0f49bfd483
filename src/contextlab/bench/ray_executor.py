"""Scale-out: cells as work items of Ray actors (one GPU each when GPUs exist), results stored by the driver.

Each actor loads the model once and runs whole cells; the driver writes every returned cell to the run's
SQLite file, so workers on other nodes need no access to it. Works on a local Ray instance or an existing
cluster (``RAY_ADDRESS``).
"""

from __future__ import annotations

from collections.abc import Callable

from contextlab.bench.row import ResultRow
from contextlab.bench.runner import Cell, RunContext, run_cell
from contextlab.bench.spec import RunSpec


class CellWorker:
    """Holds one model; runs cells of a run (becomes a Ray actor)."""

    def __init__(self, spec_json: str, device_name: str, versions: str) -> None:
        import torch

        from contextlab.loading import load

        spec = RunSpec.from_json(spec_json)
        device = spec.device or ("cuda" if torch.cuda.is_available() else None)
        model, tokenizer = load(spec.model, device=device)
        self.ctx = RunContext(model=model, tokenizer=tokenizer, spec=spec, device_name=device_name, versions=versions)

    def run(self, cell: Cell, indices: list[int]) -> list[ResultRow]:
        return [row for rows in run_cell(self.ctx, cell, indices) for row in rows]


def execute_ray(
    spec: RunSpec,
    work: list[tuple[Cell, list[int]]],
    write: Callable[[list[ResultRow]], None],
    advance: Callable[[int], None],
    *,
    workers: int = 1,
    address: str | None = None,
    device_name: str = "ray",
    versions: str = "",
) -> None:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise ValueError("the ray executor needs Ray: pip install 'ray>=2.9'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actor = ray.remote(num_gpus=1, num_cpus=1)(CellWorker) if gpus else ray.remote(num_cpus=1)(CellWorker)
        count = gpus or max(1, workers)
        pool = ActorPool([actor.remote(spec.to_json(), device_name, versions) for _ in range(count)])
        todo = [(cell, indices) for cell, indices in work if indices]
        for rows in pool.map_unordered(lambda a, item: a.run.remote(*item), todo):
            write(rows)
            advance(len({r.sample_index for r in rows}))
    finally:
        if started_here:
            ray.shutdown()
