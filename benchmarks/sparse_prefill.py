#!/usr/bin/env python
"""Sparse prefill (minference) and head-level hybrids (duo) on SmolLM2-135M-Instruct (8K window): accuracy
against full attention, prefill time against SDPA in the same run, and KV bytes.

1. ``accuracy``: RULER single needle (``niah_single_2``), multi-key (``niah_multikey_1``) and variable
   tracking (``vt``) at 4K and 8K tokens (7936: the window less room for the question and answer), needles
   at 10-90% depth: full attention, ``minference`` and ``duo`` (half the KV heads streaming) at their
   defaults (``--methods`` takes other specs too); the task's metric with a Wilson interval and the KV bytes
   held after the prompt.
2. ``speed``: one prompt of 16K and one of 32K tokens (past the window: only the work is measured, not the
   answer), prefilled by each method; seconds of prefill (median of ``--repeats``) and the ratio to full
   attention measured in the same run. Profiles are loaded (or measured) before timing, and one untimed call
   compiles flex attention for the length (``--no-warmup``: the first timed call includes it, ~5 s).
3. ``heads``: which KV heads ``duo`` keeps whole, set beside the copy heads of the Retrieval Head paper (Wu
   et al., 2024, arXiv 2404.15574) on the first ``--head-samples`` 4K multi-key prompts: with the answer
   forced after the question, a query head copies an answer token when its strongest attention lands on the
   same token inside a needle; its retrieval score is the share of answer tokens it copies (a KV head: the
   most of its query heads). A check of duo's profile (which scores heads by output change, not by copying).

Profiles go to the profile folder (``$CONTEXTLAB_PROFILES`` or ``~/.cache/contextlab/profiles``); each cell
is saved to ``benchmarks/results/sparse_prefill.json`` when it finishes and not run again.

    PYTHONPATH=. python benchmarks/sparse_prefill.py [--sections accuracy speed heads] [--samples 40]
        [--lengths 4096 7936] [--speed-lengths 16384 32768] [--repeats 3] [--no-warmup] [--threads N]
        [--weights bf16|fp32] [--head-samples 8]

Writes benchmarks/results/sparse_prefill.md (and .json).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from benchmarks._accuracy import (
    PAIRED_NOTE,
    CellStore,
    cell_key,
    load_smollm2,
    markdown,
    method_spec,
    row_order,
    samples,
    score_columns,
    section_of,
    versus_full,
    weights_argument,
)
from benchmarks._machine import cpu_name
from transformers import DynamicCache

import contextlab as cl
from contextlab.bench.metrics import METRIC_FUNCTIONS
from contextlab.hf.compat import attn_implementation, cache_kwarg
from contextlab.kernels.sparse_prefill import flex_compilations
from contextlab.methods.sparse_prefill import bound_profile, score_heads

RESULTS = Path(__file__).parent / "results"
STORE = RESULTS / "sparse_prefill.json"
TASKS = ("niah_single_2", "niah_multikey_1", "vt")
METHODS = ("full", "minference", "duo")
NEW_TOKENS = {"vt": 64}  # variable tracking names several variables; needles: 32 (the model restates first)


def items(tok, task: str, length: int, n: int, seed: int = 17):
    rng = random.Random(seed)
    depths = None if task == "vt" else [0.1 + 0.8 * rng.random() for _ in range(n)]
    return samples(tok, task, length, n, seed=seed + length, depths=depths)


def accuracy_cell(model, tok, spec: str, task: str, cases) -> dict:
    scores, seconds, kv, full = [], 0.0, 0, 0
    for s in cases:
        start = time.perf_counter()
        out = cl.generate(
            model, tok, s.context_ids, s.question_ids, method=spec, max_new_tokens=NEW_TOKENS.get(task, 32)
        )
        seconds += time.perf_counter() - start
        kv, full = kv + out.kv_bytes, full + out.kv_bytes_full
        scores.append(METRIC_FUNCTIONS[s.metric](out.text, s.answers))
    threads = torch.get_num_threads()
    return {"scores": scores, "seconds": seconds / len(cases), "kv_share": kv / full, "threads": threads}


def speed_cell(model, tok, spec: str, case, repeats: int, warmup: bool) -> dict:
    """Prefill seconds (median of ``repeats``) of one long prompt. The method's profile is loaded (or
    measured) first, untimed; with ``warmup`` one untimed call compiles flex attention for this length
    (full attention needs none), else the first timed call includes that compilation."""
    method = cl.method(spec).bind(model, tok)

    def once() -> float:
        session = cl.Session(model, tok, case.context_ids, case.question_ids, method=method, allow_beyond_window=True)
        return session.prefill_seconds

    if warmup and spec != "full":
        once()
    before = flex_compilations()
    times = [once() for _ in range(repeats)]
    return {
        "prefill_s": statistics.median(times),
        "all_s": times,
        "tokens": len(case.context_ids),
        "warmup": warmup,
        "compiles_in_time": flex_compilations() - before,  # flex attention compilations inside the timed calls
        "threads": torch.get_num_threads(),
    }


def copy_scores(model, tok, cases) -> torch.Tensor:
    """``[layers, query heads]``: the share of answer tokens each query head copies (section 3 of the module
    docstring). The prompt goes in with SDPA; the forced answer with eager attention, whose weights are
    returned (only ``answer x prompt`` of them per layer)."""
    cfg = model.config
    hits, total = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads), 0
    before = attn_implementation(model)
    try:
        for s in cases:
            ids = s.context_ids + s.question_ids
            answer = tok(s.target, add_special_tokens=False)["input_ids"]
            tokens = torch.tensor(ids + answer)
            in_needle = torch.zeros(len(tokens), dtype=torch.bool)
            for start, end in s.needle_spans:
                in_needle[start:end] = True
            with torch.inference_mode():
                model.set_attn_implementation("sdpa")
                cache = {cache_kwarg(model): DynamicCache(config=model.config)}
                model(input_ids=torch.tensor([ids[:-1]]), use_cache=True, **cache)
                model.set_attn_implementation("eager")
                forced = torch.tensor([[ids[-1], *answer[:-1]]])  # row i predicts answer token i
                out = model(input_ids=forced, use_cache=True, output_attentions=True, **cache)
            want = torch.tensor(answer)
            for layer, weights in enumerate(out.attentions):  # [1, Hq, answer, prompt + answer]
                top = weights[0].argmax(-1)  # [Hq, answer]
                hits[layer] += (in_needle[top] & (tokens[top] == want)).float().sum(-1)
            total += len(answer)
    finally:
        model.set_attn_implementation(before)
    return hits / total


def heads_cell(model, tok, cases, spec: str = "duo") -> dict:
    """Per KV head: its copy score (the most of its query heads'), duo's score (``spec``) and whether duo
    streams it."""
    method = cl.method(spec)
    duo = bound_profile(method, model, tok, score_heads, "scores")
    streaming = method.with_scores(duo).streaming
    copy = copy_scores(model, tok, cases)
    kv = copy.view(len(duo), len(duo[0]), -1).amax(-1)
    return {
        "copy": kv.tolist(),
        "duo": duo,
        "streaming": [list(x) for x in streaming],
        "prompts": len(cases),
        "spec": spec,
    }


def heads_table(store: dict) -> str:
    parts = []
    for key, r in sorted(store.items()):
        field, task, length, _ = key.split("|")
        section, weights = section_of(field)
        if section != "heads":
            continue
        flagged = [
            (layer, head, c, r["duo"][layer][head], r["streaming"][layer][head])
            for layer, row in enumerate(r["copy"])
            for head, c in enumerate(row)
            if c > 0
        ]
        streamed = [f for f in flagged if f[4]]
        rows = [[f"{ly}.{h}", f"{c:.2f}", f"{d:.3f}", "streaming" if st else "whole"] for ly, h, c, d, st in flagged]
        parts.append(
            f"{task}, {length} tokens, {weights}, {r['prompts']} prompts: {len(flagged)} of "
            f"{len(r['copy']) * len(r['copy'][0])} KV heads copy at least once; `{r.get('spec', 'duo')}` keeps "
            f"{len(flagged) - len(streamed)} of them whole and streams {len(streamed)} "
            f"(copy scores {', '.join(f'{f[2]:.2f}' for f in streamed) or '-'}).\n\n"
            + markdown(["layer.KV head", "copy score", "duo score", "duo keeps"], rows)
        )
    return "\n\n".join(parts)


def accuracy_table(store: dict) -> str:
    head = ["task", "tokens", "weights", "method", "accuracy", "95% CI", "n", "vs full, same samples"]
    head += ["KV held vs full", "s per answer", "threads"]
    rows = []
    for key, r in sorted(store.items(), key=lambda kv: (*row_order(kv[0]), kv[0].split("|")[3])):
        field, task, length, spec = key.split("|")
        section, weights = section_of(field)
        if section != "accuracy":
            continue
        rows.append(
            [
                task,
                length,
                weights,
                spec,
                *score_columns(r["scores"]),
                versus_full(store, key, r["scores"]),
                f"{r['kv_share']:.2f}",
                f"{r['seconds']:.1f}",
                str(r.get("threads", "-")),
            ]
        )
    return markdown(head, rows)


def speed_table(store: dict) -> str:
    head = ["tokens", "weights", "method", "prefill s (median)", "runs", "vs full", "flex compilation", "threads"]
    cells = [(k.split("|"), r) for k, r in store.items() if section_of(k.split("|")[0])[0] == "speed"]
    full = {(parts[0], parts[2]): r["prefill_s"] for parts, r in cells if parts[3] == "full"}
    rows = []
    for parts, r in cells:
        base = full.get((parts[0], parts[2]))
        compiled = {0: "none in the time", 1: "one in the time"}.get(r.get("compiles_in_time", 0), "several")
        speedup = f"{base / r['prefill_s']:.2f}x" if base else "-"
        runs = str(len(r["all_s"]))
        weights = section_of(parts[0])[1]
        rows.append(
            [parts[2], weights, parts[3], f"{r['prefill_s']:.1f}", runs, speedup, compiled, str(r.get("threads", "-"))]
        )
    return markdown(head, rows)


def report(store: dict, threads: int) -> str:
    return "\n\n".join(
        [
            "# Sparse prefill and head-level hybrids on SmolLM2-135M-Instruct (native window 8192)",
            f"CPU: {cpu_name()}, torch {torch.__version__}; weights in bf16, or fp32 where the `weights` column "
            "says so (`--weights fp32`: cells kept apart, each compared with full attention in its own dtype); "
            "batch 1, greedy; torch threads per cell "
            "in the tables (cells that ran beside other work have inflated seconds; ratios come from cells run "
            "side by side). "
            "Accuracy: the task's metric, mean with a Wilson 95% interval. Produced by "
            "`PYTHONPATH=. python benchmarks/sparse_prefill.py`. Methods at their defaults, except rows whose spec "
            "names parameters (`duo:window=1024`: `--methods duo:window=1024`). " + PAIRED_NOTE,
            "## Accuracy and KV bytes",
            accuracy_table(store),
            "KV held vs full: the cells of the methods at their defaults ran when each kept slot's position took "
            "4 bytes (int32); positions now take 2 (int16) below 32768 tokens, which lowers duo's share a little "
            "(one 4K prompt measured again: 0.541 where the table says 0.543); the `duo:window=...` and "
            "`duo:calibration=...` rows ran with int16 positions.",
            "## Prefill time (speed-up = full attention's time / the method's, same run)",
            speed_table(store),
            "## Duo's whole heads and the copy heads (`--sections heads`)",
            heads_table(store) or "(not run)",
            f"Platform: {platform.platform()}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=["accuracy", "speed"])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 7936])  # 8K: room for question + answer
    parser.add_argument("--speed-lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-warmup", action="store_true", help="no untimed compile call before the timed ones")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), type=method_spec, help="method specs (default: %(default)s)"
    )
    parser.add_argument("--head-samples", type=int, default=8, help="multi-key prompts of the heads section")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    weights_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cells = CellStore(STORE)
    store = cells.data
    model, tok = load_smollm2(args.weights)
    for section in args.sections:
        if section == "accuracy":
            for length in args.lengths:  # every task at the shorter length first (the cheaper cells)
                for task in args.tasks:
                    cases = items(tok, task, length, args.samples)
                    for spec in args.methods:
                        key = cell_key("accuracy", args.weights, task, length, spec)
                        cells.run(key, accuracy_cell, model, tok, spec, task, cases)
        elif section == "speed":
            for length in args.speed_lengths:
                case = items(tok, "niah_single_2", length, 1)[0]
                for spec in args.methods:
                    key = cell_key("speed", args.weights, "niah_single_2", length, spec)
                    cells.run(key, speed_cell, model, tok, spec, case, args.repeats, not args.no_warmup)
        elif section == "heads":  # for each duo spec among --methods (none there: duo at its defaults)
            cases = items(tok, "niah_multikey_1", 4096, args.head_samples)
            for spec in [x for x in args.methods if x.split(":")[0] == "duo"] or ["duo"]:
                name = f"copy:{args.head_samples}" + ("" if spec == "duo" else f":{spec}")
                key = cell_key("heads", args.weights, "niah_multikey_1", 4096, name)
                cells.run(key, heads_cell, model, tok, cases, spec)
        else:
            raise SystemExit(f"unknown section {section!r}")
    out = RESULTS / "sparse_prefill.md"
    out.write_text(report(store, args.threads) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
