#!/usr/bin/env python
"""Scorer defaults chosen on real models: accuracy of each scorer setting on a RULER-style single needle.

Grid (issue 14, point 5): SnapKV pooling kernel x observation window, PyramidKV kernel, AdaKV's SnapKV
kernel, H2O's recent fraction, at ratio 0.5 (and the candidates again at 0.75), on SmolLM2-135M-Instruct
(chat template) and Gemma-3-270M (base). Needles are written in KJV text at evenly spread depths; the
question is compressed with the context (question-aware, the SnapKV paper's setting).

    python benchmarks/defaults_sensitivity.py [--models smollm2-135m-instruct gemma3-270m] [--length 1024]
        [--samples 8]

Writes benchmarks/results/defaults_sensitivity.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from benchmarks._accuracy import markdown, run_cell, samples

import contextlab as cl

RESULTS = Path(__file__).parent / "results"


def grid(ratio: float, kernels=(7, 15, 31), windows=(16, 32, 64), recents=(0.1, 0.25, 0.5, 0.75)) -> list[str]:
    specs = [f"snapkv:{ratio},kernel={k},window={w}" for k in kernels for w in windows]
    specs += [f"pyramidkv:{ratio},kernel={k}" for k in kernels]
    specs += [f"adakv:{ratio},scorer=snapkv(kernel={k})" for k in kernels]
    specs += [f"h2o:{ratio},recent={r}" for r in recents]
    specs += [f"tova:{ratio}", f"streaming:{ratio}"]
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5])
    parser.add_argument("--kernels", nargs="+", type=int, default=[7, 15, 31])
    parser.add_argument("--windows", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--recents", nargs="+", type=float, default=[0.1, 0.25, 0.5, 0.75])
    parser.add_argument("--extra", nargs="*", default=[], help="more method specs to add to the grid")
    parser.add_argument("--out", default=str(RESULTS / "defaults_sensitivity"))
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict[str, list[dict]] = {}
    sections = []
    for name in args.models:
        model, tok = cl.load(name)
        items = samples(tok, "niah_single_2", args.length, args.samples, seed=0)
        grids = (grid(r, args.kernels, args.windows, args.recents) for r in args.ratios)
        specs = ["full", *(s for g in grids for s in g), *args.extra]
        cells = []
        for spec in specs:
            cell = run_cell(model, tok, spec, spec, items)
            cells.append(cell)
            print(f"{name} {spec}: {sum(cell.scores):.0f}/{len(cell.scores)} ({cell.seconds:.0f}s)", flush=True)
        results[name] = [{"method": c.label, "scores": c.scores, "seconds": round(c.seconds, 1)} for c in cells]
        table = markdown(["method", "accuracy", "95% Wilson", "n"], [c.row() for c in cells])
        sections.append(f"## {name}\n\n{table}\n")
        del model
    header = (
        f"# Scorer sensitivity on real models (niah_single_2, {args.length} tokens, {args.samples} needles at "
        f"even depths, question-aware)\n\nMachine: {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. "
        "Command: `python benchmarks/defaults_sensitivity.py " + " ".join(_argv()) + "`\n\n"
    )
    Path(args.out + ".md").write_text(header + "\n".join(sections))
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}.md")


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
