#!/usr/bin/env python
"""The harness's own time as a share of a run's wall time (target: < 5%).

Runs a slice of the default suite on the reference model at the default suite's lengths and splits the wall time into
time inside generation (``generate`` / shared-context sessions) and everything else the harness does:
building samples, scoring, SQLite writes, progress. Model loading is excluded. Prints the table and
writes it to benchmarks/results/.

    python benchmarks/harness_overhead.py [--samples 5] [--model reference]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from contextlab.bench.run import run_benchmark
from contextlab.bench.spec import DEFAULT_LENGTHS, DEFAULT_TASKS, RunSpec

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reference")
    parser.add_argument("--samples", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for length in DEFAULT_LENGTHS:
        spec = RunSpec(
            model=args.model,
            methods=["full", "snapkv:0.5", "streaming:0.75"],
            tasks=list(DEFAULT_TASKS),
            lengths=[length],
            samples=args.samples,
        )
        with tempfile.TemporaryDirectory() as out:
            summary = run_benchmark(spec, out_root=out, show_progress=False)
        rows.append(
            {
                "length": length,
                "wall_seconds": summary.wall_seconds,
                "generation_seconds": summary.generation_seconds,
                "harness_share": summary.harness_share,
                "results": summary.rows_written,
            }
        )
        print(
            f"{length:>5} tokens: wall {summary.wall_seconds:6.1f}s, generation {summary.generation_seconds:6.1f}s, "
            f"harness {100 * summary.harness_share:.2f}%",
            flush=True,
        )
    table = ["| length | results | wall s | generation s | harness share |", "|---:|---:|---:|---:|---:|"]
    table += [
        f"| {r['length']} | {r['results']} | {r['wall_seconds']:.1f} | {r['generation_seconds']:.1f} | "
        f"{100 * r['harness_share']:.2f}% |"
        for r in rows
    ]
    text = "# Harness overhead\n\n" + "\n".join(table) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "harness_overhead.md").write_text(text)
    (RESULTS / "harness_overhead.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
