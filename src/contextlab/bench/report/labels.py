"""Plot labelling: exact length labels, a fixed colour and marker per method, and label placement that
keeps every label clear of the others and of every marker."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.text import Annotation

log = logging.getLogger(__name__)

MARKER_SIZE = 6.0  # points; label placement keeps this clear around every marker
# 10 colours x 7 markers, coprime: method i gets colour i % 10 and marker i % 7, distinct for 70 methods
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def length_label(n: int) -> str:
    """Exact context-length label: whole multiples of 1024 as ``K`` (4096 -> "4K"), anything else in full
    (4000 -> "4000"); never rounded, so two different lengths never share a label."""
    for unit, suffix in ((2**20, "M"), (2**10, "K")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def method_styles(methods: Iterable[str]) -> dict[str, tuple[str, str]]:
    """A (colour, marker) pair per method, distinct for up to 70 methods and fixed by name order ("full"
    first), so a method keeps its look across plots and runs with the same methods."""
    ordered = sorted(set(methods), key=_method_key)
    return {m: (COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(ordered)}


def _method_key(method: str) -> tuple[bool, str]:
    return method != "full", method


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
