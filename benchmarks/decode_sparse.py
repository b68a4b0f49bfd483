#!/usr/bin/env python
"""Decode-time sparse reads on SmolLM2-135M-Instruct (8K window): accuracy at a 1/8 budget, what each step
reads, and decode speed.

1. ``accuracy``: RULER single needle (``niah_single_2``), multi-key (``niah_multikey_1``) and multi-query
   (``niah_multiquery``) at 4K and 8K tokens, needles at 10-90% depth: full attention, every sparse reader
   at 1/8 of the prompt, and SnapKV (the prefill eviction that keeps the same 1/8). The question is in the
   prompt, so the first answer token comes from the prompt's full forward (as in the papers); the rest of
   the answer is decoded with the sparse reads.
2. ``shared``: SCBench-style shared context (``scbench_kv``, 4 questions about 8 needles on one cache, in
   turns): each later question is fed after the answers, so what prefill eviction dropped for the first
   question is gone for the next; the sparse readers keep every token. Score: mean over turns.
3. ``speed``: one 32K-token prompt per method, then 32 decode steps: milliseconds per step (median, after
   the first), bytes each step reads from the cache (all layers: the slots read and what choosing them
   read), bytes InfLLM copies from host memory per step with ``offload=cpu``, and KV bytes held.

4. ``capture``: why a reader misses. On the first samples of the single-needle cell, at every decode step of
   every layer that selects, the share of full attention's weight (each query head's softmax over the whole
   cache, averaged over heads) that falls on the slots the reader read; a step that reads everything counts
   1. Reported per method: the mean, the worst layer's mean, and the share of layer steps that read
   everything.

Every cell also reports the mean bytes a decode step read (``GenerationResult.read_bytes_per_step``).

Each cell is saved to ``benchmarks/results/decode_sparse.json`` when it finishes and not run again (delete
the file to start over).

    PYTHONPATH=. python benchmarks/decode_sparse.py [--sections accuracy shared speed] [--samples 40]
        [--lengths 4096 8192] [--tasks niah_single_2 ...] [--methods full snapkv ...] [--speed-length 32768]
        [--capture-samples 8] [--threads N] [--extra-methods SPEC ...] [--weights bf16|fp32]

Writes benchmarks/results/decode_sparse.md (and .json).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import random
import statistics
import time
from pathlib import Path
from unittest import mock

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

import contextlab as cl
from contextlab.bench.metrics import METRIC_FUNCTIONS
from contextlab.hf.layer import ContextlabLayer
from contextlab.methods.policy import LayerPolicy
from contextlab.methods.sparse import attention_mass

RESULTS = Path(__file__).parent / "results"
STORE = RESULTS / "decode_sparse.json"
TASKS = ("niah_single_2", "niah_multikey_1", "niah_multiquery")
NEW_TOKENS = 32  # SmolLM2-Instruct often restates the question before the number


def methods(length: int) -> list[str]:
    """Full attention, each sparse reader at 1/8 of a ``length``-token prompt, and SnapKV keeping 1/8."""
    eighth = length // 8
    return [
        "full",
        "quest:0.875",
        "quest:0.875,page=4",
        "tokenselect:0.875",
        "recycled:0.875",
        "recycled:0.875,similar=0.8",
        "recycled:0.875,follow=true",
        f"infllm:budget={eighth},block=64,local={length // 16}",
        f"retrieval:budget={eighth}",
        "snapkv:0.875",
    ]


def speed_methods(length: int) -> list[str]:
    """The readers of :func:`methods` (SnapKV's decode reads what it kept: nothing to time) and InfLLM with its
    memory blocks in host memory (on a CPU-only machine the copies cost time and save nothing)."""
    readers = methods(length)[:-1]
    infllm = next(spec for spec in readers if spec.startswith("infllm"))
    return [*readers, f"{infllm},offload=cpu"]


def needle_items(tok, task: str, length: int, n: int, seed: int = 11):
    rng = random.Random(seed)
    return samples(tok, task, length, n, seed=seed + length, depths=[0.1 + 0.8 * rng.random() for _ in range(n)])


def accuracy_cell(model, tok, spec: str, items) -> dict:
    scores, seconds, read = [], 0.0, 0.0
    for s in items:
        start = time.perf_counter()
        out = cl.generate(model, tok, s.context_ids, s.question_ids, method=spec, max_new_tokens=NEW_TOKENS)
        seconds += time.perf_counter() - start
        read += out.read_bytes_per_step
        scores.append(METRIC_FUNCTIONS[s.metric](out.text, s.answers))
    return {"scores": scores, "seconds": seconds / len(items), "read_bytes": read / len(items)}


def shared_cell(model, tok, spec: str, items) -> dict:
    """Every turn of every sample on one session per sample; a sample's score is its turns' mean."""
    scores, turn_scores, seconds, read = [], [], 0.0, 0.0
    for s in items:
        start = time.perf_counter()
        session = cl.Session(model, tok, s.context_ids, s.question_ids, method=spec, mode="turns")
        marks = []
        for turn in s.all_turns:
            answer = session.ask(turn.question_ids, max_new_tokens=NEW_TOKENS)
            marks.append(METRIC_FUNCTIONS[turn.metric](answer.texts[0], turn.answers))
        seconds += time.perf_counter() - start
        read += session.state.cache.read_bytes_per_step()
        scores.append(sum(marks) / len(marks))
        turn_scores.append(marks)
    by_turn = [sum(t[i] for t in turn_scores) / len(turn_scores) for i in range(len(turn_scores[0]))]
    return {"scores": scores, "by_turn": by_turn, "seconds": seconds / len(items), "read_bytes": read / len(items)}


class Capture:
    """While active, records per (layer, decode step) of every selecting layer the share of full attention's
    weight that the step's read plan covers (1.0 for a step that reads everything)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float, bool]] = []  # (layer, share read, whether it read everything)

    def __enter__(self) -> Capture:
        record = self.steps
        plan_read, full_read = ContextlabLayer._attend_plan, ContextlabLayer._attend_groups

        def with_plan(layer, query, plan, scaling):
            keys = layer.store.groups[0].span(0, layer.store.length)[0]
            heads = keys.shape[1]
            share = attention_mass(query[:, :, 0], keys, None, scaling) / (query.shape[1] // heads)  # [B, H, S]
            read = plan.covers(share.shape[-1])
            record.append((layer.layer_idx, float((share * read).sum(-1).mean()), False))
            return plan_read(layer, query, plan, scaling)

        def everything(layer, query, scaling):
            if query.shape[2] == 1 and type(layer.policy) is not LayerPolicy:  # a selecting layer's full step
                record.append((layer.layer_idx, 1.0, True))
            return full_read(layer, query, scaling)

        self._patches = [
            mock.patch.object(ContextlabLayer, "_attend_plan", with_plan),
            mock.patch.object(ContextlabLayer, "_attend_groups", everything),
        ]
        for patch in self._patches:
            patch.start()
        return self

    def __exit__(self, *exc) -> None:
        for patch in self._patches:
            patch.stop()


def capture_cell(model, tok, spec: str, items) -> dict:
    scores, capture = [], Capture()
    with capture:
        for s in items:
            out = cl.generate(model, tok, s.context_ids, s.question_ids, method=spec, max_new_tokens=NEW_TOKENS)
            scores.append(METRIC_FUNCTIONS[s.metric](out.text, s.answers))
    layers: dict[int, list[float]] = {}
    for layer, share, _ in capture.steps:
        layers.setdefault(layer, []).append(share)
    means = {layer: statistics.fmean(v) for layer, v in sorted(layers.items())}
    worst = min(means, key=means.get)
    return {
        "scores": scores,
        "capture": statistics.fmean(share for _, share, _ in capture.steps),
        "worst_layer": [worst, means[worst]],
        "per_layer": means,
        "full_steps": sum(full for _, _, full in capture.steps) / len(capture.steps),
    }


def speed_cell(model, tok, spec: str, item) -> dict:
    """Prefill the prompt (with its question) once, then time each decode step through the token stream.
    The prompt may pass the model's window: the answer is not scored here, only the work per step. On a
    CPU-only machine offloading would be a no-op (host and device memory are one); it is forced on here so
    the bytes it copies per step are counted."""
    if "offload=" in spec and not torch.cuda.is_available():
        with mock.patch("contextlab.store.offload.separate_memory", lambda device, host: True):
            return _timed(model, tok, spec, item)
    return _timed(model, tok, spec, item)


def _timed(model, tok, spec: str, item) -> dict:
    start = time.perf_counter()
    session = cl.Session(
        model,
        tok,
        item.context_ids,
        item.question_ids,
        method=spec,
        max_total_tokens=NEW_TOKENS,
        allow_beyond_window=True,
    )
    prefill = time.perf_counter() - start
    cache = session.state.cache
    stamps: list[float] = []
    moved: list[int] = []  # host -> device bytes so far, at each token (only decode steps between two)

    def tick(_) -> None:
        stamps.append(time.perf_counter())
        moved.append(sum(getattr(layer.store, "moved_bytes", 0) for layer in cache.compressible))

    session.ask(item.question_ids, max_new_tokens=NEW_TOKENS, on_tokens=tick)
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "ms_per_step": 1000 * statistics.median(steps) if steps else None,
        "steps": len(steps),
        "read_bytes": cache.read_bytes_per_step(),
        "moved_bytes": (moved[-1] - moved[0]) / len(steps) if steps else 0.0,
        "simulated_offload": "offload=" in spec and not torch.cuda.is_available(),
        "kv_bytes": cache.kv_bytes(),
        "prefill_s": prefill,
    }


def accuracy_table(store: dict, section: str) -> str:
    head = ["task", "tokens", "weights", "method", "accuracy", "95% CI", "n", "vs full, same samples"]
    head += ["s per answer", "MiB read per step"]
    rows = []
    for key, r in sorted(store.items(), key=lambda kv: row_order(kv[0])):
        field, task, length, spec = key.split("|")
        name, weights = section_of(field)
        if name != section:
            continue
        extra = f" (turns: {', '.join(f'{x:.2f}' for x in r['by_turn'])})" if "by_turn" in r else ""
        rows.append(
            [
                task,
                length,
                weights,
                spec,
                *score_columns(r["scores"], extra),
                versus_full(store, key, r["scores"]),
                f"{r['seconds']:.1f}",
                f"{r['read_bytes'] / 2**20:.2f}",
            ]
        )
    return markdown(head, rows)


def speed_table(store: dict) -> str:
    head = [
        "method",
        "tokens",
        "weights",
        "ms per decode step",
        "vs full",
        "MiB read per step",
        "read vs full",
        "MiB host -> device per step",
        "KV MiB held",
    ]
    cells = [(k.split("|"), r) for k, r in store.items() if section_of(k.split("|")[0])[0] == "speed"]
    fulls = {(parts[0], parts[2]): r for parts, r in cells if parts[3] == "full"}
    rows = []
    for (field, _, length, spec), r in cells:
        full, ms = fulls.get((field, length), {}), r["ms_per_step"]
        # on a CPU-only machine offloading is forced on: its copies are host -> host, its time not a GPU's
        label = f"{spec} (offload simulated on CPU)" if r.get("simulated_offload") else spec
        rows.append(
            [
                label,
                length,
                section_of(field)[1],
                f"{ms:.1f}" if ms else "-",
                f"{ms / full['ms_per_step']:.2f}x" if ms and full.get("ms_per_step") else "-",
                f"{r['read_bytes'] / 2**20:.2f}",
                f"{r['read_bytes'] / full['read_bytes']:.3f}" if full.get("read_bytes") else "-",
                f"{r['moved_bytes'] / 2**20:.2f}" if r["moved_bytes"] else "-",
                f"{r['kv_bytes'] / 2**20:.1f}",
            ]
        )
    return markdown(head, rows)


def capture_table(store: dict) -> str:
    head = ["task", "tokens", "weights", "method", "answered", "weight read (mean)", "worst layer"]
    head += ["layer steps reading all"]
    rows = []
    for key, r in sorted(store.items(), key=lambda kv: row_order(kv[0])):
        field, task, length, spec = key.split("|")
        name, weights = section_of(field)
        if name == "capture":
            layer, share = r["worst_layer"]
            answered = f"{int(sum(r['scores']))}/{len(r['scores'])}"
            shares = [f"{r['capture']:.3f}", f"{layer}: {share:.3f}", f"{r['full_steps']:.2f}"]
            rows.append([task, length, weights, spec, answered, *shares])
    return markdown(head, rows)


def report(store: dict, threads: int) -> str:
    return "\n\n".join(
        [
            "# Decode-time sparse reads on SmolLM2-135M-Instruct (native window 8192)",
            f"CPU: {cpu_name()}, {threads} threads, torch {torch.__version__}; weights in bf16, or fp32 where the "
            "`weights` column says so (`--weights fp32`: cells kept apart, each compared with full attention in its "
            "own dtype); batch 1, greedy, "
            f"{NEW_TOKENS} new tokens. Accuracy: the task's metric, mean with a Wilson 95% interval. Produced by "
            "`PYTHONPATH=. python benchmarks/decode_sparse.py`. Budgets: 1/8 of the prompt for every reader "
            "(`:0.875` reads 1/8 of the cached tokens per step) and for SnapKV (keeps 1/8). " + PAIRED_NOTE,
            "## RULER needles, 1/8 budget",
            accuracy_table(store, "accuracy"),
            "## Shared context (scbench_kv, 4 questions in turns on one cache), 1/8 budget",
            accuracy_table(store, "shared"),
            "## Decode speed and reads",
            speed_table(store),
            "Each speed cell prefilled the 32K prompt once and timed the decode steps after the first, on one "
            "thread, while one other single-thread benchmark ran on the machine's second core. Cells whose "
            "decode steps overlapped a test run were measured again (the table shows the quiet values), except "
            "the two recycled rows: measured again after a byte-accounting fix (2026-12-06) while the test "
            "suite and another benchmark shared the 2 cores, so their milliseconds are not comparable with the "
            "other rows; their bytes are exact.",
            "## What the readers read of full attention's weight (single needle, first samples)",
            capture_table(store),
            "Weight read: at each decode step of each layer that selects, the share of full attention's softmax "
            "weight (over the whole cache, averaged over query heads) on the slots the reader read; a step "
            "that reads everything counts 1. Worst layer: the layer with the lowest mean. Quest leaves its first "
            "two layers dense (not counted); the others select in every layer.",
            f"Platform: {platform.platform()}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=["accuracy", "shared", "speed", "capture"])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--speed-length", type=int, default=32768)
    parser.add_argument("--capture-samples", type=int, default=8, help="samples of the capture section")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="accuracy tasks to run")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="run only these methods (names, e.g. full snapkv tokenselect)"
    )
    parser.add_argument(
        "--extra-methods",
        nargs="+",
        default=[],
        type=method_spec,
        help="method specs run after the default ones (e.g. quest:0.875,page=8), in every section",
    )
    weights_argument(parser)
    args = parser.parse_args()

    def chosen(specs: list[str]) -> list[str]:
        return [s for s in specs if args.methods is None or s.split(":")[0] in args.methods] + args.extra_methods

    def key(section: str, task: str, length: int, spec: str) -> str:
        return cell_key(section, args.weights, task, length, spec)

    torch.set_num_threads(args.threads)
    cells = CellStore(STORE)
    store = cells.data
    model, tok = load_smollm2(args.weights)
    for section in args.sections:
        if section == "accuracy":
            for task in args.tasks:
                for length in args.lengths:
                    items = needle_items(tok, task, length, args.samples)
                    for spec in chosen(methods(length)):
                        cells.run(key("accuracy", task, length, spec), accuracy_cell, model, tok, spec, items)
        elif section == "shared":
            for length in args.lengths:
                items = samples(tok, "scbench_kv", length, args.samples, seed=7 + length)
                for spec in chosen(methods(length)):
                    cells.run(key("shared", "scbench_kv", length, spec), shared_cell, model, tok, spec, items)
        elif section == "capture":
            items = needle_items(tok, "niah_single_2", 4096, args.samples)[: args.capture_samples]
            for spec in chosen(methods(4096)[1:-1]):  # the readers
                cells.run(key("capture", "niah_single_2", 4096, spec), capture_cell, model, tok, spec, items)
        elif section == "speed":
            length = args.speed_length
            item = needle_items(tok, "niah_single_2", length, 1)[0]
            for spec in chosen(speed_methods(length)):
                cells.run(key("speed", "niah_single_2", length, spec), speed_cell, model, tok, spec, item)
        else:
            raise SystemExit(f"unknown section {section!r}")
    out = RESULTS / "decode_sparse.md"
    out.write_text(report(store, args.threads) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
