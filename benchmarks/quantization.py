#!/usr/bin/env python
"""KV-cache quantization measured: bytes held, perplexity, single-needle accuracy and CPU decode speed.

1. ``bytes``: the bytes each quantization setting (alone and composed with eviction) holds after a prompt,
   as a ratio to the bfloat16 full cache (2 bytes per element). Measured at 4K tokens (``cache.kv_bytes()``
   after ``cl.prefill`` on SmolLM2-135M-Instruct loaded in bfloat16, against
   ``contextlab.engine.result.full_cache_bytes``); for full, eviction and KIVI also computed at 4K/8K/32K
   from the store's layout (see :func:`head_bytes`), the formula giving the measured bytes exactly (asserted
   from each head's kept slot count, on SmolLM2 and on the reference model). ``kvquant`` (outliers) and
   ``zipcache`` (two tiers) are measured only.
2. ``perplexity``: SmolLM2 (float32), ``--windows`` consecutive windows taken backwards from the end of the
   King James Bible (from Revelation backwards; tokenized as plain text, no chat template): each window's 2048
   context tokens are prefilled with ``cl.prefill(method=spec)``, its 256 continuation tokens go through
   the cache in one forward, and the continuation's NLL is summed (the first token predicted from the
   prefill's last logits). Perplexity = exp(total NLL / total tokens) over all windows.
3. ``needle``: SmolLM2 (float32), single needle (``niah_single_2``, 7-digit value) in 4096-token prompts at
   depths drawn uniformly from 10-90% (``benchmarks.extension.depth_samples``), greedy, 12 new tokens,
   question-aware, scored with the task's metric; Wilson 95% intervals, mean prefill seconds, KV bytes.
4. ``speed``: SmolLM2 (float32) decode milliseconds per token on this CPU at 8K tokens (8160 prompt tokens
   of KJV text + 32 new tokens, greedy): ``full`` vs each quantization method (``SPEED_SPECS``), side by
   side in one run, best of 2.

Each cell is written to ``benchmarks/results/quantization.json`` as soon as it finishes (perplexity: each
window), and a finished cell is not run again (delete the file or its keys to start over), so a long run
can be stopped and continued. ``--quick`` shrinks everything for a smoke test (2 windows, 4 needles, 2K
tokens) and writes to a separate store in the temporary folder, never to ``benchmarks/results``.

    PYTHONPATH=. python -u benchmarks/quantization.py [--sections bytes perplexity needle speed]
        [--windows 12] [--samples 40] [--threads N] [--quick]

Writes benchmarks/results/quantization.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers
from benchmarks._accuracy import markdown, score_columns
from benchmarks._machine import cpu_name, warn_if_slow_bf16
from benchmarks.extension import depth_samples

import contextlab as cl
from contextlab.bench.metrics import METRIC_FUNCTIONS
from contextlab.bench.report import interval
from contextlab.bench.tasks.text import kjv_text
from contextlab.engine.inputs import positions_from_mask
from contextlab.engine.result import full_cache_bytes, kept_positions
from contextlab.hf.compat import cache_kwarg
from contextlab.store.codec import words
from contextlab.store.dense import position_dtype

RESULTS = Path(__file__).parent / "results"
STORE = RESULTS / "quantization.json"
QUICK_STORE = Path(tempfile.gettempdir()) / "contextlab-quantization-quick.json"

# Group 128 was asked for, but one ``group`` sets both the keys' token groups and the values' channel groups,
# and the values' must divide the head dimension (64 on SmolLM2): the store refuses it (recorded as such).
# Group 64, the largest SmolLM2 accepts, is measured instead.
KIVI4_E4M3_SINK = "kivi:bits=4,scales=e4m3,sink=1"  # float8 scales with the first token kept exact
KIVI2_E4M3_SINK = "kivi:bits=2,scales=e4m3,sink=1"
# the same float8 scales on keys and values in the Hadamard basis: symmetric codes fit its near-Gaussian,
# outlier-free entries (QuaRot, arXiv 2404.00456); no extra bytes
KIVI4_E4M3_ROTATED = "kivi:bits=4,scales=e4m3,sink=1,rotate=hadamard"
# 2-bit codes in KIVI's layout with the first token exact, normal levels and the Hadamard basis
KIVI2_ROTATED = "kivi:bits=2,sink=1,levels=normal,rotate=hadamard"
# the same with key groups of 16 tokens: finer key ranges (the keys' error dominates at 2 bits: value groups of
# 16 channels moved the perplexity by 0.01), paid in metadata; the values' groups of 16 or 32 channels
KIVI2_ROTATED_K16 = "kivi:bits=2,group=16,sink=1,levels=normal,rotate=hadamard"
KIVI2_ROTATED_K16_V32 = "kivi:bits=2,group=16,value_group=32,sink=1,levels=normal,rotate=hadamard"
# float8 scales fitted for the smallest squared error (fit=mse), on the normal law's Lloyd-Max levels or
# uniform ones (the fused kernel's layout), in the Hadamard basis with the first token exact
KIVI2_FIT = "kivi:bits=2,scales=e4m3,sink=1,levels=normal,rotate=hadamard,fit=mse"
KIVI2_FIT_UNIFORM = "kivi:bits=2,scales=e4m3,sink=1,rotate=hadamard,fit=mse"
KIVI4_FIT = "kivi:bits=4,scales=e4m3,sink=1,levels=normal,rotate=hadamard,fit=mse"
BYTES_SPECS = [
    "full",
    "kivi:bits=4",
    "kivi:bits=4,group=64",
    "kivi:bits=4,group=128",
    "kivi:bits=2",
    "kivi:bits=2,group=64",
    "kivi:bits=2,group=128",
    "kivi:bits=3",
    "kivi:bits=8",
    "kivi:bits=4,scales=e4m3",
    "kivi:bits=2,scales=e4m3",
    "snapkv:0.5+kivi:4",
    "snapkv:0.5+kivi:bits=4,group=128",
    "snapkv:0.5+kivi:bits=4,scales=e4m3",
    "adakv:0.5+kivi:2",
    "kivi:bits=2,sink=1",
    KIVI4_E4M3_SINK,
    KIVI2_E4M3_SINK,
    f"snapkv:0.5+{KIVI4_E4M3_SINK}",
    KIVI4_E4M3_ROTATED,
    f"snapkv:0.5+{KIVI4_E4M3_ROTATED}",
    KIVI2_ROTATED,
    KIVI2_ROTATED_K16,
    KIVI2_ROTATED_K16_V32,
    "kivi:bits=2,scales=e4m3,sink=1,rotate=hadamard",
    KIVI2_FIT,
    KIVI2_FIT_UNIFORM,
    KIVI4_FIT,
    f"snapkv:0.5+{KIVI4_FIT}",
    "kvquant:bits=2,rotate=hadamard",
    "kvquant:bits=3",
    "kvquant:bits=3,levels=uniform",
    "kvquant:bits=3,sink=0,levels=uniform",
    "kvquant:bits=4",
    "kvquant:bits=4,levels=uniform",
    "zipcache",
    "zipcache:keys=channel",
    "snapkv:0.5+zipcache",
]
PPL_SPECS = [
    "full",
    "kivi:bits=8",
    "kivi:bits=4",
    "kivi:bits=4,group=128",
    "kivi:bits=3",
    "kivi:bits=2",
    "kivi:bits=2,group=128",
    "kivi:bits=4,scales=e4m3",
    "kivi:bits=2,scales=e4m3",
    "kivi:bits=3,sink=1",
    "kivi:bits=2,sink=1",
    KIVI4_E4M3_SINK,
    KIVI2_E4M3_SINK,
    "kivi:bits=3,sink=1,levels=normal",
    "kivi:bits=2,sink=1,levels=normal",
    "kivi:bits=2,sink=1,rotate=hadamard",
    KIVI2_ROTATED,
    KIVI2_ROTATED_K16,
    KIVI2_ROTATED_K16_V32,
    "kivi:bits=2,scales=e4m3,sink=1,rotate=hadamard",
    "kivi:bits=4,sink=1,rotate=hadamard",
    "kvquant:bits=4",
    "kvquant:bits=4,levels=uniform",
    "kvquant:bits=4,sink=0,levels=uniform",
    "kvquant:bits=3",
    "kvquant:bits=3,levels=uniform",
    "kvquant:bits=3,sink=0,levels=uniform",
    "kvquant:bits=2",
    "kvquant:bits=2,rotate=hadamard",
    "kvquant:bits=2,levels=uniform",
    "kvquant:bits=2,sink=0,levels=uniform",
    "zipcache",
    "zipcache:keys=channel",
    "snapkv:0.5",
    "snapkv:0.5+kivi:4",
    "snapkv:0.5+kivi:bits=4,scales=e4m3",
    f"snapkv:0.5+{KIVI4_E4M3_SINK}",
    KIVI4_E4M3_ROTATED,
    f"snapkv:0.5+{KIVI4_E4M3_ROTATED}",
    KIVI2_FIT,
    KIVI2_FIT_UNIFORM,
    KIVI4_FIT,
    f"snapkv:0.5+{KIVI4_FIT}",
]
NEEDLE_SPECS = [
    "full",
    "kivi:bits=4",
    "kivi:bits=2",
    "kivi:bits=4,scales=e4m3",
    KIVI4_E4M3_SINK,
    KIVI4_E4M3_ROTATED,
    "snapkv:0.5+kivi:4",
    "kvquant:bits=3,sink=0,levels=uniform",
    "kvquant:bits=3,levels=uniform",
    "kvquant:bits=3",
    KIVI2_ROTATED,
    "kvquant:bits=2,rotate=hadamard",
    "zipcache",
    "zipcache:keys=channel",
    KIVI2_FIT,
    KIVI4_FIT,
]
SPEED_SPECS = ["full", "kivi:bits=4", "kivi:bits=2", "kvquant:bits=3,sink=0,levels=uniform", "zipcache"]
ANALYTIC_LENGTHS = [4096, 8192, 32768]
LONG_POSITION_BYTES = 4  # int32 positions once a row passes 32768 tokens (int16 below)
HELDOUT_CHARS = 400_000  # the perplexity text: the Bible's last 400K characters (Acts 25 .. Revelation)
CONTEXT, CONTINUATION = 2048, 256
NEEDLE_TOKENS, NEW_TOKENS = 4096, 12
SPEED_TOKENS, SPEED_NEW = 8192, 32


def say(*parts) -> None:
    print(*parts, flush=True)


class Store(dict):
    """The JSON result store: a cell is saved as soon as it is written."""

    def __init__(self, path: Path) -> None:
        super().__init__(json.loads(path.read_text()) if path.exists() else {})
        self.path = path

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self, indent=1))


# -- the bytes formula ---------------------------------------------------------------------------------------
def parts(spec: str) -> tuple[object | None, bool]:
    """``(QuantSpec or None, evicts)`` of a method spec."""
    method = cl.method(spec)
    quant = [p.spec() for p in getattr(method, "parts", (method,)) if p.name == "kivi"]
    return (quant[0] if quant else None), method.prompt_keep(1 << 20) is not None


def has_formula(spec: str) -> bool:
    """True when the closed-form formula covers the spec (full, eviction, kivi); kvquant's outliers and
    zipcache's tiers are measured only."""
    method = cl.method(spec)
    return not any(p.name in ("kvquant", "zipcache") for p in getattr(method, "parts", (method,)))


