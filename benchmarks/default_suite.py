#!/usr/bin/env python
"""The main job, timed: ``contextlab bench`` with no arguments (what ``make bench`` runs), its wall time
against the 10-minute target on 2 CPU cores, and the report's summary table.

    python benchmarks/default_suite.py [--out runs]

Writes benchmarks/results/default_suite.md. Run it on an otherwise idle machine (it measures time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchmarks._accuracy import markdown

RESULTS = Path(__file__).parent / "results"
TARGET_SECONDS = 600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs")
    args = parser.parse_args()
    command = [str(Path(sys.executable).parent / "contextlab"), "bench", "--out", args.out, "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    print(done.stdout)
    report = next(line.split("report: ", 1)[1] for line in done.stdout.splitlines() if line.startswith("report: "))
    summary = json.loads((Path(report).parent / "summary.json").read_text())
    rows = [
        [
            s["method"],
            s["budget"],
            f"{s['accuracy']:.2f}",
            f"[{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]",
            str(s["n"]),
            f"{s['kv_ratio']:.2f}",
            f"{s['prefill_seconds']:.2f}",
            f"{s['decode_ms_per_token']:.1f}",
        ]
        for s in summary
    ]
    head = ["method", "budget", "accuracy", "95% Wilson", "n", "KV / full", "prefill s", "decode ms/token"]
    verdict = "within" if seconds <= TARGET_SECONDS else "OVER"
    text = (
        f"# The main job (`make bench` = `contextlab bench`), timed\n\n"
        f"Wall time: **{seconds:.0f} s** ({verdict} the {TARGET_SECONDS} s target), model load and report "
        f"included. Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}.\n\n"
        f"{markdown(head, rows)}\n"
    )
    (RESULTS / "default_suite.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
