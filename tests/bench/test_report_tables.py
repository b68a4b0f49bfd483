"""Report tables: best method per budget with ties, per-token decode time, and a full page from a synthetic run."""

from __future__ import annotations

import json
import math
import re

import pytest

from contextlab.bench.report import best_per_budget, budget_label, interval, paired, summarise, write_report
from contextlab.bench.report.stats import paired_with
from contextlab.bench.spec import RunSpec
from contextlab.bench.store import RunStore

ENVIRONMENT = {"python": "3.11", "torch": "2.x", "device": "cpu: cpu"}


def row(method: str, score: float, **overrides) -> dict:
    """One result row with every stored column; cost columns default to a method keeping half the cache."""
    base = {
        "method": method,
        "task": "niah_single_1",
        "length": 4000,
        "sample_index": 0,
        "turn": 0,
        "task_name": "niah_single_1",
        "task_params": "{}",
        "seed": 0,
        "depth": 0.0,
        "metric": "string_match_all",
        "score": score,
        "prediction": "",
        "answers": "[]",
        "prompt_tokens": 4000,
        "prompt_chars": 4000,
        "new_tokens": 8,
        "kv_bytes": 500 if method != "full" else 1000,
        "kv_bytes_full": 1000,
        "peak_memory_bytes": 2**20,
        "prefill_seconds": 0.1,
        "decode_seconds": 0.08,
        "batch_size": 1,
        "model": "reference",
        "device": "cpu: cpu",
        "versions": "torch 2.x",
    }
    return base | overrides


def samples(method: str, correct: int, n: int = 10, **overrides) -> list[dict]:
    return [row(method, float(i < correct), sample_index=i, depth=i / (n - 1), **overrides) for i in range(n)]


def test_budget_labels_come_from_the_method_or_its_measured_share():
    assert budget_label("full", 1.0) == "full cache (100%)"
    assert budget_label("snapkv:0.5", 0.53) == "keep 50%"
    assert budget_label("snapkv:0.7", 0.3) == "keep 30%"  # exact, not 30.000000000000004%
    assert budget_label("snapkv:budget=512", 0.2) == "512 tokens"
    assert budget_label("snapkv:0.5+decode(h2o,budget=512)", 0.26) == "≈ 25% measured"
    assert budget_label("not_a_method:0.5", 0.52) == "≈ 50% measured"


def test_best_per_budget_marks_overlapping_intervals_as_tied():
    rows = samples("full", 9) + samples("snapkv:0.5", 8) + samples("tova:0.5", 7) + samples("streaming:0.5", 0)
    rows += samples("h2o:0.75", 2, kv_bytes=250)
    summary = summarise(rows)
    assert [m.method for m in summary] == ["full", "snapkv:0.5", "tova:0.5", "streaming:0.5", "h2o:0.75"]
    best = {b.budget: (b.method, [t.method for t in tied]) for b, tied in best_per_budget(summary)}
    assert best == {
        "full cache (100%)": ("full", []),
        "keep 50%": ("snapkv:0.5", ["tova:0.5"]),  # streaming's 0/10 interval lies below snapkv's
        "keep 25%": ("h2o:0.75", []),
    }
    assert interval([1.0] * 8 + [0.0] * 2).overlaps(interval([1.0] * 7 + [0.0] * 3))


def test_paired_sign_test_counts_discordant_samples_and_matches_the_binomial_tail():
    full = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.5]
    other = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.75]
    result = paired(full, other)
    assert (result.n, result.better, result.worse) == (8, 2, 3)  # ties (samples 0, 3, 6) are left out
    assert result.p == pytest.approx(1.0)  # 2 vs 3 of 5: as even as it gets
    lopsided = paired([1.0] * 10, [0.0] * 10)  # worse on all 10: 2 * 0.5**10
    assert lopsided.p == pytest.approx(2 / 1024) and lopsided.cell() == "+0 / -10 (p = 0.002)"
    eight_of_nine = paired([0.0] * 9 + [1.0], [1.0] * 8 + [0.0] * 2)  # better on 8, worse on 1: 2 * 10 / 512
    assert eight_of_nine.p == pytest.approx(20 / 512)
    assert paired([], []).p == 1.0
    with pytest.raises(ValueError, match="same samples"):
        paired([1.0], [1.0, 0.0])


