"""``contextlab report RUN``: an HTML page + PNGs from a run's SQLite file, readable with no network.

Contents: a method summary (accuracy with 95% confidence intervals, KV memory, latency), accuracy vs KV
memory and vs latency with the Pareto front marked, accuracy by length, depth x length heatmaps per task
and method, per-task tables, per-turn accuracy for shared-context tasks, the run spec and environment.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from contextlab.bench.store import RunStore

DEPTH_BINS = 5


@dataclass(frozen=True)
class Stat:
    n: int
    mean: float
    low: float
    high: float

    def cell(self) -> str:
        return f"{100 * self.mean:.0f}% <small>[{100 * self.low:.0f}–{100 * self.high:.0f}]</small>"


def interval(scores: list[float]) -> Stat:
    """Mean with a 95% interval: Wilson's for 0/1 scores, the normal approximation otherwise."""
    n = len(scores)
    if n == 0:
        return Stat(0, float("nan"), float("nan"), float("nan"))
    mean = sum(scores) / n
    z = 1.96
    if all(s in (0.0, 1.0) for s in scores):
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        # Wilson's interval contains the mean; min/max keep that true under floating-point rounding too
        return Stat(n, mean, min(mean, max(0.0, centre - half)), max(mean, min(1.0, centre + half)))
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(1, n - 1))
    half = z * sd / math.sqrt(n)
    return Stat(n, mean, max(0.0, mean - half), min(1.0, mean + half))


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names whose (cost, accuracy) no other point beats on both (lower cost, higher accuracy)."""
    front = set()
    for name, (cost, acc) in points.items():
        dominated = any(
            c <= cost and a >= acc and (c, a) != (cost, acc) for other, (c, a) in points.items() if other != name
        )
        if not dominated:
            front.add(name)
    return front


@dataclass
class MethodSummary:
    method: str
    accuracy: Stat
    kv_ratio: float
    prefill_seconds: float
    decode_seconds: float
    peak_memory_bytes: float

    @property
    def latency(self) -> float:
        return self.prefill_seconds + self.decode_seconds


def summarise(rows: list[dict]) -> list[MethodSummary]:
    by_method = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    out = []
    for method, rs in by_method.items():
        first_turns = [r for r in rs if r["turn"] == 0]
        out.append(
            MethodSummary(
                method=method,
                accuracy=interval([r["score"] for r in rs]),
                kv_ratio=_mean([r["kv_bytes"] / r["kv_bytes_full"] for r in rs if r["kv_bytes_full"]]),
                prefill_seconds=_mean([r["prefill_seconds"] for r in first_turns]),
                decode_seconds=_mean([r["decode_seconds"] for r in rs]),
                peak_memory_bytes=_mean([r["peak_memory_bytes"] for r in rs]),
            )
        )
    return sorted(out, key=lambda m: (m.method != "full", m.method))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` and its PNGs into ``out`` (default ``<run>/report``); returns the HTML path."""
    store = RunStore.open(run)
    try:
        rows, spec, env = store.rows(), store.spec(), store.environment()
    finally:
        store.close()
    if not rows:
        raise ValueError(f"run {run} has no finished samples yet; nothing to report")
    out = Path(out) if out else store.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    figures = _figures(rows, summary, out)
    page = _page(rows, summary, figures, spec, env, store.run_dir.name)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    (out / "summary.json").write_text(
        json.dumps(
            [
                {
                    "method": m.method,
                    "accuracy": m.accuracy.mean,
                    "ci95": [m.accuracy.low, m.accuracy.high],
                    "n": m.accuracy.n,
                    "kv_ratio": m.kv_ratio,
                    "prefill_seconds": m.prefill_seconds,
                    "decode_seconds": m.decode_seconds,
                }
                for m in summary
            ],
            indent=2,
        )
    )
    return path


