"""Input-level strategies in benchmark runs: spelled like methods, past the model's window, every row with
its calls, tokens and route."""

from __future__ import annotations

import pytest

from contextlab.bench.cli import _csv
from contextlab.bench.run import run_benchmark
from contextlab.bench.spec import RunSpec
from contextlab.bench.store import RESULTS_FILE, RunStore


@pytest.fixture(scope="module")
def strategy_run(model_dir, tmp_path_factory):
    spec = RunSpec(
        model=str(model_dir),
        methods=_csv("rag:k=2,chunk=128,router:k=2,chunk=128,tokens=1024,coa:chunk=900,note=8,full"),
        tasks=["niah_single_1", "scbench_kv:num_turns=2,num_needles=3"],
        lengths=[600],
        samples=2,
        batch_size=2,
        max_new_tokens=6,
    )
    summary = run_benchmark(spec, out_root=tmp_path_factory.mktemp("runs"), show_progress=False)
    return RunStore.open(summary.run_dir).rows()


def test_the_methods_flag_spells_strategies_like_methods():
    assert _csv("rag:k=8,chunk=256,snapkv:0.5,coa:chunk=2048") == ["rag:k=8,chunk=256", "snapkv:0.5", "coa:chunk=2048"]
    assert RunSpec(methods=["rag:k=8+snapkv:0.5"]).methods == ["rag:k=8+snapkv:0.5"]
    assert _csv("router:k=2,kv=snapkv:0.5,full") == ["router:k=2,kv=snapkv:0.5", "full"]  # a spec as a value
    with pytest.raises(ValueError, match=r"k \(chunks read\) must be an integer >= 1"):
        RunSpec(methods=["rag:k=0"])
    with pytest.raises(ValueError, match="input-level strategies run against a local model"):
        RunSpec(methods=["rag"], endpoint="http://127.0.0.1:9/v1", model="served")


def test_every_row_records_its_work(strategy_run):
    by_method = {}
    for r in strategy_run:
        by_method.setdefault(r["method"], []).append(r)
    assert set(by_method) == {"rag:k=2,chunk=128", "router:k=2,chunk=128,tokens=1024", "coa:chunk=900,note=8", "full"}
    assert len(by_method["rag:k=2,chunk=128"]) == 2 + 2 * 2  # needle samples + shared-context turns
    for r in by_method["full"]:
        assert r["calls"] == 1 and r["route"] is None
        if r["turn"] == 0:  # context and question, then the answer
            assert r["tokens_processed"] == r["prompt_tokens"] + r["new_tokens"]
        else:  # a later turn of a shared context reads its question only
            assert r["new_tokens"] < r["tokens_processed"] < r["prompt_tokens"] / 4
    for r in by_method["rag:k=2,chunk=128"]:
        assert r["calls"] == 1 and r["tokens_processed"] < r["prompt_tokens"]  # it read two chunks
    for r in by_method["coa:chunk=900,note=8"]:
        assert r["calls"] == 2 and r["tokens_processed"] > r["prompt_tokens"]  # one worker + the manager
    assert {r["route"] for r in by_method["router:k=2,chunk=128,tokens=1024"]} == {"full"}  # 600 tokens: within budget


def test_a_strategy_runs_past_the_window_without_the_escape_hatch(model_dir, tmp_path):
    spec = RunSpec(
        model=str(model_dir),
        methods=["rag:k=2,chunk=128", "router:k=2,chunk=128"],
        tasks=["niah_single_1"],
        lengths=[3000],  # the tiny model's window is 2048
        samples=1,
        max_new_tokens=4,
    )
    rows = RunStore.open(run_benchmark(spec, out_root=tmp_path, show_progress=False).run_dir).rows()
    assert {r["route"] for r in rows} == {None, "rag:k=2,chunk=128"}
    assert all(r["tokens_processed"] < 3000 for r in rows)


def test_a_strategy_whose_chunk_cannot_fit_is_refused_before_samples(model_dir, tmp_path):
    spec = RunSpec(model=str(model_dir), methods=["rag:chunk=4096"], tasks=["niah_single_1"], lengths=[600], samples=1)
    with pytest.raises(ValueError, match="larger than the model's window of 2048"):
        run_benchmark(spec, out_root=tmp_path, show_progress=False)
    assert not list(tmp_path.glob(f"*/{RESULTS_FILE}"))