def test_methods_are_paired_with_full_attention_on_the_samples_both_ran():
    rows = samples("full", 9) + samples("snapkv:0.5", 6)
    rows += [row("snapkv:0.5", 1.0, sample_index=20)]  # full never ran this sample: left out of the pairs
    rows += samples("tova:0.5", 9, length=8000)  # another length than full's: nothing to pair with
    versus = paired_with(rows)
    assert set(versus) == {"snapkv:0.5"}
    assert (versus["snapkv:0.5"].n, versus["snapkv:0.5"].better, versus["snapkv:0.5"].worse) == (10, 0, 3)
    assert paired_with(samples("snapkv:0.5", 6)) == {}


def test_decode_time_is_per_generated_token_and_ttft_is_first_turn_prefill():
    # a failing method that rambles 40 tokens spends 5x the decode time per sample at the same speed per token
    rows = samples("snapkv:0.5", 10, new_tokens=8, decode_seconds=0.08)
    rows += samples("tova:0.5", 0, new_tokens=40, decode_seconds=0.4)
    rows += [row("tova:0.5", 0.0, turn=1, prefill_seconds=0.0, new_tokens=40, decode_seconds=0.4)]
    by_method = {m.method: m for m in summarise(rows)}
    assert by_method["snapkv:0.5"].decode_ms_per_token == pytest.approx(10.0)
    assert by_method["tova:0.5"].decode_ms_per_token == pytest.approx(10.0)
    assert by_method["tova:0.5"].prefill_seconds == pytest.approx(0.1)  # later turns do not dilute it


def test_calls_and_tokens_per_answer_are_summarised():
    rows = samples("rag:k=2", 5, calls=3, tokens_processed=600) + samples("full", 5)  # full: a schema-1 run
    by_method = {m.method: m for m in summarise(rows)}
    assert (by_method["rag:k=2"].calls_per_answer, by_method["rag:k=2"].tokens_per_answer) == (3.0, 600.0)
    assert by_method["full"].calls_per_answer == 1.0 and math.isnan(by_method["full"].tokens_per_answer)


@pytest.fixture
def synthetic_run(tmp_path):
    """A run of 15 methods, many at identical KV ratio and accuracy, at 4000 and 4096 tokens."""
    methods = ["full", *(f"{m}:0.5" for m in ("streaming", "snapkv", "tova", "h2o", "knorm", "adakv", "pyramidkv"))]
    methods += [f"{m}:0.75" for m in ("streaming", "snapkv", "tova", "h2o", "knorm", "adakv", "pyramidkv")]
    spec = RunSpec(model="reference", methods=methods, tasks=["niah_single_1"], lengths=[4000, 4096], samples=10)
    store = RunStore.create(tmp_path / "run", spec, ENVIRONMENT)
    rows = []
    for i, method in enumerate(methods):
        kv = 1000 if method == "full" else 500 if method.endswith("0.5") else 250
        for length in (4000, 4096):
            rows += samples(method, 10 - i % 3 * 4, length=length, kv_bytes=kv)
    store.add_rows(rows)
    store.close()
    return tmp_path / "run"


def test_report_page_puts_the_budget_answer_first(synthetic_run, tmp_path):
    page = write_report(synthetic_run, tmp_path / "report").read_text()
    assert page.index("Which method for my budget") < page.index("<h2>Methods</h2>") < page.index("<img")
    assert "4000 tokens" in page and "4K tokens" in page and "3.90625K" not in page and "3K" not in page
    assert "decode ms/token" in page and "TTFT ms" in page and "tied" in page
    assert "cpu: cpu (default)" in page and "None" not in page
    assert "vs full, same samples" in page and "(p = " in page
    assert not re.search(r"<th[^>]*></th>", page)  # every column has a header
    records = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [r["decode_ms_per_token"] for r in records] == [pytest.approx(10.0)] * 15
    keep_half = [r for r in records if r["budget"] == "keep 50%"]
    assert [r["accuracy"] for r in keep_half] == sorted((r["accuracy"] for r in keep_half), reverse=True)
    for name in ("pareto_memory.png", "pareto_latency.png", "accuracy_by_length.png", "heatmap_niah_single_1.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000
