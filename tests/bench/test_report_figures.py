"""Report figures: labels never collide, one look per method, exact length labels, aggregated heatmap cells."""

from __future__ import annotations

import itertools

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from contextlab.bench.report import MARKER_SIZE, _heatmap_axes, length_label, method_styles, place_labels


@pytest.mark.parametrize(
    ("tokens", "label"),
    [(4000, "4000"), (4096, "4K"), (1024, "1K"), (2048, "2K"), (8192, "8K"), (6000, "6000"), (512, "512"),
     (1536, "1536"), (3072, "3K"), (2**20, "1M"), (2**20 + 1024, "1025K")],
)  # fmt: skip
def test_length_label_is_exact(tokens, label):
    assert length_label(tokens) == label


def test_length_labels_never_share_a_label():
    lengths = range(16, 70_000)
    assert len({length_label(n) for n in lengths}) == len(lengths)


def test_method_styles_are_distinct_and_fixed_by_name():
    methods = ["full", *(f"m{i:02d}:0.5" for i in range(19))]
    styles = method_styles(methods)
    assert len(set(styles.values())) == 20
    assert method_styles(reversed(methods)) == styles  # the order methods come in does not matter
    assert styles["full"] == ("#1f77b4", "o")
    assert len(set(method_styles(f"m{i}" for i in range(70)).values())) == 70


def _label_boxes(fig, labels):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [label.get_window_extent(renderer) for label in labels]


def _assert_no_collision(ax, labels, points):
    fig = ax.figure
    boxes = _label_boxes(fig, labels)
    assert len(boxes) == len(points)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    half = MARKER_SIZE / 2 * fig.dpi / 72
    for box in boxes:
        for x, y in ax.transData.transform([(x, y) for _, x, y in points]):
            assert not (box.x0 < x + half and x - half < box.x1 and box.y0 < y + half and y - half < box.y1)
    area = ax.get_window_extent()
    assert all(area.x0 <= b.x0 and b.x1 <= area.x1 and area.y0 <= b.y0 and b.y1 <= area.y1 for b in boxes)


def test_labels_of_methods_at_identical_points_never_overlap():
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    points = [(f"method{i}:0.5", 0.5, 0.5) for i in range(14)]
    points += [(f"other{i}:0.5", 0.5, 0.52) for i in range(4)] + [("streaming:0.5", 0.51, 0.5), ("full", 1.0, 0.9)]
    ax.plot([x for _, x, _ in points], [y for _, _, y in points], "o", ms=MARKER_SIZE)
    ax.set_xlim(0, 1.1)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    labels = place_labels(ax, points)
    _assert_no_collision(ax, labels, points)
    assert [label.get_text() for label in labels] == [text for text, _, _ in points]
    plt.close(fig)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_of_crowded_random_points_never_overlap(seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0.3, 0.7, size=(25, 2)).round(1)  # rounded: many points coincide
    points = [(f"method-{i}", float(x), float(y)) for i, (x, y) in enumerate(xy)]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot(xy[:, 0], xy[:, 1], "o", ms=MARKER_SIZE)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    _assert_no_collision(ax, place_labels(ax, points), points)
    plt.close(fig)


def test_points_off_the_plot_get_no_label():
    fig, ax = plt.subplots()
    labels = place_labels(ax, [("a", 0.5, 0.5), ("no latency", float("nan"), 0.5)])
    assert [label.get_text() for label in labels] == ["a"]
    plt.close(fig)


def test_heatmap_cells_show_mean_and_n():
    fig, ax = plt.subplots()
    cells = {(0, 0): [1.0, 0.0, 1.0, 1.0], (1, 1): [0.0]}
    image = _heatmap_axes(ax, cells, (2, 2), plt)
    grid = image.get_array()
    assert grid[0, 0] == 0.75 and grid[1, 1] == 0.0 and np.ma.is_masked(grid[0, 1])
    assert sorted(t.get_text() for t in ax.texts) == ["0%\nn=1", "75%\nn=4"]
    plt.close(fig)
