"""``contextlab report RUN``: an HTML page + PNGs from a run's SQLite file, readable with no network.

Contents, most decisive first: the best method at each KV budget (95% intervals, ties marked), a method
table sorted by accuracy within budget, accuracy vs KV memory and vs latency with the Pareto front marked,
accuracy by length, depth x length heatmaps per task and method (mean and n in every cell), per-task
tables, per-turn accuracy for shared-context tasks, the run spec and environment.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from contextlab.bench.store import RunStore
from contextlab.methods.base import Budget
from contextlab.methods.spec import build_method

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.text import Annotation

log = logging.getLogger(__name__)

DEPTH_BINS = 5
KV_GRID = 0.05  # methods with no declared budget are grouped by their measured KV ratio on this grid
DPI = 110
MARKER_SIZE = 6.0  # points; label placement keeps this clear around every marker
# 10 colours x 7 markers, coprime: method i gets colour i % 10 and marker i % 7, distinct for 70 methods
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


# -- statistics ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    n: int
    mean: float
    low: float
    high: float

    def cell(self) -> str:
        return f"{100 * self.mean:.0f}% <small>[{100 * self.low:.0f}–{100 * self.high:.0f}]</small>"

    def overlaps(self, other: Stat) -> bool:
        return self.low <= other.high and other.low <= self.high


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


# -- labels ----------------------------------------------------------------------------------------------
def length_label(n: int) -> str:
    """Exact context-length label: whole multiples of 1024 as ``K`` (4096 -> "4K"), anything else in full
    (4000 -> "4000"); never rounded, so two different lengths never share a label."""
    for unit, suffix in ((2**20, "M"), (2**10, "K")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _percent(x: float) -> str:
    return f"{round(100 * x, 4):g}%"


def _bytes_label(n: float) -> str:
    for unit, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= unit:
            return f"{n / unit:.2f} {suffix}"
    return f"{n:.0f} B"


def budget_label(method: str, kv_ratio: float) -> str:
    """The KV budget a method is compared at: its declared budget ("keep 50%", "512 tokens"), else (composed
    or unknown methods) its measured KV ratio on a ``KV_GRID`` grid ("≈ 55% measured")."""
    if method == "full":
        return "full cache (100%)"
    try:
        budget = getattr(build_method(method), "effective_budget", None)
    except (ValueError, KeyError, ImportError):  # a method registered by a plugin absent here
        budget = None
    if isinstance(budget, Budget):
        return f"{budget.tokens} tokens" if budget.tokens is not None else f"keep {_percent(1 - budget.ratio)}"
    if math.isnan(kv_ratio):
        return "unknown"
    return f"≈ {_percent(round(kv_ratio / KV_GRID) * KV_GRID)} measured"


def method_styles(methods: Iterable[str]) -> dict[str, tuple[str, str]]:
    """A (colour, marker) pair per method, distinct for up to 70 methods and fixed by name order ("full"
    first), so a method keeps its look across plots and runs with the same methods."""
    ordered = sorted(set(methods), key=_method_key)
    return {m: (COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(ordered)}


def _method_key(method: str) -> tuple[bool, str]:
    return method != "full", method


# -- summary ---------------------------------------------------------------------------------------------
@dataclass
class MethodSummary:
    method: str
    budget: str
    accuracy: Stat
    kv_ratio: float
    kv_bytes: float
    prefill_seconds: float  # time to first token: the first turn's prefill, per sample
    decode_ms_per_token: float  # total decode time / total generated tokens
    peak_memory_bytes: float


def summarise(rows: list[dict]) -> list[MethodSummary]:
    """One summary per method, grouped by budget (largest KV first), most accurate first within a budget."""
    by_method = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    out = [_summarise_method(method, rs) for method, rs in by_method.items()]
    order = {b: i for i, b in enumerate(_budget_order(out))}
    return sorted(out, key=lambda m: (order[m.budget], -m.accuracy.mean, m.method))


def _summarise_method(method: str, rs: list[dict]) -> MethodSummary:
    kv_ratio = _mean([r["kv_bytes"] / r["kv_bytes_full"] for r in rs if r["kv_bytes_full"]])
    new_tokens = sum(r["new_tokens"] for r in rs)
    return MethodSummary(
        method=method,
        budget=budget_label(method, kv_ratio),
        accuracy=interval([r["score"] for r in rs]),
        kv_ratio=kv_ratio,
        kv_bytes=_mean([r["kv_bytes"] for r in rs]),
        prefill_seconds=_mean([r["prefill_seconds"] for r in rs if r["turn"] == 0]),
        decode_ms_per_token=1000 * sum(r["decode_seconds"] for r in rs) / new_tokens if new_tokens else math.nan,
        peak_memory_bytes=_mean([r["peak_memory_bytes"] for r in rs]),
    )


def _budget_order(summary: list[MethodSummary]) -> list[str]:
    ratios = defaultdict(list)
    for m in summary:
        ratios[m.budget].append(m.kv_ratio)
    return sorted(ratios, key=lambda b: (-_mean(ratios[b]), b))


def best_per_budget(summary: list[MethodSummary]) -> list[tuple[MethodSummary, list[MethodSummary]]]:
    """Per budget (in summary order): the most accurate method and those whose 95% intervals overlap its."""
    groups: dict[str, list[MethodSummary]] = defaultdict(list)
    for m in summary:
        groups[m.budget].append(m)
    out = []
    for group in groups.values():
        best = max(group, key=lambda m: (m.accuracy.mean, -m.kv_bytes))
        out.append((best, [m for m in group if m is not best and m.accuracy.overlaps(best.accuracy)]))
    return out


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
    path = out / "report.html"
    path.write_text(_page(rows, summary, figures, spec, env, store.run_dir.name), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps([_summary_record(m) for m in summary], indent=2))
    return path


def _summary_record(m: MethodSummary) -> dict:
    return {
        "method": m.method,
        "budget": m.budget,
        "accuracy": m.accuracy.mean,
        "ci95": [m.accuracy.low, m.accuracy.high],
        "n": m.accuracy.n,
        "kv_ratio": m.kv_ratio,
        "kv_bytes": m.kv_bytes,
        "prefill_seconds": m.prefill_seconds,
        "decode_ms_per_token": m.decode_ms_per_token,
        "peak_memory_bytes": m.peak_memory_bytes,
    }


# -- label placement -------------------------------------------------------------------------------------
def place_labels(ax: Axes, points: list[tuple[str, float, float]], fontsize: float = 7) -> list[Annotation]:
    """Label each ``(text, x, y)`` point so that no two labels' boxes overlap and no label covers a marker.

    Call it once the axes' limits and position are final (after ``tight_layout``). Each label's box is
    measured with the renderer; spots on a grid around its point (beside the marker, then stacked above and
    below, then further columns out) are tried nearest first, and the first inside the axes that touches no
    marker and no placed label wins. A label set away from its point gets a leader line."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72  # pixels per point
    finite = [(t, x, y) for t, x, y in points if math.isfinite(x) and math.isfinite(y)]
    anchors = ax.transData.transform([(x, y) for _, x, y in finite]) if finite else np.zeros((0, 2))
    half = (MARKER_SIZE / 2 + 1) * px
    taken = [np.concatenate([a - half, a + half]) for a in anchors]  # boxes as [x0, y0, x1, y1] pixels
    area = ax.get_window_extent(renderer).extents
    labels = []
    for (text, x, y), anchor in zip(finite, anchors, strict=True):
        label = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=fontsize, va="center")
        size = label.get_window_extent(renderer).size + 2  # one pixel of air on each side
        (dx, dy), box = _free_spot(anchor, size, half, np.array(taken), anchors, area)
        label.set_horizontalalignment("left" if dx > 0 else "right")
        label.set_position((dx / px, dy / px))
        taken.append(box)
        labels.append(label)
        if abs(dy) > 0.5 or abs(dx) > half + 3 * px:
            _leader(ax, (x, y), (dx / px, dy / px))
    return labels