def position_bytes(length: int, evicts: bool) -> int:
    """Bytes of each kept slot's position after a ``length``-token prompt (0 when nothing was evicted)."""
    return position_dtype(length - 1).itemsize if evicts else 0


def head_bytes(quant, kept: int, dim: int, itemsize: int, position: int) -> int:
    """Bytes one KV head of one layer holds for ``kept`` slots after a prompt.

    Unquantized: K and V, ``2 * dim * itemsize`` per slot. Quantized (the store settles a prompt into whole
    groups of ``group`` slots, keeping the newest ``residual + (kept - residual) % group`` in full precision):
    per quantized slot, K and V codes of ``words(dim, bits) * 4`` bytes each (``ceil(dim / (32 // bits))``
    int32 words), the keys' float16 scale and zero per channel per group of slots (``2 * 2 * dim`` bytes per
    ``group`` slots) and the values' per slot per group of ``c = min(group, dim)`` channels
    (``2 * 2 * dim / c`` bytes; ``value_group`` when set); with ``scales=e4m3`` one float8 scale (1 byte)
    where float16 keeps a scale and a zero (4 bytes). With ``sink = S`` (once any slot is quantized), the S
    exact sink slots: ``S * (2 * dim * itemsize + 4)`` (key, value and an int32 slot index). Plus
    ``position`` bytes per slot when the prompt was evicted (kept positions are stored: int16 while every
    position is below 32768, else int32; :func:`position_bytes`)."""
    extra = position * kept
    full = 2 * dim * itemsize
    if quant is None:
        return kept * full + extra
    quantized = max(0, (kept - quant.residual) // quant.group * quant.group)
    codes = quantized * 2 * words(dim, quant.bits) * 4
    per_group = meta_bytes(quant)
    key_meta = quantized // quant.group * per_group * dim
    value_meta = quantized * (dim // quant.channels(dim)) * per_group
    sinks = quant.sink * (full + 4) if quantized else 0
    return codes + key_meta + value_meta + sinks + (kept - quantized) * full + extra


def meta_bytes(quant) -> int:
    """Bytes of metadata per group: float16 scale and zero (4), or one float8 scale (1)."""
    return 4 if quant.scales == "fp16" else 1


def shapes(model) -> tuple[int, int, int]:
    cfg = model.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, dim


def analytic(spec: str, length: int, layers: int, heads: int, dim: int, itemsize: int) -> tuple[int, int, int]:
    """``(even, low, high)`` bytes after a ``length``-token prompt: ``even`` with every head keeping the
    method's prompt budget. AdaKV splits a layer's budget unevenly across heads; with ``a`` bytes per quantized
    slot and ``b`` per full-precision one, a head keeping ``k >= residual`` slots holds
    ``a * k + (b - a) * tail`` bytes with its full-precision tail in ``[residual, residual + group - 1]``, so
    the layer's bytes lie in ``[low, high]`` whatever the split (its safeguard keeps every head above 128
    slots here). Other methods: ``low == high == even``."""
    quant, evicts = parts(spec)
    kept = cl.method(spec).prompt_keep(length) or length
    pos = position_bytes(length, evicts)
    even = layers * heads * head_bytes(quant, kept, dim, itemsize, pos)
    if quant is None or not spec.startswith("adakv"):
        return even, even, even
    r, g = quant.residual, quant.group
    fp = head_bytes(quant, r, dim, itemsize, pos)  # r slots, all full precision
    b = fp // r
    a = (head_bytes(quant, r + g, dim, itemsize, pos) - fp) / g  # g more slots, all quantized
    low = layers * heads * (a * kept + (b - a) * r)
    high = layers * heads * (a * kept + (b - a) * (r + g - 1))
    return even, round(low), round(high)


def formula_from_cache(spec: str, done, dim: int, itemsize: int) -> int:
    """The formula applied to each head's kept slot count in a prefilled cache."""
    quant, evicts = parts(spec)
    pos = position_bytes(done.attention_mask.shape[-1], evicts)
    total = 0
    for layer in kept_positions(done.cache, done.attention_mask):  # [B, H, slots], -1 on unused slots
        for count in (layer[0] >= 0).sum(-1).tolist():
            total += head_bytes(quant, count, dim, itemsize, pos)
    return total


def bits_per_element(quant, evicts: bool, dim: int) -> float:
    """Asymptotic bits per cached K/V element (residual ignored; int16 positions, prompts up to 32K)."""
    if quant is None:
        return 16.0 + position_bytes(1 << 15, evicts) * 8 / (2 * dim)
    codes = words(dim, quant.bits) * 32 / dim
    half = meta_bytes(quant) * 4  # half the bits of one group's metadata: K and V are averaged
    meta = half / quant.group + half / quant.channels(dim)
    return codes + meta + position_bytes(1 << 15, evicts) * 8 / (2 * dim)


# -- texts ---------------------------------------------------------------------------------------------------
def heldout_ids(tok) -> list[int]:
    """The Bible's last ``HELDOUT_CHARS`` characters from a verse start, tokenized as plain text."""
    text = kjv_text()[-HELDOUT_CHARS:]
    text = text[text.index("\n") + 1 :]
    return list(tok(text, add_special_tokens=False)["input_ids"])


def windows(ids: list[int], count: int, span: int) -> list[list[int]]:
    """``count`` consecutive windows of ``span`` tokens, the first ending at the text's end."""
    if count * span > len(ids):
        raise ValueError(f"{count} windows of {span} tokens need {count * span}; the text has {len(ids)}")
    return [ids[len(ids) - (i + 1) * span : len(ids) - i * span] for i in range(count)]


# -- sections ------------------------------------------------------------------------------------------------
def section_bytes(store: Store, measured: int) -> None:
    model, tok = cl.load("smollm2", dtype=torch.bfloat16)
    warn_if_slow_bf16(model)
    layers, heads, dim = shapes(model)
    ids = heldout_ids(tok)[-measured:]
    for spec in BYTES_SPECS:
        key = f"bytes|smollm2-bf16|{measured}|{spec}"
        if key not in store:
            try:
                done = cl.prefill(model, tok, ids, method=spec)
            except ValueError as err:  # the library's own refusal (group 128 on head dim 64), kept verbatim
                store[key] = {"refused": str(err), "shapes": [layers, heads, dim]}
                store.save()
                say(key, store[key])
                continue
            kv, full = done.cache.kv_bytes(), full_cache_bytes(model, 1, done.columns)
            exact = has_formula(spec)
            formula = formula_from_cache(spec, done, dim, 2) if exact else None
            even, low, high = analytic(spec, measured, layers, heads, dim, 2) if exact else (None, None, None)
            store[key] = {
                "kv_bytes": kv,
                "full_bf16": full,
                "formula": formula,
                "even": even,
                "low": low,
                "high": high,
                "shapes": [layers, heads, dim],
                "prefill_s": done.seconds,
                "tokens": done.columns,
            }
            store.save()
        r = store[key]
        if "refused" in r:
            continue
        say(key, r, f"ratio {r['kv_bytes'] / r['full_bf16']:.4f}")
        if r["formula"] is None:
            continue
        assert r["kv_bytes"] == r["formula"], f"{spec}: measured {r['kv_bytes']} != formula {r['formula']}"
        assert r["low"] <= r["kv_bytes"] <= r["high"], f"{spec}: measured bytes outside the analytic range"
        if not spec.startswith("adakv"):
            assert r["kv_bytes"] == r["even"], f"{spec}: measured {r['kv_bytes']} != analytic {r['even']}"
    del model
    model, tok = cl.load("reference")
    layers, heads, dim = shapes(model)
    itemsize = next(model.parameters()).element_size()
    length = min(3000, model.config.max_position_embeddings)
    ids = tok(kjv_text()[-20000:], add_special_tokens=False)["input_ids"][-length:]
    for spec in BYTES_SPECS:
        if not has_formula(spec):
            continue
        key = f"bytes|reference|{length}|{spec}"
        if key not in store:
            done = cl.prefill(model, tok, ids, method=spec)
            store[key] = {
                "kv_bytes": done.cache.kv_bytes(),
                "full": full_cache_bytes(model, 1, done.columns),
                "formula": formula_from_cache(spec, done, dim, itemsize),
                "shapes": [layers, heads, dim],
            }
            store.save()
        say(key, store[key])
        assert store[key]["kv_bytes"] == store[key]["formula"], f"reference {spec}: formula mismatch"


def section_perplexity(store: Store, count: int) -> None:
    model, tok = cl.load("smollm2")
    span = CONTEXT + CONTINUATION
    texts = windows(heldout_ids(tok), count, span)
    arg = cache_kwarg(model)
    for spec in PPL_SPECS:
        key = f"perplexity|{CONTEXT}+{CONTINUATION}|{spec}"
        cell = store.setdefault(key, {"windows": []})
        for i in range(len(cell["windows"]), count):
            context, continuation = texts[i][:CONTEXT], torch.tensor([texts[i][CONTEXT:]])
            start = time.perf_counter()
            done = cl.prefill(model, tok, context, method=spec)
            kv = done.cache.kv_bytes()  # after the prompt, before the continuation goes in
            with torch.inference_mode(), cl.attention_enabled(model):
                mask = torch.cat([done.attention_mask, torch.ones_like(continuation)], dim=1)
                out = model(
                    input_ids=continuation,
                    attention_mask=mask,
                    position_ids=positions_from_mask(mask)[:, -CONTINUATION:],
                    use_cache=True,
                    **{arg: done.cache},
                )
                logits = torch.cat([done.last_logits, out.logits[0, :-1].float()])  # row t predicts token t
                nll = torch.nn.functional.cross_entropy(logits, continuation[0], reduction="sum")
            cell["windows"].append(
                {
                    "nll_sum": float(nll),
                    "tokens": CONTINUATION,
                    "prefill_s": done.seconds,
                    "kv_bytes": kv,
                    "seconds": time.perf_counter() - start,
                }
            )
            store.save()
            say(key, f"window {i}: nll/token {float(nll) / CONTINUATION:.4f} ({time.perf_counter() - start:.1f}s)")


def section_needle(store: Store, length: int, n: int) -> None:
    model, tok = cl.load("smollm2")
    items = depth_samples(tok, length, n, seed=11)
    for spec in NEEDLE_SPECS:
        key = f"needle|{length}|{n}|{spec}"
        if key in store:
            continue
        scores, prefill, ratio, kv = [], [], [], []
        start = time.perf_counter()
        for s in items:
            out = cl.generate(model, tok, s.context_ids, s.question_ids, method=spec, max_new_tokens=NEW_TOKENS)
            scores.append(METRIC_FUNCTIONS[s.metric](out.text, s.answers))
            prefill.append(out.prefill_seconds)
            ratio.append(out.kv_ratio)
            kv.append(out.kv_bytes)
        store[key] = {
            "scores": scores,
            "prefill_s": sum(prefill) / len(prefill),
            "kv_ratio_fp32": sum(ratio) / len(ratio),
            "kv_mib": sum(kv) / len(kv) / 2**20,
            "seconds": time.perf_counter() - start,
        }
        store.save()
        say(key, {k: v for k, v in store[key].items() if k != "scores"}, f"accuracy {sum(scores) / len(scores):.2f}")


def section_speed(store: Store, length: int) -> None:
    key = f"speed|{length}|{torch.get_num_threads()}t"
    if key in store:
        return
    model, tok = cl.load("smollm2")
    ids = heldout_ids(tok)[-(length - SPEED_NEW) :]
    runs: dict[str, list[dict]] = {spec: [] for spec in SPEED_SPECS}
    load_before = os.getloadavg()
    for rep in range(2):
        for spec in SPEED_SPECS:
            out = cl.generate(model, tok, ids, method=spec, max_new_tokens=SPEED_NEW)
            # The first token comes from the prefill's logits and each later one from one forward; an EOS (not
            # among the tokens returned) was predicted by one forward more.
            steps = len(out.tokens) - 1 if len(out.tokens) == SPEED_NEW else len(out.tokens)
            row = {
                "tokens": len(out.tokens),
                "decode_s": out.decode_seconds,
                "ms_per_step": 1000 * out.decode_seconds / max(1, steps),
                "prefill_s": out.prefill_seconds,
                "kv_ratio_fp32": out.kv_ratio,
            }
            runs[spec].append(row)
            say(f"speed {length} rep {rep} {spec}", row)
    store[key] = {
        "runs": runs,
        "best_ms": {spec: min(r["ms_per_step"] for r in rows) for spec, rows in runs.items()},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "prompt_tokens": len(ids),
    }
    store.save()


# -- report --------------------------------------------------------------------------------------------------
def report_bytes(store: Store, measured: int) -> list[str]:
    keys = [k for k in store if k.startswith(f"bytes|smollm2-bf16|{measured}|")]
    if not keys:
        return []
    layers, heads, dim = store[keys[0]]["shapes"]
    lengths = sorted({measured, *ANALYTIC_LENGTHS})
    lines = [
        f"## Bytes held after a prompt, as a ratio to the bf16 full cache (SmolLM2 shapes: {layers} layers, "
        f"{heads} KV heads, head dim {dim})",
        "",
        f"Measured: `cl.prefill` of {measured} KJV tokens on SmolLM2 loaded in bfloat16 (so the full-precision "
        "residual is 2 bytes per element), `done.cache.kv_bytes()` over "
        "`contextlab.engine.result.full_cache_bytes` (bf16: 2 bytes per element, K and V). The formula columns "
        "are the formula below with every head keeping the method's prompt budget (AdaKV: in parentheses, the "
        "range any split of the budget across heads can give); 32K is past SmolLM2's 8K window, so it is "
        "arithmetic on its shapes only. Asymptotic: bits per element of the full cache's K and V, residual "
        "window left out (kept fraction included), positions of evicted caches at 2 bytes (prompts up to 32K).",
        "",
    ]
    head = ["method", f"measured {measured // 1024}K", "MiB"] + [f"{n // 1024}K formula" for n in lengths]
    head += ["asymptotic bits/elem", "asymptotic ratio"]
    rows = []
    for spec in BYTES_SPECS:
        r = store.get(f"bytes|smollm2-bf16|{measured}|{spec}")
        if r is None:
            continue
        if "refused" in r:
            rows.append([f"`{spec}`", "refused", "—"] + ["—"] * len(lengths) + ["—", "—"])
            continue
        quant, evicts = parts(spec)
        row = [f"`{spec}`", f"{r['kv_bytes'] / r['full_bf16']:.4f}", f"{r['kv_bytes'] / 2**20:.2f}"]
        if r["formula"] is None:
            rows.append(row + ["measured only"] + ["—"] * (len(lengths) - 1) + ["—", "—"])
            continue
        for n in lengths:
            even, low, high = analytic(spec, n, layers, heads, dim, 2)
            full = layers * heads * n * 2 * dim * 2
            row.append(f"{even / full:.4f}" + (f" ({low / full:.4f}-{high / full:.4f})" if low != high else ""))
        kept = (cl.method(spec).prompt_keep(1 << 20) or 1 << 20) / (1 << 20)
        bits = bits_per_element(quant, evicts, dim) * kept
        rows += [[*row, f"{bits:.3f}", f"{bits / 16:.4f}"]]
    lines += [markdown(head, rows), ""]
    refused = {store[k]["refused"] for k in keys if "refused" in store[k]}
    lines += [f"Refused by the library (`cl.prefill` raised `ValueError`): {m}" for m in sorted(refused)]
    lines += [
        "",
        "Formula, per layer and KV head for `k` kept slots (`D` = head dim): the store quantizes whole groups "
        "of `group` slots beyond the newest `residual`, so `q = floor((k - residual) / group) * group` slots "
        "are codes and `k - q` (128..159 for residual 128 and group 32) stay in the model's precision "
        "(`2 * D * 2` bytes per slot in bf16). Per quantized slot: K and V codes, `ceil(D / (32 // bits)) * 4` "
        "bytes each (int32 words; 3-bit codes leave 2 bits of each word unused, 3.5 bits per element at "
        "D = 64); the keys' float16 scale + zero per channel per group of `group` slots, `2 * 2 * D / group` "
        "bytes per slot; the values' per slot per group of `c = min(group, D)` channels, `2 * 2 * D / c` bytes. "
        "`kvquant` (outliers: an int16 index and a float16 value each) and `zipcache` (two tiers) are measured "
        "only. With `sink=S` (once any slot is quantized), the S exact sink slots: `S * (2 * D * 2 + 4)` bytes "
        "(key and value in bf16, an int32 slot index). When "
        "the prompt was evicted, each kept slot's position: 2 bytes (int16) while every position is below 32768, "
        "4 (int32) beyond (the store widens its position buffers when a row passes 32767). The measured bytes "
        "equal this formula "
        "applied to every head's own kept count (asserted), and for every method but AdaKV (uneven per-head "
        "budgets, each head with its own full-precision tail) they also equal the even-split column "
        "(asserted). The same check passes on the reference model (float32, head dim "
        f"{reference_dim(store)}, the specs whose group divides it): "
        + ", ".join(f"`{k.split('|')[3]}` {store[k]['kv_bytes']} B" for k in store if k.startswith("bytes|reference|"))
        + ".",
        "",
        *arithmetic(dim),
        "",
        *target_lines(measured, lengths, layers, heads, dim),
    ]
    return lines


def reference_dim(store: Store) -> int | str:
    return next((store[k]["shapes"][2] for k in store if k.startswith("bytes|reference|")), "?")


def arithmetic(dim: int) -> list[str]:
    """The floor each setting cannot go below, printed step by step."""
    position = position_bytes(1 << 15, True) * 8 / (2 * dim)
    long_position = LONG_POSITION_BYTES * 8 / (2 * dim)
    out = [
        "Arithmetic of the floor. A float16 scale and zero point are 32 bits per group: keys have one per channel "
        "per `group` tokens (`32 / group` bits per key element), values one per token per `c = min(group, "
        f"{dim})` channels (`32 / c` bits per value element). Per element of K and V (their average), residual "
        "window left out:",
        "",
    ]
    for bits in (4, 2):
        for group in (32, 64, 128):
            code = words(dim, bits) * 32 / dim
            channels = min(group, dim)
            total = code + 16 / group + 16 / channels
            out.append(
                f"- {bits}-bit, group {group}: {code:g} + 16/{group} + 16/{channels} = {total:g} bits, / 16 = "
                f"{total / 16:.4f}"
            )
    best4 = 4 + 16 / 128 + 16 / dim
    out.append(
        f"- eviction adds a 2-byte (int16) position per kept slot and head up to 32K tokens: 16 / (2 x {dim}) = "
        f"{position:g} bits per kept element ({long_position:g} with int32 positions past 32K). 50% eviction + "
        f"4-bit: 0.5 x (5 + {position:g}) / 16 = {0.5 * (5 + position) / 16:.4f} at group 32, "
        f"0.5 x ({best4:g} + {position:g}) / 16 = {0.5 * (best4 + position) / 16:.4f} at group 128."
    )
    out.append(
        "- the residual window adds `(k - q) / k x (1 - asymptotic ratio)`: e.g. 4-bit group 32 at 4K, 128 / 4096 x "
        f"11 / 16 = {128 / 4096 * 11 / 16:.4f} (0.3125 + {128 / 4096 * 11 / 16:.4f} = "
        f"{0.3125 + 128 / 4096 * 11 / 16:.4f})."
    )
    out += [
        "",
        f"So on head dim {dim}, with float16 scales and zero points, 4-bit cannot reach 0.27 at group 32 (5 bits, "
        f"0.3125); group 128 gives {best4:g} bits ({best4 / 16:.4f}), still above it because the values keep one "
        f"scale and zero per token (at most {dim} channels per group). 2-bit at group 128 is "
        f"{(2 + 16 / 128 + 16 / dim) / 16:.4f} before the residual window. The issue's 0.27 / 0.15 / 0.14 "
        "targets assume less metadata than a float16 scale and zero per group of 32.",
        "",
        "`scales=e4m3` (symmetric codes, one float8 E4M3 scale per group, no zero point: the microscaling "
        "formats' 8-bit block scale) takes the metadata to 8 bits per group: 4-bit group 32: 4 + 4/32 + 4/32 = "
        f"4.25 bits, / 16 = {4.25 / 16:.4f}; 2-bit: 2.25 bits, {2.25 / 16:.4f}; 50% eviction + 4-bit: 0.5 x "
        f"(4.25 + {position:g}) / 16 = {0.5 * (4.25 + position) / 16:.4f} ({0.5 * (4.25 + long_position) / 16:.4f} "
        "with int32 positions, which alone kept it above 0.14 before positions were stored as int16). The "
        "residual window's 128 full-precision tokens add their share on top, which only long prompts amortize "
        "(4K: +0.023 at 4 bits; 32K: +0.003).",
    ]
    return out


def target_lines(measured: int, lengths: list[int], layers: int, heads: int, dim: int) -> list[str]:
    out = [
        "Targets (ratio to bf16, metadata and residual window included; the formula, equal to the measured "
        f"bytes at {measured // 1024}K):",
        "",
    ]
    checks = [
        (
            "4-bit <= 0.27",
            0.27,
            [
                "kivi:bits=4",
                "kivi:bits=4,group=128",
                "kivi:bits=4,scales=e4m3",
                KIVI4_E4M3_SINK,
                KIVI4_E4M3_ROTATED,
                KIVI4_FIT,
            ],
        ),
        (
            "2-bit <= 0.15",
            0.15,
            ["kivi:bits=2", "kivi:bits=2,group=128", "kivi:bits=2,scales=e4m3", KIVI2_E4M3_SINK, KIVI2_FIT],
        ),
        (
            "50% eviction + 4-bit <= 0.14",
            0.14,
            [
                "snapkv:0.5+kivi:4",
                "snapkv:0.5+kivi:bits=4,group=128",
                "snapkv:0.5+kivi:bits=4,scales=e4m3",
                f"snapkv:0.5+{KIVI4_E4M3_SINK}",
                f"snapkv:0.5+{KIVI4_E4M3_ROTATED}",
                f"snapkv:0.5+{KIVI4_FIT}",
            ],
        ),
    ]
    for title, target, specs in checks:
        for spec in specs:
            verdicts = []
            for n in lengths:
                even, _, _ = analytic(spec, n, layers, heads, dim, 2)
                ratio = even / (layers * heads * n * 2 * dim * 2)
                verdicts.append(f"{n // 1024}K {ratio:.4f} {'met' if ratio <= target else 'NOT met'}")
            out.append(f"- {title}: `{spec}`: " + "; ".join(verdicts))
    return [*out, ""]


def report_perplexity(store: Store, count: int) -> list[str]:
    cells = {}
    for spec in PPL_SPECS:
        r = store.get(f"perplexity|{CONTEXT}+{CONTINUATION}|{spec}")
        if r and r["windows"]:
            cells[spec] = r["windows"][:count]
    if not cells:
        return []
    lines = [
        f"## Perplexity (SmolLM2, float32, {CONTEXT} context + {CONTINUATION} continuation tokens per window)",
        "",
        f"Text: the last {HELDOUT_CHARS // 1000}K characters of the KJV (from a verse start: Acts 25 to "
        "Revelation, about 96K tokens), tokenized as plain text without chat template or BOS; window i is the "
        "i-th block of "
        f"{CONTEXT + CONTINUATION} tokens counted back from the end (consecutive, not overlapping). Per window: "
        f"`cl.prefill(model, tok, context_ids, method=spec)`, then the {CONTINUATION} continuation tokens in one "
        "forward through the returned cache (`cl.attention_enabled`, mask = cat(prefill mask, ones), positions "
        "from the mask); NLL of each continuation token, the first predicted from `done.last_logits`. "
        "Perplexity = exp(sum NLL / sum tokens) over the windows. The continuation tokens attend to each other "
        "in full precision (they go in one forward; the store quantizes after the forward), so only the "
        f"{CONTEXT}-token context is quantized (all but its newest 128..159 tokens) and evicted; a token-by-"
        "token decode would also see its own older continuation tokens quantized. `zipcache` is ZipCache's "
        "token-wise key quantizer (the paper's); `zipcache:keys=channel` keeps KIVI's per-channel keys inside "
        "each precision tier. `sink=1` keeps each window's first token exact and out of its key group's range "
        "(the default of `kvquant`; `sink=0` rows are `kvquant` before that default). The first token of a window "
        "here is a mid-verse word, not a BOS: the sink forms on whatever token comes first. `levels=normal` (the "
        "default of `kvquant`; `levels=uniform` rows are `kvquant` before that default) puts a group's codes on "
        "non-uniform levels between its min and max, the Lloyd-Max levels of a min/max-normalized group of "
        "Gaussian entries (`contextlab.store.codec.level_table`); the bytes are those of uniform codes. "
        "`rotate=hadamard` codes keys and values in the orthonormal Hadamard basis of the head dimension and "
        "rotates the read-back again (QuaRot's rotation, arXiv 2404.00456): no bytes, and outlier channels no "
        "longer set their groups' ranges. None of `sink`, `levels=normal` or `rotate` is part of KIVI; a row "
        "with them is KIVI's layout with those additions. The `group=16` rows keep 2-bit codes with key groups "
        "of 16 tokens: at 2 bits the keys' ranges set the loss (probes on the same windows, not rows: value "
        "groups of 16 channels instead of 32 moved the rotated row by -0.012, 4 exact sink tokens instead of 1 "
        "by +0.006), and the finer groups' metadata makes them 4.0 and 3.5 bits per element (bytes table), so "
        "they meet the 2-bit perplexity target at the bytes of 3- to 4-bit codes. `fit=mse` (float8 scales "
        "only) gives each group the float8 scale with the smallest squared error among the unclipped one and "
        "100% down to 40% of it in 5% steps (each rounded to the nearest float8 number), clipping the "
        "extremes; with `scales=e4m3`, `levels=normal` are "
        "the normal law's Lloyd-Max levels in units of that scale (at 2 bits +-0.453 and +-1.510). Same bytes "
        "as the unclipped float8 rows.",
        "",
    ]
    base = _ppl(cells["full"]) if "full" in cells else None
    rows = []
    for spec, ws in cells.items():
        ppl = _ppl(ws)
        delta = f"{ppl - base:+.3f}" if base is not None else "—"
        kv = ws[0].get("kv_bytes")
        rows.append(
            [
                f"`{spec}`",
                f"{ppl:.3f}",
                delta,
                str(len(ws)),
                f"{sum(w['prefill_s'] for w in ws) / len(ws):.2f}",
                f"{kv / 2**20:.1f}" if kv else "—",
            ]
        )
    lines += [
        markdown(
            ["method", "perplexity", "delta vs full", "windows", "prefill s", "KV MiB after context (fp32)"], rows
        ),
        "",
    ]
    if base is not None:
        for spec, limit in (
            ("kivi:bits=4", 0.1),
            ("kivi:bits=4,group=128", 0.1),
            ("kivi:bits=2", 0.5),
            ("kivi:bits=2,group=128", 0.5),
            ("kivi:bits=4,scales=e4m3", 0.1),
            ("kivi:bits=2,scales=e4m3", 0.5),
            ("kivi:bits=2,sink=1", 0.5),
            (KIVI4_E4M3_SINK, 0.1),
            (KIVI4_E4M3_ROTATED, 0.1),
            (KIVI2_E4M3_SINK, 0.5),
            ("kivi:bits=2,sink=1,levels=normal", 0.5),
            ("kivi:bits=2,sink=1,rotate=hadamard", 0.5),
            (KIVI2_ROTATED, 0.5),
            (KIVI2_ROTATED_K16, 0.5),
            (KIVI2_ROTATED_K16_V32, 0.5),
            ("kivi:bits=2,scales=e4m3,sink=1,rotate=hadamard", 0.5),
            (KIVI2_FIT, 0.5),
            (KIVI2_FIT_UNIFORM, 0.5),
            (KIVI4_FIT, 0.1),
            ("kvquant:bits=2,rotate=hadamard", 0.5),
            ("kvquant:bits=3", 0.1),
            ("kvquant:bits=3,levels=uniform", 0.1),
            ("kvquant:bits=3,sink=0,levels=uniform", 0.1),
        ):
            if spec in cells:
                delta = _ppl(cells[spec]) - base
                lines.append(
                    f"- target delta <= {limit} for `{spec}`: {delta:+.3f}, {'met' if delta <= limit else 'NOT met'}"
                )
        lines.append("")
    return lines


def _ppl(ws: list[dict]) -> float:
    return math.exp(sum(w["nll_sum"] for w in ws) / sum(w["tokens"] for w in ws))


def report_needle(store: Store, length: int, n: int) -> list[str]:
    keys = [f"needle|{length}|{n}|{spec}" for spec in NEEDLE_SPECS if f"needle|{length}|{n}|{spec}" in store]
    if not keys:
        return []
    lines = [
        f"## Single needle at {length} tokens (SmolLM2, float32)",
        "",
        "`niah_single_2` (7-digit value in KJV text), depths uniform in 10-90% (`depth_samples`, seed 11), "
        f"`cl.generate(..., max_new_tokens={NEW_TOKENS})` greedy, question-aware (the question is compressed "
        "with the context), scored with the task's metric; 95% Wilson intervals. KV ratio: "
        "`GenerationResult.kv_ratio`, bytes after the prompt over the full cache in the model's dtype "
        "(float32 here, so the full-precision residual counts 4 bytes per element: lower ratios than the bf16 "
        "table's). The `snapkv:0.5+kivi:4` row ran when kept positions took 4 bytes (int32); they take 2 now, "
        "0.5 x 2 / (2 x 64 x 4) = 0.002 less of the float32 cache (the bytes table above is current).",
        "",
    ]
    rows = []
    for key in keys:
        r = store[key]
        rows.append(
            [
                f"`{key.split('|')[3]}`",
                *score_columns(r["scores"]),
                f"{r['prefill_s']:.2f}",
                f"{r['kv_ratio_fp32']:.4f}",
                f"{r['kv_mib']:.1f}",
            ]
        )
    head = ["method", "accuracy", "95% CI", "n", "prefill s", "KV ratio (fp32 full)", "KV MiB"]
    lines += [markdown(head, rows), ""]
    full, four = store.get(f"needle|{length}|{n}|full"), store.get(f"needle|{length}|{n}|kivi:bits=4")
    if full and four:
        gap = 100 * (interval(four["scores"]).mean - interval(full["scores"]).mean)
        differ = sum(a != b for a, b in zip(full["scores"], four["scores"], strict=True))
        lines += [
            f"- target: 4-bit within 2 points of full: {gap:+.1f} points, "
            f"{'met' if gap >= -2 else 'NOT met'} (n = {n}; one needle is {100 / n:.1f} points). Paired on the "
            f"same needles, 4-bit and full score differently on {differ} of {n}.",
            "",
        ]
    return lines


def report_speed(store: Store, length: int) -> list[str]:
    keys = [k for k in store if k.startswith(f"speed|{length}|")]
    if not keys:
        return []
    lines = [
        f"## Decode speed at {length} tokens (SmolLM2, float32, CPU)",
        "",
        f"`cl.generate(model, tok, ids, method=spec, max_new_tokens={SPEED_NEW})` on {length - SPEED_NEW} KJV "
        "prompt tokens (plain text, no question); ms per decode step = `decode_seconds` / forwards, "
        "forwards = tokens produced - 1 "
        "(the first token comes from the prefill's logits; every later one is one forward of one token through "
        "the cache; when an EOS ends a run early, forwards = tokens produced, the token column shows it). The "
        "methods run interleaved (each once in turn, then again), best of 2 per method. On CPU each decode "
        "step's attention over the quantized slots takes `quantized_attention`'s reference backend (it "
        "dequantizes the whole quantized prefix with the codec at every step, then fp32 attention, merged with "
        "the full-precision residual by log-sum-exp); the fused Triton kernel is CUDA-only.",
        "",
    ]
    for key in keys:
        r = store[key]
        best = r["best_ms"]
        rows = []
        for spec in SPEED_SPECS:
            runs = r["runs"][spec]
            rows.append(
                [
                    f"`{spec}`",
                    f"{best[spec]:.1f}",
                    f"{best[spec] / best['full']:.2f}x",
                    "/".join(str(x["tokens"]) for x in runs),
                    f"{min(x['prefill_s'] for x in runs):.1f}",
                ]
            )
        lines += [
            f"Threads: {key.split('|')[2]}; load average before/after: "
            f"{'/'.join(f'{x:.2f}' for x in r['loadavg_before'])} -> "
            f"{'/'.join(f'{x:.2f}' for x in r['loadavg_after'])} (the machine was shared).",
            "",
        ]
        lines += [markdown(["method", "ms / token (best of 2)", "vs full", "tokens", "prefill s (best)"], rows), ""]
    return lines


def report(store: Store, args) -> str:
    lines = [
        "# KV-cache quantization (benchmarks/quantization.py)",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads in the last run, "
        f"{platform.platform()}; Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, contextlab {cl.__version__}. Models: SmolLM2-135M-Instruct "
        '(`cl.load("smollm2")`, dequantized from its Q4_1 GGUF; float32 unless stated) and the bundled '
        "reference model. Batch size 1 throughout. Command: `PYTHONPATH=. python -u "
        "benchmarks/quantization.py` (cells accumulate across runs; this file was last written by "
        f"`--sections {' '.join(args.sections)}{' --quick' if args.quick else ''}`). Timings are on a machine "
        "shared with other work: prefill seconds are indicative only (the `scales=e4m3` and `sink` cells, and "
        "`kvquant` at its `sink=1` default, ran on one thread beside other runs, the others on two).",
        "",
    ]
    lines += report_bytes(store, args.measured)
    lines += report_perplexity(store, args.windows)
    lines += report_needle(store, args.needle_tokens, args.samples)
    lines += report_speed(store, args.speed_tokens)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["bytes", "perplexity", "needle", "speed"],
        choices=["bytes", "perplexity", "needle", "speed"],
    )
    parser.add_argument("--windows", type=int, default=12, help="perplexity windows")
    parser.add_argument("--samples", type=int, default=40, help="needles per method")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, separate store")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.measured, args.needle_tokens, args.speed_tokens = 4096, NEEDLE_TOKENS, SPEED_TOKENS
    store_path, report_path = STORE, RESULTS / "quantization.md"
    if args.quick:
        args.windows, args.samples = 2, 4
        args.measured = args.needle_tokens = args.speed_tokens = 2048
        store_path, report_path = QUICK_STORE, QUICK_STORE.with_suffix(".md")
    store = Store(store_path)
    timings = {}
    for section in ("bytes", "perplexity", "needle", "speed"):
        if section not in args.sections:
            continue
        start = time.perf_counter()
        say(f"== {section}")
        if section == "bytes":
            section_bytes(store, args.measured)
        elif section == "perplexity":
            section_perplexity(store, args.windows)
        elif section == "needle":
            section_needle(store, args.needle_tokens, args.samples)
        else:
            section_speed(store, args.speed_tokens)
        timings[section] = time.perf_counter() - start
        say(f"== {section} done in {timings[section]:.0f}s")
    text = report(store, args)
    report_path.write_text(text)
    say(text)
    say(f"wrote {report_path} and {store_path}; section seconds: {timings}")


if __name__ == "__main__":
    main()
