"""``write_report``: read a run's SQLite file once, then write the HTML page, its PNGs and ``summary.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from contextlab.bench.report.figures import _figures
from contextlab.bench.report.page import _page
from contextlab.bench.report.stats import MethodSummary, summarise
from contextlab.bench.store import RunStore


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
        "calls_per_answer": m.calls_per_answer,
        "tokens_per_answer": None if math.isnan(m.tokens_per_answer) else m.tokens_per_answer,
    }
