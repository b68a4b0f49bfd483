#!/usr/bin/env python
"""Attention column sums (H2O scores): plain reference vs fast torch path (vs Triton on CUDA), side by side.

One run, round-robin, median of 3, at 4 query heads / 1 KV head, head dim 64, Tq = S (a whole-prompt
prefill). Causal SDPA of the same shape is timed too: it is the attention the prefill itself pays, so
``fast / sdpa`` says what the scores add to a prefill's attention.

    python benchmarks/colsum.py [--lengths 4096 16384] [--batch 1] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from contextlab.bench.timing import interleaved_medians
from contextlab.kernels.colsum import attention_column_sums

RESULTS = Path(__file__).parent / "results"
QUERY_HEADS, KV_HEADS, HEAD_DIM = 4, 1, 64


def calls(length: int, batch: int, device: str, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(length)
    queries = torch.randn(batch, QUERY_HEADS, length, HEAD_DIM, generator=gen).to(device, dtype)
    keys = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=gen).to(device, dtype)
    values = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=gen).to(device, dtype)
    valid = torch.ones(batch, 1, length, dtype=torch.bool, device=device)
    scaling = HEAD_DIM**-0.5
    fns: dict[str, Callable[[], object]] = {
        backend: (lambda backend=backend: attention_column_sums(queries, keys, valid, scaling, backend=backend))
        for backend in ("reference", "torch")
    }
    if device.startswith("cuda"):
        fns["triton"] = lambda: attention_column_sums(queries, keys, valid, scaling, backend="triton")
    fns["sdpa"] = lambda: F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=True)
    return fns


def run(lengths: list[int], batch: int, repeats: int, device: str, dtype: torch.dtype) -> list[dict[str, float]]:
    rows = []
    for length in lengths:
        medians = interleaved_medians(calls(length, batch, device, dtype), repeats=repeats, device=device)
        rows.append({"length": length, **medians})
        print(length, {name: round(seconds, 3) for name, seconds in medians.items()}, flush=True)
    return rows


def table(rows: list[dict[str, float]]) -> str:
    triton = "triton" in rows[0]
    head = "| S = Tq | reference s | fast torch s | reference / fast |"
    head += " triton s | reference / triton |" if triton else ""
    head += " causal SDPA s | fast / SDPA |"
    out = [head, "|" + "---:|" * head.count(" |")]
    for r in rows:
        line = f"| {r['length']} | {r['reference']:.3f} | {r['torch']:.3f} | {r['reference'] / r['torch']:.2f}x |"
        if triton:
            line += f" {r['triton']:.4f} | {r['reference'] / r['triton']:.1f}x |"
        line += f" {r['sdpa']:.3f} | {r['torch'] / r['sdpa']:.2f} |"
        out.append(line)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    rows = run(args.lengths, args.batch, args.repeats, args.device, getattr(torch, args.dtype))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    header = (
        f"# Attention column sums (H2O scores)\n\nB={args.batch}, {QUERY_HEADS} query / {KV_HEADS} KV heads, "
        f"head dim {HEAD_DIM}, Tq = S, all slots valid, {args.dtype}, on {args.device} ({device_name}, "
        f"{torch.get_num_threads()} threads). Median of {args.repeats} round-robin runs, one process.\n\n"
    )
    text = header + table(rows) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"colsum_{args.device.split(':')[0]}.md").write_text(text)


if __name__ == "__main__":
    main()