# -- figures ---------------------------------------------------------------------------------------------
def _figures(rows: list[dict], summary: list[MethodSummary], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    for name, attr, label in (
        ("pareto_memory.png", "kv_ratio", "KV cache bytes / full attention"),
        ("pareto_latency.png", "latency", "seconds per sample (prefill + decode)"),
    ):
        points = {m.method: (getattr(m, attr), m.accuracy.mean) for m in summary}
        front = pareto_front(points)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in summary:
            x, y = points[m.method]
            ax.errorbar(
                x,
                y,
                yerr=[[y - m.accuracy.low], [m.accuracy.high - y]],
                fmt="o",
                color="tab:red" if m.method in front else "tab:gray",
                capsize=3,
            )
            ax.annotate(m.method, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ordered = sorted(points[n] for n in front)
        ax.plot([p[0] for p in ordered], [p[1] for p in ordered], "--", color="tab:red", lw=1, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (all tasks and lengths)")
        ax.set_ylim(-0.03, 1.05)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        figures.append((name, f"Accuracy vs {label}; red points are Pareto-optimal"))
    figures.append(_length_plot(rows, out, plt))
    figures += _heatmaps(rows, out, plt)
    return figures


def _length_plot(rows, out: Path, plt) -> tuple[str, str]:
    acc = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[r["method"]][r["length"]].append(r["score"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, by_len in sorted(acc.items()):
        lengths = sorted(by_len)
        ax.plot(lengths, [_mean(by_len[n]) for n in lengths], marker="o", label=method)
    all_lengths = sorted({r["length"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_lengths, [f"{n / 1024:g}K" if n >= 1024 else str(n) for n in all_lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.03, 1.05)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_length.png", dpi=110)
    plt.close(fig)
    return "accuracy_by_length.png", "Accuracy by context length, per method"


def _heatmaps(rows, out: Path, plt) -> list[tuple[str, str]]:
    figures = []
    for task in sorted({r["task"] for r in rows if r["depth"] is not None}):
        task_rows = [r for r in rows if r["task"] == task and r["depth"] is not None and r["turn"] == 0]
        methods, lengths = sorted({r["method"] for r in task_rows}), sorted({r["length"] for r in task_rows})
        cols = min(4, len(methods))
        grid_rows = math.ceil(len(methods) / cols)
        fig, axes = plt.subplots(grid_rows, cols, figsize=(3.2 * cols, 2.6 * grid_rows), squeeze=False)
        for ax, method in zip(axes.flat, methods, strict=False):
            grid = [[float("nan")] * len(lengths) for _ in range(DEPTH_BINS)]
            for j, n in enumerate(lengths):
                for b in range(DEPTH_BINS):
                    scores = [
                        r["score"]
                        for r in task_rows
                        if r["method"] == method
                        and r["length"] == n
                        and min(DEPTH_BINS - 1, int(r["depth"] * DEPTH_BINS)) == b
                    ]
                    grid[b][j] = _mean(scores) if scores else float("nan")
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
            ax.set_title(method, fontsize=8)
            ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(DEPTH_BINS), [f"{100 * b // DEPTH_BINS}%" for b in range(DEPTH_BINS)], fontsize=7)
        for ax in list(axes.flat)[len(methods) :]:
            ax.axis("off")
        fig.suptitle(f"{task}: accuracy by needle depth (rows) and length (columns)", fontsize=9)
        fig.tight_layout()
        name = "heatmap_" + "".join(c if c.isalnum() else "_" for c in task) + ".png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        figures.append((name, f"Depth x length accuracy for {task} (green = 100%, red = 0%)"))
    return figures


# -- HTML ------------------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,sans-serif;margin:2rem;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}td,th{border:1px solid #ccc;padding:.3rem .6rem;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;
border:1px solid #eee;margin:.5rem 0}small{color:#777}code{background:#f6f6f6;padding:0 .2rem}"""


def _table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _page(rows, summary, figures, spec, env, run_name: str) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>contextlab run {e(run_name)}</title>"
        f"<style>{CSS}</style></head><body><h1>contextlab run <code>{e(run_name)}</code></h1>",
        f"<p>Model <code>{e(spec.model)}</code>, {len(rows)} results. Accuracy is the task's score "
        "(RULER string match etc.) with a 95% confidence interval; KV is the bytes the cache holds after "
        "the prompt, relative to full attention; times are per sample (batch time / batch size).</p>",
        "<h2>Methods</h2>",
        _table(
            ["method", "accuracy [95% CI]", "n", "KV / full", "prefill s", "decode s", "peak MiB"],
            [
                [
                    e(m.method),
                    m.accuracy.cell(),
                    str(m.accuracy.n),
                    f"{m.kv_ratio:.3f}",
                    f"{m.prefill_seconds:.3f}",
                    f"{m.decode_seconds:.3f}",
                    f"{m.peak_memory_bytes / 2**20:.1f}",
                ]
                for m in summary
            ],
        ),
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
        _table(["setting", "value"], [[e(k), e(str(v))] for k, v in vars(spec).items()]),
        "<h2>Environment</h2>",
        _table(["", ""], [[e(k), e(str(v))] for k, v in env.items()]),
        "</body></html>",
    ]
    return "\n".join(parts)


def _task_table(rows, task: str) -> str:
    task_rows = [r for r in rows if r["task"] == task]
    lengths = sorted({r["length"] for r in task_rows})
    methods = sorted({r["method"] for r in task_rows}, key=lambda m: (m != "full", m))
    body = []
    for m in methods:
        cells = [interval([r["score"] for r in task_rows if r["method"] == m and r["length"] == n]) for n in lengths]
        body.append([html.escape(m)] + [c.cell() if c.n else "" for c in cells])
    return _table(["method"] + [f"{n} tokens" for n in lengths], body)


def _turn_table(rows, task: str) -> str:
    task_rows = [r for r in rows if r["task"] == task]
    turns = sorted({r["turn"] for r in task_rows})
    methods = sorted({r["method"] for r in task_rows}, key=lambda m: (m != "full", m))
    body = [
        [html.escape(m)]
        + [interval([r["score"] for r in task_rows if r["method"] == m and r["turn"] == t]).cell() for t in turns]
        for m in methods
    ]
    return _table(["method"] + [f"turn {t + 1}" for t in turns], body)