def _free_spot(
    anchor: np.ndarray, size: np.ndarray, half: float, taken: np.ndarray, markers: np.ndarray, area: np.ndarray
) -> tuple[tuple[float, float], np.ndarray]:
    """The nearest grid spot (text anchor offset in pixels, label box) inside ``area`` and clear of the
    ``taken`` boxes, preferring spots nearer to the label's own marker than to any other marker (so a label
    is never read as its neighbour's); when the axes are too crowded for any, the spot touching fewest."""
    offsets, boxes = _candidate_spots(anchor, size, half, area)
    hits = _overlap_matrix(boxes, taken).sum(axis=1) if len(taken) else np.zeros(len(boxes), dtype=int)
    inside = (boxes[:, :2] >= area[:2]).all(axis=1) & (boxes[:, 2:] <= area[2:]).all(axis=1)
    free = (hits == 0) & inside
    others = markers[np.abs(markers - anchor).max(axis=1) > 1]  # markers at the same spot cannot be told apart
    if len(others):
        own = _box_distance(boxes, anchor[None])[:, 0]
        clear = free & (own < _box_distance(boxes, others).min(axis=1))
        free = clear if clear.any() else free
    if free.any():
        k = int(np.argmax(free))  # candidates are ordered nearest first
    else:
        log.warning("no free spot for a label in the plot; it overlaps %d others", hits.min())
        k = int(np.argmin(hits + 1000 * ~inside))
    return (float(offsets[k, 0]), float(offsets[k, 1])), boxes[k]


