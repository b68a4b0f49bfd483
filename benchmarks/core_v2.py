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
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
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
WARMUP_TOKENS = 1024


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
@dataclass
class Decoder:
    """One greedy decoding path: its cache, last logits ``[1, V]``, next position, and the attention context
    the model must be in to use that cache."""

    cache: object
    logits: torch.Tensor
    position: int
    attention: Callable[[], AbstractContextManager]


def contextlab_decoder(model, tokenizer, ids: list[int], steps: int) -> Decoder:
    done = cl.prefill(model, tokenizer, ids, method="full")
    done.cache.reserve(steps)  # what cl.generate does before decoding
    return Decoder(done.cache, done.last_logits, len(ids), lambda: cl.attention_enabled(model))


def cat_path_decoder(model, ids: list[int], device: str) -> Decoder:
    model.set_attn_implementation("sdpa")  # outside cl.attention_enabled the model stays on sdpa
    cache = DynamicCache(config=model.config)
    prompt = torch.tensor([ids], device=device)  # [1, S]
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    return Decoder(cache, out.logits[:, -1], len(ids), nullcontext)


def timed_step(model, decoder: Decoder, device: str) -> float:
    """Pick the next token greedily and feed it; seconds taken (argmax + one single-token forward)."""
    with torch.inference_mode(), decoder.attention():
        synchronize(device)
        start = time.perf_counter()
        token = decoder.logits.argmax(dim=-1, keepdim=True)  # [1, 1]
        positions = torch.tensor([[decoder.position]], device=device)
        out = model(input_ids=token, position_ids=positions, use_cache=True, **{cache_kwarg(model): decoder.cache})
        decoder.logits = out.logits[:, -1]
        synchronize(device)
        decoder.position += 1
        return time.perf_counter() - start


def interleaved_steps(model, decoders: dict[str, Decoder], steps: int, device: str) -> dict[str, list[float]]:
    """Seconds per step of every path, one step of each in turn, so load from other processes hits all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(steps):
        for name, decoder in decoders.items():
            seconds[name].append(timed_step(model, decoder, device))
    return seconds


def step_window(seconds: list[float], first: int, last: int) -> dict:
    """Median and mean ms of the steps feeding generated tokens ``first``..``last`` (1-based, inclusive)."""
    window = [1000 * s for s in seconds[first - 1 : last]]
    return {"from": first, "to": last, "median_ms": statistics.median(window), "mean_ms": statistics.mean(window)}


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
        "late_over_early_median": late["median_ms"] / early["median_ms"],
        "late_over_early_mean": late["mean_ms"] / early["mean_ms"],
        "total_decode_s": sum(seconds),
        "step_ms": [round(1000 * s, 3) for s in seconds],
    }


def run_decode(model, tokenizer, settings: Settings, device: str) -> list[dict]:
    rows = []
    for context, steps in settings.decode:
        ids = random_ids(context)
        decoders = {
            "contextlab full": contextlab_decoder(model, tokenizer, ids, steps),
            "cat path (DynamicCache)": cat_path_decoder(model, ids, device),
        }
        for name, seconds in interleaved_steps(model, decoders, steps, device).items():
            rows.append(decode_row(name, context, seconds))
            r = rows[-1]
            print(
                f"decode {context:>6} {name:<24} token {EARLY[0]}-{EARLY[1]}: {r['early']['median_ms']:.2f} ms  "
                f"token ~{r['late_token']}: {r['late']['median_ms']:.2f} ms  x{r['late_over_early_median']:.2f}",
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


def prefill_call(model, tokenizer, ids: list[int], spec: str, samples: list[float]) -> Callable[[], None]:
    """A prefill under ``spec`` that records the library's own prefill seconds in ``samples``."""

    def call() -> None:
        samples.append(cl.prefill(model, tokenizer, ids, method=spec).seconds)

    return call


def run_timing(model, tokenizer, plan: dict[int, list[str]], repeats: int, device: str) -> list[dict]:
    """Round-robin medians per length. Each method is warmed once on a short prompt instead of a warm-up
    round at full length, which would cost as much as a repeat."""
    for spec in {s for specs in plan.values() for s in specs}:
        cl.prefill(model, tokenizer, random_ids(WARMUP_TOKENS), method=spec)
    rows = []
    for length, specs in plan.items():
        ids = random_ids(length)
        samples: dict[str, list[float]] = {s: [] for s in specs}
        calls = {s: prefill_call(model, tokenizer, ids, s, samples[s]) for s in specs}
        medians = interleaved_medians(calls, repeats=repeats, warmup=0, device=device)
        for spec in specs[1:]:
            ratio = medians[spec] / medians["full"]
            rows.append(
                {"length": length, "method": spec, "seconds": medians[spec], "full_seconds": medians["full"]}
                | {"time_ratio": ratio, "overhead_pct": 100 * (ratio - 1)}
                | {"runs_s": samples[spec], "full_runs_s": samples["full"]}
            )
            print(f"time {length:>6} {spec:<32} {medians[spec]:.3f}s vs full {medians['full']:.3f}s", flush=True)
    return rows


