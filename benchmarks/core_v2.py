#!/usr/bin/env python
"""Core v2, side by side in one run on a small random-weight Llama (float32 CPU, 2 threads by default).

Sections (``--sections`` picks a subset):

- decode:  ms per decoded token early (~token 10) and late (~token 1000) at 1K, 8K and 32K cached tokens,
           contextlab ``full`` (preallocated store written in place) vs the cat path (stock ``DynamicCache``
           + sdpa, which grows by ``torch.cat`` every token). Target: late / early <= 1.2 for contextlab at 8K.
- peak:    peak KV bytes during prefill over the full prompt's KV bytes, snapkv:0.75 unchunked vs chunked
           (prefill_chunk=1024 and 512), at 16K and 32K. Target: chunked <= 0.30x.
- chunked: prefill time of snapkv:0.75,prefill_chunk=1024 vs full at 16K and 32K. Target: <= +10%.
- h2o:     prefill time of h2o:0.5 vs full at 4K and 16K. Target: <= +50% at 16K.

Prefill times are round-robin medians (one call of each method per round); sections chunked and h2o share
the rounds at a length they both measure.

    PYTHONPATH=. python benchmarks/core_v2.py [--sections decode peak chunked h2o] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from benchmarks.prefill_overhead import small_model
from transformers import DynamicCache

import contextlab as cl
from contextlab.bench.timing import interleaved_medians, synchronize
from contextlab.hf.compat import cache_kwarg
from contextlab.reference.tokenizer import build_byte_tokenizer

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("decode", "peak", "chunked", "h2o")
SNAPKV = "snapkv:0.75"
CHUNKED = "snapkv:0.75,prefill_chunk=1024"
H2O = "h2o:0.5"
EARLY = (5, 15)  # decode steps averaged as "token ~10" (inclusive)
LATE_HALF_WIDTH = 5  # "late" = the last 2 * this + 1 steps, centred on (generated - this)


@dataclass(frozen=True)
class Settings:
    """Lengths per section. ``decode``: (cached tokens, tokens generated) pairs."""

    decode: tuple[tuple[int, int], ...]
    peak_lengths: tuple[int, ...]
    chunks: tuple[int, ...]
    chunked_lengths: tuple[int, ...]
    h2o_lengths: tuple[int, ...]
    repeats: int


FULL_RUN = Settings(
    decode=((1024, 1005), (8192, 1005), (32768, 205)),
    peak_lengths=(16384, 32768),
    chunks=(1024, 512),
    chunked_lengths=(16384, 32768),
    h2o_lengths=(4096, 16384),
    repeats=3,
)
QUICK_RUN = Settings(
    decode=((512, 105), (2048, 105)),
    peak_lengths=(4096,),
    chunks=(1024, 512),
    chunked_lengths=(4096,),
    h2o_lengths=(2048, 4096),
    repeats=2,
)


def random_ids(length: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(length)).tolist()


# -- 1. decode: per-token time, in-place store vs cat path ---------------------------------------------------
def timed_greedy(model, cache, logits: torch.Tensor, position: int, steps: int, device: str) -> list[float]:
    """Greedy-decode ``steps`` tokens one forward at a time from ``logits [1, V]``; seconds per step.
    Step ``k`` (0-based) feeds generated token ``k + 1`` at position ``position + k``."""
    kwargs = {cache_kwarg(model): cache}
    seconds = []
    for step in range(steps):
        synchronize(device)
        start = time.perf_counter()
        token = logits.argmax(dim=-1, keepdim=True)  # [1, 1]
        positions = torch.tensor([[position + step]], device=device)
        logits = model(input_ids=token, position_ids=positions, use_cache=True, **kwargs).logits[:, -1]
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def contextlab_steps(model, tokenizer, ids: list[int], steps: int, device: str) -> list[float]:
    done = cl.prefill(model, tokenizer, ids, method="full")
    done.cache.reserve(steps)  # what cl.generate does before decoding
    with torch.inference_mode(), cl.attention_enabled(model):
        return timed_greedy(model, done.cache, done.last_logits, len(ids), steps, device)


def cat_path_steps(model, ids: list[int], steps: int, device: str) -> list[float]:
    model.set_attn_implementation("sdpa")
    cache = DynamicCache(config=model.config)
    prompt = torch.tensor([ids], device=device)  # [1, S]
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
        return timed_greedy(model, cache, out.logits[:, -1], len(ids), steps, device)


def step_window(seconds: list[float], first: int, last: int) -> dict:
    """Mean and median ms of the steps feeding generated tokens ``first``..``last`` (1-based, inclusive)."""
    window = [1000 * s for s in seconds[first - 1 : last]]
    return {"from": first, "to": last, "mean_ms": statistics.mean(window), "median_ms": statistics.median(window)}


def decode_row(path: str, context: int, seconds: list[float]) -> dict:
    centre = len(seconds) - LATE_HALF_WIDTH
    early = step_window(seconds, *EARLY)
    late = step_window(seconds, centre - LATE_HALF_WIDTH, centre + LATE_HALF_WIDTH)
    return {
        "context": context,
        "path": path,
        "generated": len(seconds),
        "late_token": centre,
        "early": early,
        "late": late,
        "late_over_early": late["mean_ms"] / early["mean_ms"],
        "total_decode_s": sum(seconds),
    }


def run_decode(model, tokenizer, settings: Settings, device: str) -> list[dict]:
    rows = []
    for context, steps in settings.decode:
        ids = random_ids(context)
        rows.append(decode_row("contextlab full", context, contextlab_steps(model, tokenizer, ids, steps, device)))
        rows.append(decode_row("cat path (DynamicCache)", context, cat_path_steps(model, ids, steps, device)))
        for r in rows[-2:]:
            print(
                f"decode {context:>6} {r['path']:<24} token {EARLY[0]}-{EARLY[1]}: {r['early']['mean_ms']:.2f} ms  "
                f"token ~{r['late_token']}: {r['late']['mean_ms']:.2f} ms  x{r['late_over_early']:.2f}",
                flush=True,
            )
    return rows


# -- 2. peak KV bytes during prefill -------------------------------------------------------------------------
def run_peak(model, tokenizer, settings: Settings) -> list[dict]:
    rows = []
    specs = ["full", SNAPKV, *(f"{SNAPKV},prefill_chunk={c}" for c in settings.chunks)]
    for length in settings.peak_lengths:
        ids = random_ids(length)
        full_bytes = cl.prefill(model, tokenizer, ids, method="full").cache.kv_bytes()
        for spec in specs:
            cache = cl.prefill(model, tokenizer, ids, method=spec).cache
            rows.append(
                {
                    "length": length,
                    "method": spec,
                    "full_kv_bytes": full_bytes,
                    "peak_bytes": cache.peak_bytes,
                    "kv_bytes": cache.kv_bytes(),
                    "peak_over_full": cache.peak_bytes / full_bytes,
                    "kept_over_full": cache.kv_bytes() / full_bytes,
                }
            )
            print(f"peak {length:>6} {spec:<32} peak x{rows[-1]['peak_over_full']:.3f}", flush=True)
    return rows


# -- 3 + 4. prefill time against full ------------------------------------------------------------------------
def timing_plan(settings: Settings, sections: list[str]) -> dict[int, list[str]]:
    """Methods to time at each length (full always), so sections sharing a length share its rounds."""
    plan: dict[int, list[str]] = {}
    wanted = {"chunked": (settings.chunked_lengths, CHUNKED), "h2o": (settings.h2o_lengths, H2O)}
    for section, (lengths, spec) in wanted.items():
        if section in sections:
            for length in lengths:
                plan.setdefault(length, ["full"]).append(spec)
    return dict(sorted(plan.items()))


def run_timing(model, tokenizer, plan: dict[int, list[str]], repeats: int, device: str) -> list[dict]:
    rows = []
    for length, specs in plan.items():
        ids = random_ids(length)
        calls = {s: (lambda s=s, ids=ids: cl.prefill(model, tokenizer, ids, method=s)) for s in specs}
        medians = interleaved_medians(calls, repeats=repeats, device=device)
        for spec in specs[1:]:
            ratio = medians[spec] / medians["full"]
            rows.append(
                {"length": length, "method": spec, "seconds": medians[spec], "full_seconds": medians["full"]}
                | {"time_ratio": ratio, "overhead_pct": 100 * (ratio - 1)}
            )
            print(f"time {length:>6} {spec:<32} {medians[spec]:.3f}s vs full {medians['full']:.3f}s", flush=True)
    return rows


# -- report --------------------------------------------------------------------------------------------------
def decode_table(rows: list[dict]) -> str:
    out = [
        "| cached tokens | path | generated | ms/token, tokens 5-15 | late tokens | ms/token, late | late / early |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['context']} | {r['path']} | {r['generated']} | {r['early']['mean_ms']:.2f} | "
            f"{r['late']['from']}-{r['late']['to']} | {r['late']['mean_ms']:.2f} | {r['late_over_early']:.2f} |"
        )
    return "\n".join(out)


def peak_table(rows: list[dict]) -> str:
    out = [
        "| prompt | method | full-prompt KV MiB | peak MiB | peak / full | kept / full |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['length']} | {r['method']} | {r['full_kv_bytes'] / 2**20:.1f} | {r['peak_bytes'] / 2**20:.1f} | "
            f"{r['peak_over_full']:.3f} | {r['kept_over_full']:.3f} |"
        )
    return "\n".join(out)


def timing_table(rows: list[dict]) -> str:
    out = ["| prompt | method | prefill s | full s | time / full | overhead |", "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r['length']} | {r['method']} | {r['seconds']:.3f} | {r['full_seconds']:.3f} | "
            f"{r['time_ratio']:.3f} | {r['overhead_pct']:+.1f}% |"
        )
    return "\n".join(out)


def header(args: argparse.Namespace, settings: Settings) -> str:
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return (
        "# Core v2: in-place decode, chunked-prefill memory, prefill overheads\n\n"
        "Model: random-weight Llama (`benchmarks.prefill_overhead.small_model`), 4 layers, hidden 256, "
        f"4 query / 1 KV heads, {args.dtype}, on {args.device} ({device_name}, {torch.get_num_threads()} threads). "
        f"torch {torch.__version__}, transformers {transformers.__version__}. "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.{' Quick run.' if args.quick else ''}\n"
    )


DECODE_NOTE = (
    "Per-step wall time (perf_counter around argmax + one single-token forward), mean over the window. "
    "contextlab: `cl.prefill(method='full')`, `cache.reserve(generated)` as `cl.generate` does, then one "
    "token at a time under `cl.attention_enabled`. Cat path: same model on sdpa with `transformers.DynamicCache`. "
    "Fewer tokens are generated at the longest context to keep the run short, so its 'late' is the last "
    "window generated, not token ~1000; past 32768 positions the random model runs beyond "
    "max_position_embeddings, which changes nothing in cost."
)


def report(args: argparse.Namespace, settings: Settings, results: dict[str, list[dict]]) -> str:
    parts = [header(args, settings)]
    if "decode" in results:
        parts += [
            "## Decode: ms per token, in-place store vs cat path\n",
            DECODE_NOTE + "\n",
            decode_table(results["decode"]),
        ]
    if "peak" in results:
        parts += [
            "\n## Prefill peak KV bytes (peak bytes allocated by the cache's stores)\n",
            peak_table(results["peak"]),
        ]
    if "timing" in results:
        parts += [
            f"\n## Prefill time against `full` (round-robin medians of {settings.repeats})\n",
            timing_table(results["timing"]),
        ]
    return "\n".join(parts) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="short lengths and few tokens, for a smoke run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = QUICK_RUN if args.quick else FULL_RUN
    print(f"settings: {settings}", flush=True)
    model, tokenizer = small_model(args.device, getattr(torch, args.dtype)), build_byte_tokenizer()
    start = time.perf_counter()
    results: dict[str, list[dict]] = {}
    if "decode" in args.sections:
        results["decode"] = run_decode(model, tokenizer, settings, args.device)
    if "peak" in args.sections:
        results["peak"] = run_peak(model, tokenizer, settings)
    plan = timing_plan(settings, args.sections)
    if plan:
        results["timing"] = run_timing(model, tokenizer, plan, settings.repeats, args.device)
    print(f"wall time: {time.perf_counter() - start:.0f}s", flush=True)
    text = report(args, settings, results)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = f"core_v2_{args.device.split(':')[0]}{'_quick' if args.quick else ''}"
    (RESULTS / f"{stem}.md").write_text(text)
    payload = {"settings": asdict(settings), "threads": torch.get_num_threads(), "results": results}
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
