#!/usr/bin/env python
"""Prefill + compression time over full-attention prefill time, and KV bytes over full, per method.

Measured side by side in one run (round-robin, median of 5) on a small random-weight Llama at 4K and 16K
tokens. Target: compression overhead <= 10% of prefill for every method but h2o (which recomputes the
attention of every prompt query by design).

    python benchmarks/prefill_overhead.py [--lengths 4096 16384] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import contextlab as cl
from contextlab.bench.timing import interleaved_medians
from contextlab.reference.tokenizer import build_byte_tokenizer

METHODS = [
    "full",
    "streaming:0.5",
    "snapkv:0.5",
    "pyramidkv:0.5",
    "tova:0.5",
    "h2o:0.5",
    "knorm:0.5",
    "random:0.5",
    "adakv:0.5",
]
RESULTS = Path(__file__).parent / "results"


def small_model(device: str, dtype: torch.dtype) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=264,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=32768,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def run(lengths: list[int], repeats: int, device: str, dtype: torch.dtype) -> list[dict]:
    model, tokenizer = small_model(device, dtype), build_byte_tokenizer()
    rows = []
    for length in lengths:
        ids = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        calls = {spec: (lambda spec=spec, ids=ids: cl.prefill(model, tokenizer, ids, method=spec)) for spec in METHODS}
        medians = interleaved_medians(calls, repeats=repeats, device=device)
        full_bytes = cl.prefill(model, tokenizer, ids).cache.kv_bytes()
        for spec in METHODS:
            kv = cl.prefill(model, tokenizer, ids, method=spec).cache.kv_bytes()
            rows.append(
                {
                    "length": length,
                    "method": spec,
                    "seconds": medians[spec],
                    "time_ratio": medians[spec] / medians["full"],
                    "kv_ratio": kv / full_bytes,
                }
            )
            print(
                f"{length:>6} {spec:<14} {medians[spec]:8.3f}s  x{rows[-1]['time_ratio']:.3f}  "
                f"kv {rows[-1]['kv_ratio']:.3f}",
                flush=True,
            )
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| length | method | prefill s (median) | time / full | overhead | kv bytes / full |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['length']} | {r['method']} | {r['seconds']:.3f} | {r['time_ratio']:.3f} | "
            f"{100 * (r['time_ratio'] - 1):+.1f}% | {r['kv_ratio']:.3f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args()
    rows = run(args.lengths, args.repeats, args.device, getattr(torch, args.dtype))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    header = (
        f"# Prefill overhead\n\nModel: random-weight Llama, 4 layers, hidden 256, 4 query / 1 KV heads, "
        f"{args.dtype}, on {args.device} ({device_name}, {torch.get_num_threads()} threads). "
        f"Median of {args.repeats} round-robin runs.\n\n"
    )
    text = header + table(rows) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = f"prefill_overhead_{args.device.split(':')[0]}"
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
