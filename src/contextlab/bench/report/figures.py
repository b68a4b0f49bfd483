"""Report figures (PNG, matplotlib's Agg backend): accuracy vs KV memory and vs latency with the Pareto
front marked, accuracy by length, and depth x length heatmaps per task and method."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from contextlab.bench.report.labels import MARKER_SIZE, _method_key, length_label, method_styles, place_labels
from contextlab.bench.report.stats import MethodSummary, _mean, pareto_front

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DEPTH_BINS = 5
DPI = 110


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
