"""Report statistics: 95% intervals, the Pareto front, one summary per method and the KV budget it is
compared at."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from contextlab.methods.base import Budget
from contextlab.methods.spec import build_method

KV_GRID = 0.05  # methods with no declared budget are grouped by their measured KV ratio on this grid


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


@dataclass(frozen=True)
class Paired:
    """Two methods scored on the same samples: where ``other`` scored higher (``better``) or lower (``worse``)
    than ``reference``, and the exact two-sided sign test's p-value over those discordant samples (ties
    dropped): the chance of a split at least this uneven if neither method were better."""

    n: int
    better: int
    worse: int
    p: float

    def cell(self) -> str:
        return f"+{self.better} / -{self.worse} (p = {self.p:.2g})"


def paired(reference: list[float], other: list[float]) -> Paired:
    """Compare two score lists sample by sample (same samples, same order); see :class:`Paired`."""
    if len(reference) != len(other):
        raise ValueError(f"paired scores need the same samples: {len(reference)} vs {len(other)} scores")
    better = sum(o > r for r, o in zip(reference, other, strict=True))
    worse = sum(o < r for r, o in zip(reference, other, strict=True))
    m, k = better + worse, min(better, worse)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m  # P(X <= k), X ~ Binomial(m, 1/2)
    return Paired(len(reference), better, worse, min(1.0, 2 * tail))


def paired_with(rows: list[dict], reference: str = "full") -> dict[str, Paired]:
    """Per method other than ``reference``: :func:`paired` against it over the samples (task, length, sample
    index, turn) both scored. Empty when the run has no ``reference`` rows."""

    def key(r: dict) -> tuple:
        return r["task"], r["length"], r["sample_index"], r["turn"]

    base = {key(r): r["score"] for r in rows if r["method"] == reference}
    by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r["method"] != reference and key(r) in base:
            by_method[r["method"]].append((base[key(r)], r["score"]))
    return {m: paired([a for a, _ in pairs], [b for _, b in pairs]) for m, pairs in by_method.items()}


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
    budget: str
    accuracy: Stat
    kv_ratio: float
    kv_bytes: float
    prefill_seconds: float  # time to first token: the first turn's prefill, per sample
    decode_ms_per_token: float  # total decode time / total generated tokens
    peak_memory_bytes: float
    calls_per_answer: float = 1.0  # model calls per row (input-level strategies make many)
    tokens_per_answer: float = math.nan  # tokens through the model per row (NaN: not recorded, older runs)


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
        calls_per_answer=_mean([r.get("calls", 1) for r in rs]),
        tokens_per_answer=_mean([r["tokens_processed"] for r in rs if r.get("tokens_processed") is not None]),
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


def _percent(x: float) -> str:
    return f"{round(100 * x, 4):g}%"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
