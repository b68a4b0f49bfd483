"""``contextlab eval-reference`` and ``contextlab train-reference``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(parsers: list, helps: dict, command) -> None:
    parsers.append(("eval-reference", _eval_args))
    helps["eval-reference"] = "accuracy table of the reference model (the model card's numbers)"
    parsers.append(("train-reference", _train_args))
    helps["train-reference"] = "train (or resume) the reference model"
    command("eval-reference")(_eval)
    command("train-reference")(_train)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="reference", help="model folder (default: the bundled reference model)")
    p.add_argument("--samples", type=int, default=50, help="samples per task and length (depths 0..100%%)")
    p.add_argument("--method", default="full")
    p.add_argument("--max-length", type=int, default=16384, help="skip lengths above this")
    p.add_argument("--out", default=None, help="write the table (markdown) and cells (JSON) here")
    p.add_argument(
        "--card-from",
        default=None,
        help="training workdir: also write MODEL_CARD.md (+ loss curve, log) into the model folder",
    )


def _eval(args: argparse.Namespace) -> int:
    import torch

    from contextlab.loading import load
    from contextlab.reference.data import kjv_split
    from contextlab.reference.evaluate import CARD_CELLS, card_table, evaluate_cell, perplexity

    torch.manual_seed(0)
    model, tokenizer = load(args.model, dtype=torch.float32)
    cells, start = [], time.perf_counter()
    for label, task, params, lengths in CARD_CELLS:
        for length in (n for n in lengths if n <= args.max_length):
            cell = evaluate_cell(
                model,
                tokenizer,
                task,
                length,
                samples=args.samples,
                params=params,
                method=args.method,
                label=label,
            )
            print(f"{label:<28} {length:>6}: {100 * cell.accuracy:5.1f}% (n={cell.samples})", flush=True)
            cells.append(cell)
    ppl = perplexity(model, tokenizer, kjv_split()[1])
    table = card_table(cells)
    summary = f"{table}\n\nHeld-out KJV perplexity (bytes, 1K windows): {ppl:.3f}\n"
    print(summary)
    print(f"evaluated in {time.perf_counter() - start:.0f}s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "accuracy.md").write_text(summary)
        (out / "accuracy.json").write_text(
            json.dumps({"perplexity": ppl, "cells": [c.__dict__ | {"ci95": c.ci95} for c in cells]}, indent=2)
        )
        if args.card_from:
            from contextlab.loading import resolve
            from contextlab.reference.card import publish

            print(f"model card: {publish(resolve(args.model), args.card_from, out / 'accuracy.json')}")
    elif args.card_from:
        raise ValueError("--card-from needs --out (the card is written from the saved evaluation)")
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", help="cpu, cpu-long (after cpu: --init-from), gpu or smoke")
    p.add_argument("--workdir", required=True, help="checkpoints and log.jsonl go here; rerun to resume")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--init-from", default=None, help="start from the last checkpoint of this training workdir")
    p.add_argument("--export", default=None, help="folder to write the trained model and tokenizer to")
    p.add_argument("--export-only", action="store_true", help="export the workdir's last checkpoint, no training")


def _train(args: argparse.Namespace) -> int:
    from contextlab.reference.train import TrainConfig, export, export_checkpoint, train

    if args.export_only:
        if not args.export:
            raise ValueError("--export-only needs --export DIR")
        print(f"exported step {export_checkpoint(args.workdir, args.export)} to {args.export}")
        return 0
    cfg = TrainConfig.preset(args.preset)
    if args.steps:
        cfg.steps = args.steps
    if args.init_from:
        cfg.init_from = args.init_from
    if args.preset == "cpu-long" and not cfg.init_from:
        raise ValueError("--preset cpu-long continues a 'cpu' run: give --init-from WORKDIR")
    model = train(cfg, args.workdir)
    if args.export:
        export(model, args.export, cfg.steps)
    return 0
