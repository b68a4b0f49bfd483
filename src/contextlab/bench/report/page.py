"""The report's HTML page: the best method per KV budget, the method table, the figures, per-task and
per-turn tables, the run spec and environment."""

from __future__ import annotations

import html
import math

from contextlab.bench.report.labels import _method_key, length_label
from contextlab.bench.report.stats import MethodSummary, Paired, best_per_budget, interval, paired_with

CSS = """body{font-family:system-ui,sans-serif;margin:2rem;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}td,th{border:1px solid #ccc;padding:.3rem .6rem;
text-align:right}th{background:#f3f3f3}.t{text-align:left}img{max-width:100%;
border:1px solid #eee;margin:.5rem 0}small{color:#777}code{background:#f6f6f6;padding:0 .2rem}
.best{font-weight:600}"""


def _table(head: list[str], body: list[list[str]], text_columns: tuple[int, ...] = (0,)) -> str:
    """An HTML table; numbers align right, the ``text_columns`` left."""
    th = "".join(_cell(h, i in text_columns, "th") for i, h in enumerate(head))
    trs = "".join("<tr>" + "".join(_cell(c, i in text_columns) for i, c in enumerate(r)) + "</tr>" for r in body)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _cell(content: str, text: bool, tag: str = "td") -> str:
    return f"<{tag} class='t'>{content}</{tag}>" if text else f"<{tag}>{content}</{tag}>"


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def _bytes_label(n: float) -> str:
    for unit, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= unit:
            return f"{n / unit:.2f} {suffix}"
    return f"{n:.0f} B"


def _budget_table(summary: list[MethodSummary]) -> str:
    e = html.escape
    body = [
        [
            e(best.budget),
            f"<span class='best'>{e(best.method)}</span>",
            best.accuracy.cell(),
            str(best.accuracy.n),
            _bytes_label(best.kv_bytes),
            _ms(best.prefill_seconds),
            f"{best.decode_ms_per_token:.2f}",
            e(", ".join(m.method for m in tied)) or "—",
        ]
        for best, tied in best_per_budget(summary)
    ]
    head = ["KV budget", "best method", "accuracy [95% CI]", "n", "KV bytes", "TTFT ms", "decode ms/token", "tied"]
    return _table(head, body, text_columns=(0, 1, 7))


def _methods_table(summary: list[MethodSummary], versus: dict[str, Paired]) -> str:
    standing = {best.method: "best" for best, _ in best_per_budget(summary)}
    standing |= {m.method: "tied" for _, tied in best_per_budget(summary) for m in tied}
    body = [
        [
            html.escape(m.budget),
            html.escape(m.method),
            m.accuracy.cell(),
            standing.get(m.method, ""),
            versus[m.method].cell() if m.method in versus else "—",
            str(m.accuracy.n),
            f"{m.kv_ratio:.3f}",
            _bytes_label(m.kv_bytes),
            _ms(m.prefill_seconds),
            f"{m.decode_ms_per_token:.2f}",
            f"{m.peak_memory_bytes / 2**20:.1f}",
            f"{m.calls_per_answer:.1f}",
            "—" if math.isnan(m.tokens_per_answer) else f"{m.tokens_per_answer:.0f}",
        ]
        for m in summary
    ]
    head = ["KV budget", "method", "accuracy [95% CI]", "at budget", "vs full, same samples", "n", "KV / full"]
    tail = ["KV bytes", "TTFT ms", "decode ms/token", "peak MiB", "model calls / answer", "tokens processed / answer"]
    return _table([*head, *tail], body, text_columns=(0, 1, 3, 4))


def _page(rows, summary, figures, spec, env, run_name: str) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>contextlab run {e(run_name)}</title>"
        f"<style>{CSS}</style></head><body><h1>contextlab run <code>{e(run_name)}</code></h1>",
        "<h2>Which method for my budget</h2>",
        _budget_table(summary),
        "<p>Per KV budget (the method's declared budget; composed methods by their measured KV share), the "
        "method with the highest mean accuracy and its 95% interval (Wilson's for 0/1 scores). <i>Tied</i> "
        "methods have intervals that overlap the best one's: this run cannot tell them apart.</p>",
        f"<p>Model <code>{e(spec.model)}</code>, {len(rows)} results. Accuracy is the task's score "
        "(RULER string match etc.); KV is the bytes the cache holds after the prompt; TTFT (time to first "
        "token) is the prefill time per sample; decode is the total decode time over all generated tokens, "
        "so a method that fails and rambles is not shown as slower per token.</p>",
        "<h2>Methods</h2>",
        _methods_table(summary, paired_with(rows)),
        "<p><i>vs full, same samples</i>: on the samples both ran, how many this method scored above (+) and "
        "below (-) full attention, and the exact two-sided sign test's p-value over those (a small p: a "
        "difference unlikely to be chance).</p>",
    ]
    for name, caption in figures:
        parts.append(f"<figure><img src='{e(name)}' alt='{e(caption)}'><figcaption>{e(caption)}</figcaption></figure>")
    parts.append("<h2>Per task</h2>")
    for task in sorted({r["task"] for r in rows}):
        parts += [f"<h3>{e(task)}</h3>", _task_table(rows, task)]
        if any(r["turn"] > 0 for r in rows if r["task"] == task):
            parts += ["<p>Accuracy per turn (shared context):</p>", _turn_table(rows, task)]
    parts += [
        "<h2>Run</h2>",
        _table(["setting", "value"], [[e(k), e(v)] for k, v in _run_settings(spec, rows)], text_columns=(0, 1)),
        "<h2>Environment</h2>",
        _table(["component", "version or value"], [[e(k), e(str(v))] for k, v in env.items()], text_columns=(0, 1)),
        "</body></html>",
    ]
    return "\n".join(parts)


def _run_settings(spec, rows: list[dict]) -> list[tuple[str, str]]:
    """The spec as (setting, text): lists joined, lengths labelled, the device actually used when unset."""
    out = []
    for key, value in vars(spec).items():
        if key in ("endpoint", "tokenizer") and value is None:
            continue  # a local run: nothing to say
        if key == "device" and value is None:
            used = sorted({r["device"] for r in rows if r.get("device")})
            value = f"{', '.join(used)} (default)" if used else "cpu (default)"
        elif key == "lengths":
            value = ", ".join(length_label(n) for n in value)
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        out.append((key, str(value)))
    return out


def _task_table(rows, task: str) -> str:
    task_rows = [r for r in rows if r["task"] == task]
    lengths = sorted({r["length"] for r in task_rows})
    methods = sorted({r["method"] for r in task_rows}, key=_method_key)
    body = []
    for m in methods:
        cells = [interval([r["score"] for r in task_rows if r["method"] == m and r["length"] == n]) for n in lengths]
        body.append([html.escape(m)] + [c.cell() if c.n else "" for c in cells])
    return _table(["method"] + [f"{length_label(n)} tokens" for n in lengths], body)


def _turn_table(rows, task: str) -> str:
    task_rows = [r for r in rows if r["task"] == task]
    turns = sorted({r["turn"] for r in task_rows})
    methods = sorted({r["method"] for r in task_rows}, key=_method_key)
    body = [
        [html.escape(m)]
        + [interval([r["score"] for r in task_rows if r["method"] == m and r["turn"] == t]).cell() for t in turns]
        for m in methods
    ]
    return _table(["method"] + [f"turn {t + 1}" for t in turns], body)