def _candidate_spots(
    anchor: np.ndarray, size: np.ndarray, half: float, area: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Label spots around ``anchor``, nearest first: offsets ``[K, 2]`` (right of the marker the box starts
    there, left of it the box ends there) and boxes ``[K, 4]`` as x0, y0, x1, y1 pixels."""
    width, height = size
    steps = np.arange(1, int((area[3] - area[1]) / height) + 1)
    rows = np.concatenate([[0], np.column_stack([steps, -steps]).ravel()]) * height  # 0, +h, -h, +2h...
    cols = np.arange(int((area[2] - area[0]) / width) + 1) * (width + 2)
    dy, col, side = (g.ravel() for g in np.meshgrid(rows, cols, (1.0, -1.0), indexing="ij"))
    order = np.argsort(np.hypot(col, dy), kind="stable")
    dx, dy = (side * (half + 2 + col))[order], dy[order]
    x0 = anchor[0] + np.where(dx > 0, dx, dx - width)
    y0 = anchor[1] + dy - height / 2
    return np.column_stack([dx, dy]), np.column_stack([x0, y0, x0 + width, y0 + height])


def _box_distance(boxes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``[len(boxes), len(points)]`` pixel distances from each box's edge to each point (0 inside)."""
    b, p = boxes[:, None, :], points[None, :, :]
    dx = np.maximum(np.maximum(b[..., 0] - p[..., 0], p[..., 0] - b[..., 2]), 0)
    dy = np.maximum(np.maximum(b[..., 1] - p[..., 1], p[..., 1] - b[..., 3]), 0)
    return np.hypot(dx, dy)


def _overlap_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` booleans: box a[i] and box b[j] share some area (touching edges do not count)."""
    a, b = a[:, None, :], b[None, :, :]
    return (a[..., 0] < b[..., 2]) & (b[..., 0] < a[..., 2]) & (a[..., 1] < b[..., 3]) & (b[..., 1] < a[..., 3])


def _leader(ax: Axes, xy: tuple[float, float], offset: tuple[float, float]) -> None:
    arrow = {"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0, "shrinkB": MARKER_SIZE / 2}
    ax.annotate("", xy, xytext=offset, textcoords="offset points", arrowprops=arrow, zorder=1)


# -- figures ---------------------------------------------------------------------------------------------
def _figures(rows: list[dict], summary: list[MethodSummary], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory = [(lambda m: m.kv_ratio, "KV cache bytes / full attention")]
    latency = [
        (lambda m: 1000 * m.prefill_seconds, "time to first token (ms per sample, prefill)"),
        (lambda m: m.decode_ms_per_token, "decode ms per generated token"),
    ]
    return [
        _pareto_figure(summary, memory, "pareto_memory.png", plt, out),
        _pareto_figure(summary, latency, "pareto_latency.png", plt, out),
        _length_plot(rows, out, plt),
        *_heatmaps(rows, out, plt),
    ]


Panel = tuple[Callable[[MethodSummary], float], str]


def _pareto_figure(summary: list[MethodSummary], panels: list[Panel], name: str, plt, out: Path) -> tuple[str, str]:
    fig, axes = plt.subplots(1, len(panels), figsize=(2.5 + 5 * len(panels), 4.8), dpi=DPI, squeeze=False)
    points = [{m.method: (x_of(m), m.accuracy.mean) for m in summary} for x_of, _ in panels]
    for ax, pts, (_, label) in zip(axes[0], points, panels, strict=True):
        _pareto_axes(ax, summary, pts, label)
    axes[0][-1].legend(handles=_pareto_handles(plt), loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.tight_layout()
    for ax, pts in zip(axes[0], points, strict=True):
        place_labels(ax, [(m, x, y) for m, (x, y) in pts.items()])
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    what = " and ".join(label for _, label in panels)
    return name, f"Accuracy vs {what}; red points are Pareto-optimal, bars are 95% intervals"


def _pareto_axes(ax: Axes, summary: list[MethodSummary], points: dict[str, tuple[float, float]], xlabel: str) -> None:
    front = pareto_front({m: p for m, p in points.items() if all(map(math.isfinite, p))})
    for m in summary:
        x, y = points[m.method]
        colour = "tab:red" if m.method in front else "tab:gray"
        err = [[y - m.accuracy.low], [m.accuracy.high - y]]
        ax.errorbar(x, y, yerr=err, fmt="o", ms=MARKER_SIZE, color=colour, capsize=3, zorder=3)
    ordered = sorted(points[n] for n in front)
    ax.plot([p[0] for p in ordered], [p[1] for p in ordered], "--", color="tab:red", lw=1, zorder=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (all tasks and lengths)")
    ax.set_ylim(-0.03, 1.05)
    ax.margins(x=0.15)
    ax.set_xlim(ax.get_xlim())  # frozen, so labels placed later keep their positions relative to the points


def _pareto_handles(plt) -> list:
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], color="tab:red", marker="o", ls="none", label="Pareto-optimal"),
        Line2D([], [], color="tab:gray", marker="o", ls="none", label="dominated"),
        Line2D([], [], color="tab:red", ls="--", lw=1, label="Pareto front"),
    ]


def _length_plot(rows: list[dict], out: Path, plt) -> tuple[str, str]:
    acc = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[r["method"]][r["length"]].append(r["score"])
    styles = method_styles(acc)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=DPI)
    for method in sorted(acc, key=_method_key):
        lengths = sorted(acc[method])
        colour, marker = styles[method]
        ys = [_mean(acc[method][n]) for n in lengths]
        ax.plot(lengths, ys, marker=marker, color=colour, ms=5, lw=1.2, label=method)
    all_lengths = sorted({r["length"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_lengths, [length_label(n) for n in all_lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.03, 1.05)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), ncol=1 if len(acc) <= 20 else 2)
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_length.png", dpi=DPI)
    plt.close(fig)
    return "accuracy_by_length.png", "Accuracy by context length, per method"


def _depth_bins(depths: Iterable[float]) -> tuple[list[str], Callable[[float], int]]:
    """Row labels and depth -> row: one row per depth when there are few, else ``DEPTH_BINS`` equal bins."""
    distinct = sorted({round(d, 6) for d in depths})
    if len(distinct) <= DEPTH_BINS:
        return [f"{100 * d:.0f}%" for d in distinct], lambda d: distinct.index(round(d, 6))
    labels = [f"{100 * b // DEPTH_BINS}–{100 * (b + 1) // DEPTH_BINS}%" for b in range(DEPTH_BINS)]
    return labels, lambda d: min(DEPTH_BINS - 1, int(d * DEPTH_BINS))


def _heatmaps(rows: list[dict], out: Path, plt) -> list[tuple[str, str]]:
    figures = []
    for task in sorted({r["task"] for r in rows if r["depth"] is not None}):
        task_rows = [r for r in rows if r["task"] == task and r["depth"] is not None and r["turn"] == 0]
        name = "heatmap_" + "".join(c if c.isalnum() else "_" for c in task) + ".png"
        _heatmap_figure(task, task_rows, out / name, plt)
        figures.append((name, f"{task}: mean accuracy and n per needle depth and length, per method"))
    return figures


def _heatmap_figure(task: str, task_rows: list[dict], path: Path, plt) -> None:
    from matplotlib.ticker import PercentFormatter

    methods = sorted({r["method"] for r in task_rows}, key=_method_key)
    lengths = sorted({r["length"] for r in task_rows})
    depth_labels, depth_row = _depth_bins(r["depth"] for r in task_rows)
    cols = min(4, len(methods))
    width = max(2.8, 0.75 * len(lengths) + 1.4)
    grid_rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(width * cols + 1, 2.8 * grid_rows + 0.6), squeeze=False)
    axes = axes.ravel()
    for ax, method in zip(axes, methods, strict=False):
        cells: dict[tuple[int, int], list[float]] = defaultdict(list)
        for r in task_rows:
            if r["method"] == method:
                cells[depth_row(r["depth"]), lengths.index(r["length"])].append(r["score"])
        image = _heatmap_axes(ax, cells, (len(depth_labels), len(lengths)), plt)
        ax.set_title(method, fontsize=8)
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depth_labels)), depth_labels, fontsize=7)
        ax.set_ylabel("needle depth", fontsize=7)
    for ax in axes[len(methods) :]:
        ax.axis("off")
    fig.suptitle(f"{task}: accuracy by needle depth (rows) and context length (columns)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    bar = fig.colorbar(image, cax=fig.add_axes((0.92, 0.15, 0.015, 0.7)), format=PercentFormatter(xmax=1))
    bar.set_label("mean accuracy", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _heatmap_axes(ax: Axes, cells: dict[tuple[int, int], list[float]], shape: tuple[int, int], plt):
    """Draw one method's grid of mean scores with "mean / n" written in each cell; returns the image."""
    grid = np.full(shape, np.nan)  # [depth rows, lengths]
    for (i, j), scores in cells.items():
        grid[i, j] = _mean(scores)
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#eeeeee")
    image = ax.imshow(grid, vmin=0, vmax=1, cmap=cmap, aspect="auto", origin="upper")
    for (i, j), scores in cells.items():
        mean = grid[i, j]
        colour = "white" if mean < 0.2 or mean > 0.85 else "black"
        ax.text(j, i, f"{100 * mean:.0f}%\nn={len(scores)}", ha="center", va="center", fontsize=7, color=colour)
    return image


# -- HTML ------------------------------------------------------------------------------------------------
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


def _methods_table(summary: list[MethodSummary]) -> str:
    standing = {best.method: "best" for best, _ in best_per_budget(summary)}
    standing |= {m.method: "tied" for _, tied in best_per_budget(summary) for m in tied}
    body = [
        [
            html.escape(m.budget),
            html.escape(m.method),
            m.accuracy.cell(),
            standing.get(m.method, ""),
            str(m.accuracy.n),
            f"{m.kv_ratio:.3f}",
            _bytes_label(m.kv_bytes),
            _ms(m.prefill_seconds),
            f"{m.decode_ms_per_token:.2f}",
            f"{m.peak_memory_bytes / 2**20:.1f}",
        ]
        for m in summary
    ]
    head = ["KV budget", "method", "accuracy [95% CI]", "at budget", "n", "KV / full", "KV bytes"]
    return _table([*head, "TTFT ms", "decode ms/token", "peak MiB"], body, text_columns=(0, 1, 3))


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
        _methods_table(summary),
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
