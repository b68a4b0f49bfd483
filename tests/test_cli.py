"""The command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "contextlab.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_profile_measures_once_saves_and_reuses(model_dir, tmp_path):
    env = {"CONTEXTLAB_PROFILES": str(tmp_path / "profiles")}
    args = ("profile", "--model", str(model_dir), "--method", "minference:calibration=1024,recall=0.5")
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    saved = list((tmp_path / "profiles").glob("minference-*.json"))
    assert len(saved) == 1 and str(saved[0]) in first.stdout and " heads" in first.stdout
    damaged = tmp_path / "damaged.json"
    damaged.write_text(saved[0].read_text().replace('"a_shape"', '"dense"').replace('"block_sparse"', '"dense"'))
    spec = f"minference:calibration=1024,recall=0.5,profile={damaged}"
    # The rest are independent processes (each spends seconds importing): run side by side.
    calls = {
        "again": args,
        "duo": ("profile", "--model", str(model_dir), "--method", "duo:calibration=1024"),
        "wrong": ("profile", "--model", str(model_dir), "--method", "snapkv:0.5"),
        "refused": ("profile", "--model", str(model_dir), "--method", spec),
        "forced": ("profile", "--model", str(model_dir), "--method", spec, "--force"),
    }
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(run_cli, *call, env=env) for name, call in calls.items()}
        out = {name: future.result() for name, future in futures.items()}
    assert out["again"].returncode == 0 and out["again"].stdout == first.stdout
    assert out["duo"].returncode == 0 and "streaming" in out["duo"].stdout, out["duo"].stderr
    assert out["wrong"].returncode == 2 and "measures nothing on the model" in out["wrong"].stderr
    assert out["refused"].returncode == 2 and "failed its checksum" in out["refused"].stderr, out["refused"].stderr
    assert out["forced"].returncode == 2 and "drop profile=" in out["forced"].stderr


def test_methods_lists_every_method_with_its_paper():
    out = run_cli("methods", "--width", "200")
    assert out.returncode == 0, out.stderr
    for name in ("full", "streaming", "snapkv", "pyramidkv", "tova", "h2o", "knorm", "random", "adakv"):
        assert f" {name} " in out.stdout
    assert "arxiv.org/abs/2404.14469" in out.stdout  # SnapKV
    assert "input-level strategies" in out.stdout
    for name in ("rag", "xl3m", "coa", "wim", "router"):
        assert f" {name} " in out.stdout


def test_generate_json(model_dir, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("A long story about a red fox and a quiet river. " * 10)
    out = run_cli(
        "generate",
        "--model",
        str(model_dir),
        "--method",
        "snapkv:0.5",
        "--context-file",
        str(ctx),
        "--question",
        "Who?",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["method"] == "snapkv:ratio=0.5" and report["kv_bytes"] < report["kv_bytes_full"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "snapkv:1.5"], "must be in [0, 1)"),
        (["--method", "snpkv:0.5"], "did you mean 'snapkv'"),
        (["--context-file", "/no/such/file"], "context file not found"),
        (["--empty"], "context is empty"),
        (["--method", "rag:k=0"], "k (chunks read) must be an integer >= 1"),
        (["--method", "rag:chunk=4000"], "larger than the model's window of 2048"),
    ],
)
def test_generate_bad_input_exits_2(model_dir, tmp_path, args, message):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("" if "--empty" in args else "Some context. " * 5)
    base = ["generate", "--model", str(model_dir), "--context-file", str(ctx), "--question", "Q?"]
    extra = [a for a in args if a != "--empty"]
    if "--context-file" in extra:
        base = base[:3] + base[5:]
    out = run_cli(*base, *extra)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_generate_with_a_strategy_reports_its_calls(model_dir, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("A red fox crossed the quiet river at dawn. " * 150)  # past the tiny model's 2048 window
    args = ["generate", "--model", str(model_dir), "--context-file", str(ctx), "--max-new-tokens", "4", "--json"]
    out = run_cli(*args, "--method", "router:k=2,chunk=64", "--question", "Who crossed the river?")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["route"] == "router:k=2,chunk=64".replace("router", "rag") and report["calls"] == 1
    assert report["tokens_processed"] < report["prompt_tokens"] < 4 * 2048
    missing = run_cli(*args, "--method", "rag")
    assert missing.returncode == 2 and "rag answers a question about the context: give --question" in missing.stderr


def test_unknown_subcommand_exits_2():
    assert run_cli("frobnicate").returncode == 2
