"""``contextlab bench --endpoint``: the same tasks against an OpenAI-compatible server (contextlab's own here),
the same rows as a local run, the endpoint recorded; refusals for a wrong model name or a dead address."""

from __future__ import annotations

import json
import subprocess

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from contextlab.bench.run import run_benchmark
from contextlab.bench.spec import RunSpec
from contextlab.bench.store import RunStore
from tests.bench.test_bench_cli import bench as run_bench
from tests.serve.server import free_port, start_server, stop_server

COMMON = dict(methods=["full", "snapkv:0.5"], lengths=[900], samples=3, batch_size=3)


@pytest.fixture(scope="module")
def server():
    proc, base = start_server("--model", "reference", "--reuse-min-tokens", "100000")
    yield base
    stop_server(proc)


def predictions(summary) -> dict[tuple, str]:
    store = RunStore.open(summary.run_dir)
    rows = {(r["method"], r["task"], r["sample_index"], r["turn"]): r["prediction"] for r in store.rows()}
    store.close()
    return rows


def test_endpoint_rows_equal_a_local_run(server, tmp_path):
    spec = RunSpec(model="reference", tasks=["niah_single_1"], endpoint=f"{server}/v1", tokenizer="reference", **COMMON)
    remote = run_benchmark(spec, out_root=tmp_path / "remote", show_progress=False)
    local = run_benchmark(
        RunSpec(model="reference", tasks=["niah_single_1"], **COMMON), out_root=tmp_path / "local", show_progress=False
    )
    assert predictions(remote) == predictions(local) and len(predictions(remote)) == 6
    store = RunStore.open(remote.run_dir)
    rows, env = store.rows(), store.environment()
    store.close()
    assert env["endpoint"] == f"{server}/v1" and env["served_model"]["id"] == "reference"
    assert all(r["device"] == f"endpoint {server}/v1" for r in rows)
    snap = [r for r in rows if r["method"] == "snapkv:0.5"]
    assert all(0 < r["kv_bytes"] < r["kv_bytes_full"] for r in snap)  # the server's own accounting


def test_shared_context_turns_reuse_the_compressed_context(server, tmp_path):
    # A contextlab server compresses the context once without the question: a local run does the same with
    # question_aware=False in "requests" mode.
    spec = RunSpec(model="reference", tasks=["scbench_kv"], endpoint=f"{server}/v1", tokenizer="reference", **COMMON)
    remote = run_benchmark(spec, out_root=tmp_path / "remote", show_progress=False)
    local_spec = RunSpec(
        model="reference", tasks=["scbench_kv"], question_aware=False, shared_mode="requests", **COMMON
    )
    local = run_benchmark(local_spec, out_root=tmp_path / "local", show_progress=False)
    assert predictions(remote) == predictions(local) and len(predictions(remote)) > 6


def bench(*args: str) -> subprocess.CompletedProcess:
    fixed = ("--tasks", "niah_single_1", "--lengths", "300", "--samples", "1", "--quiet", "--no-report")
    return run_bench("bench", *args, *fixed)


def test_refusals_name_the_problem(server, tmp_path):
    url = f"{server}/v1"
    out = bench("--endpoint", url, "--model-name", "gpt-9", "--tokenizer", "reference", "--out", str(tmp_path))
    assert out.returncode == 2 and "does not serve model 'gpt-9'; it serves ['reference']" in out.stderr
    dead = f"http://127.0.0.1:{free_port()}/v1"
    out = bench("--endpoint", dead, "--model-name", "reference", "--tokenizer", "reference", "--out", str(tmp_path))
    assert out.returncode == 2 and "cannot reach" in out.stderr
    out = bench("--model-name", "reference", "--out", str(tmp_path))
    assert out.returncode == 2 and "go with --endpoint" in out.stderr
    assert not list(tmp_path.rglob("results.sqlite"))


def test_a_spec_from_before_endpoints_reads_with_them_unset():
    data = json.loads(RunSpec(model="reference", methods=["full"], tasks=["niah_single_1"]).to_json())
    del data["endpoint"], data["tokenizer"]
    assert RunSpec.from_json(json.dumps(data)).endpoint is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"endpoint": "127.0.0.1:8000"}, "http\\(s\\) URL"), ({"tokenizer": "reference"}, "for endpoint runs")],
)
def test_bad_endpoint_settings(fields, message):
    with pytest.raises(ValueError, match=message):
        RunSpec(model="reference", methods=["full"], tasks=["niah_single_1"], **fields)