# -- report --------------------------------------------------------------------------------------------------
def decode_table(rows: list[dict]) -> str:
    out = [
        "| cached tokens | path | generated | ms/token, tokens 5-15 | late tokens | ms/token, late | late / early "
        "| late / early (means) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['context']} | {r['path']} | {r['generated']} | {r['early']['median_ms']:.2f} | "
            f"{r['late']['from']}-{r['late']['to']} | {r['late']['median_ms']:.2f} | "
            f"{r['late_over_early_median']:.2f} | {r['late_over_early_mean']:.2f} |"
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
    out = [
        "| prompt | method | prefill s | full s | time / full | overhead | runs, method (s) | runs, full (s) |",
        "|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        runs, full_runs = (" / ".join(f"{x:.2f}" for x in r[key]) for key in ("runs_s", "full_runs_s"))
        out.append(
            f"| {r['length']} | {r['method']} | {r['seconds']:.3f} | {r['full_seconds']:.3f} | "
            f"{r['time_ratio']:.3f} | {r['overhead_pct']:+.1f}% | {runs} | {full_runs} |"
        )
    return "\n".join(out)


def header(args: argparse.Namespace, settings: Settings, run: dict) -> str:
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return (
        "# Core v2: in-place decode, chunked-prefill memory, prefill overheads\n\n"
        "Model: random-weight Llama (`benchmarks.prefill_overhead.small_model`), 4 layers, hidden 256, "
        f"4 query / 1 KV heads, {args.dtype}, on {args.device} ({device_name}, {torch.get_num_threads()} threads). "
        f"torch {torch.__version__}, transformers {transformers.__version__}. {run['date']}. "
        f"Wall time {run['wall_s']:.0f} s; load average (1 min) {run['load_start']:.2f} at start, "
        f"{run['load_end']:.2f} at end (other processes share these cores).{' Quick run.' if args.quick else ''}\n\n"
        f"Settings: `{settings}`\n"
    )


DECODE_NOTE = (
    "Per-step wall time (perf_counter around argmax + one single-token forward); each cell is the median over "
    "its window of steps (the last column uses means instead). The two paths run one step each in turn, so "
    "load from other processes hits both alike. contextlab: `cl.prefill(method='full')`, "
    "`cache.reserve(generated)` as `cl.generate` does, then one token at a time under `cl.attention_enabled`. "
    "Cat path: the same model on sdpa with `transformers.DynamicCache`. Fewer tokens are generated at the "
    "longest context to keep the run short, so its 'late' window is the last one generated, not token ~1000; "
    "past 32768 positions the random model runs beyond max_position_embeddings, which changes nothing in cost."
)


def report(args: argparse.Namespace, settings: Settings, results: dict[str, list[dict]], run: dict) -> str:
    parts = [header(args, settings, run)]
    if "decode" in results:
        parts += ["## Decode: ms per token, in-place store vs cat path\n", DECODE_NOTE + "\n"]
        parts += [decode_table(results["decode"])]
    if "peak" in results:
        parts += ["\n## Prefill peak KV bytes (peak bytes allocated by the cache's stores)\n"]
        parts += [peak_table(results["peak"])]
    if "timing" in results:
        parts += [f"\n## Prefill time against `full` (round-robin medians of {settings.repeats})\n"]
        parts += [timing_table(results["timing"])]
    return "\n".join(parts) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="short lengths and few tokens, for a smoke run")
    parser.add_argument(
        "--chunked-lengths", type=int, nargs="+", help="prompt lengths of the chunked section (default 16384 32768)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json")
    return parser.parse_args()


def run_sections(model, tokenizer, settings: Settings, args: argparse.Namespace) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    if "decode" in args.sections:
        results["decode"] = run_decode(model, tokenizer, settings, args.device)
    if "peak" in args.sections:
        results["peak"] = run_peak(model, tokenizer, settings)
    plan = timing_plan(settings, args.sections)
    if plan:
        results["timing"] = run_timing(model, tokenizer, plan, settings.repeats, args.device)
    return results


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = QUICK_RUN if args.quick else FULL_RUN
    if args.chunked_lengths:
        settings = replace(settings, chunked_lengths=tuple(args.chunked_lengths))
    print(f"settings: {settings}", flush=True)
    model, tokenizer = small_model(args.device, getattr(torch, args.dtype)), build_byte_tokenizer()
    run = {"date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "load_start": os.getloadavg()[0]}
    start = time.perf_counter()
    results = run_sections(model, tokenizer, settings, args)
    run |= {"wall_s": time.perf_counter() - start, "load_end": os.getloadavg()[0]}
    text = report(args, settings, results, run)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"core_v2_{args.device.split(':')[0]}"
    (args.out / f"{stem}.md").write_text(text)
    payload = {"settings": asdict(settings), "threads": torch.get_num_threads(), "run": run, "results": results}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
