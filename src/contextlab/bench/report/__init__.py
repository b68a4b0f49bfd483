"""``contextlab report RUN``: an HTML page + PNGs from a run's SQLite file, readable with no network.

Contents, most decisive first: the best method at each KV budget (95% intervals, ties marked), a method
table sorted by accuracy within budget, accuracy vs KV memory and vs latency with the Pareto front marked,
accuracy by length, depth x length heatmaps per task and method (mean and n in every cell), per-task
tables, per-turn accuracy for shared-context tasks, the run spec and environment.

The package splits by concept: ``stats`` (intervals, Pareto front, summaries, budgets), ``labels`` (length
labels, method styles, label placement), ``figures`` (matplotlib PNGs), ``page`` (HTML tables and page) and
``write`` (``write_report``, which ties them together).
"""

from __future__ import annotations

from contextlab.bench.report.figures import _heatmap_axes
from contextlab.bench.report.labels import MARKER_SIZE, length_label, method_styles, place_labels
from contextlab.bench.report.stats import (
    MethodSummary,
    Paired,
    Stat,
    best_per_budget,
    budget_label,
    interval,
    paired,
    pareto_front,
    summarise,
)
from contextlab.bench.report.write import write_report

# _heatmap_axes is private but re-exported: the figure tests draw one heatmap panel directly
__all__ = [
    "MARKER_SIZE",
    "MethodSummary",
    "Paired",
    "Stat",
    "_heatmap_axes",
    "best_per_budget",
    "budget_label",
    "interval",
    "length_label",
    "method_styles",
    "paired",
    "pareto_front",
    "place_labels",
    "summarise",
    "write_report",
]
