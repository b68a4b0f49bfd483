#!/usr/bin/env python
"""The seeds' qualitative findings, reproduced on a real model (SmolLM2-135M-Instruct, 8K window).

1. Question-aware SnapKV beats StreamingLLM on single-needle retrieval at 4K tokens (default; any lengths
   up to the 8K window with ``--lengths``) with needles at 25-75% depth and ratio 0.75 (SnapKV, Li et
   al. 2024; StreamingLLM keeps only sinks + the recent window, so a needle in the middle is evicted).
2. Question-agnostic compression (the context compressed before the question is seen: kvpress's protocol)
   loses to question-aware compression at the same budget (SnapKV's observation window holds the question).
3. Accuracy falls beyond the trained window with plain full attention (``allow_beyond_window``): the
   starting point for window extension (Self-Extend, LM-Infinite...).

Cells are scored with 95% Wilson intervals; "separated" means the intervals do not overlap.

    python benchmarks/real_model_findings.py [--model smollm2-135m-instruct] [--samples 20]
        [--lengths 4096] [--beyond 10240] [--threads N]

Writes benchmarks/results/real_model_findings.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
from benchmarks._accuracy import Cell, markdown, run_cell, samples

import contextlab as cl
from contextlab.bench.report import interval

RESULTS = Path(__file__).parent / "results"


def mid_depth_samples(tok, lengths: list[int], n: int, seed: int):
    """``n`` single needles per length at depths drawn uniformly from [0.25, 0.75] (fixed by ``seed``)."""
    rng = random.Random(seed)
    out = []
    for length in lengths:
        depths = [0.25 + 0.5 * rng.random() for _ in range(n)]
        out += samples(tok, "niah_single_2", length, n, seed=seed + length, depths=depths)
    return out


def separated(a: Cell, b: Cell) -> bool:
    sa, sb = interval(a.scores), interval(b.scores)
    return sa.low > sb.high or sb.low > sa.high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=40, help="needles per length")
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096])
    parser.add_argument("--beyond", nargs="*", type=int, default=[10240], help="lengths past the window")
    parser.add_argument("--beyond-samples", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--snapkv-params", default="", help="extra SnapKV parameters, e.g. kernel=31")
    parser.add_argument("--out", default=str(RESULTS / "real_model_findings"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tok = cl.load(args.model)
    window = model.config.max_position_embeddings
    items = mid_depth_samples(tok, args.lengths, args.samples, seed=0)
    r = args.ratio
    snap_spec = cl.method(f"snapkv:{r}" + (f",{args.snapkv_params}" if args.snapkv_params else "")).describe()
    cells = {
        "snapkv (question-aware)": run_cell(model, tok, "snapkv aware", snap_spec, items),
        "streaming": run_cell(model, tok, "streaming", f"streaming:{r}", items),
        "snapkv (question-agnostic)": run_cell(model, tok, "snapkv agnostic", snap_spec, items, question_aware=False),
    }
    for name, cell in cells.items():
        print(f"{name}: {sum(cell.scores):.0f}/{len(cell.scores)} ({cell.seconds:.0f}s)", flush=True)
    by_length = []
    for length in [args.lengths[0], *args.beyond]:  # full attention inside the window, then beyond it
        part = mid_depth_samples(tok, [length], args.beyond_samples, seed=1)
        cell = run_cell(model, tok, f"full @ {length}", "full", part, allow_beyond_window=length > window)
        by_length.append(cell)
        print(f"{cell.label}: {sum(cell.scores):.0f}/{len(cell.scores)}", flush=True)
    write(args, cells, by_length, window, time.perf_counter() - start)


def write(args, cells: dict[str, Cell], by_length: list[Cell], window: int, seconds: float) -> None:
    aware, stream, agnostic = cells["snapkv (question-aware)"], cells["streaming"], cells["snapkv (question-agnostic)"]
    findings = [
        ["question-aware SnapKV > StreamingLLM", _verdict(aware, stream)],
        ["question-aware SnapKV > question-agnostic SnapKV", _verdict(aware, agnostic)],
        [
            f"full attention falls beyond the {window}-token window",
            _verdict(by_length[0], by_length[-1]) if len(by_length) > 1 else "not measured",
        ],
    ]
    table = markdown(["cell", "accuracy", "95% Wilson", "n"], [[k, *c.row()[1:]] for k, c in cells.items()])
    lengths = markdown(["prompt tokens", "accuracy", "95% Wilson", "n"], [c.row() for c in by_length])
    text = (
        f"# Findings on a real model ({args.model}, window {window})\n\n"
        f"Single needle (niah_single_2, KJV haystack, chat template), depths uniform in [0.25, 0.75], "
        f"{args.samples} needles at each of {args.lengths} tokens; ratio {args.ratio} (fraction removed).\n"
        f"Machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{seconds / 60:.0f} min. Command: `python benchmarks/real_model_findings.py {' '.join(sys.argv[1:])}`\n\n"
        f"{markdown(['finding', 'result'], findings)}\n\n## Methods at ratio {args.ratio}\n\n{table}\n\n"
        f"## Full attention by length (beyond {window}: allow_beyond_window)\n\n{lengths}\n"
    )
    Path(args.out + ".md").write_text(text)
    record = {k: c.scores for k, c in cells.items()} | {c.label: c.scores for c in by_length}
    Path(args.out + ".json").write_text(json.dumps(record, indent=1))
    print(text)


def _verdict(a: Cell, b: Cell) -> str:
    sa, sb = interval(a.scores), interval(b.scores)
    state = "separated (intervals do not overlap)" if separated(a, b) else "NOT separated (intervals overlap)"
    return f"{sa.mean:.2f} vs {sb.mean:.2f}: {state}"


if __name__ == "__main__":
    main()
