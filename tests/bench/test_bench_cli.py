"""``contextlab bench`` / ``report`` bad input: exit code 2 and a message naming the problem."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from contextlab.bench.cli import _csv


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "contextlab.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "niah_singel_1"], "did you mean 'niah_single_1'"),
        (["--methods", "snapkv:budget=100000"], "larger than the context"),
        (["--methods", "snapky:0.5"], "did you mean 'snapkv'"),
        (["--lengths", "4000"], "exceed the model's window"),
        (["--lengths", "4000"], "--allow-beyond-window"),
        (["--methods", "selfextend:group=1,window=512", "--lengths", "4000"], "serves on this model"),
        (["--methods", "selfextend:window=4096"], "must be smaller than the model's native window of 2048"),
        (["--lengths", "abc"], "cannot read length"),
        (["--tasks", "longbench:path=/no/such.jsonl"], "dataset file not found"),
    ],
)
def test_bench_bad_input_exits_2(model_dir, tmp_path, args, message):
    base = [
        "bench",
        "--model",
        str(model_dir),
        "--methods",
        "full",
        "--tasks",
        "niah_single_1",
        "--lengths",
        "300",
        "--samples",
        "1",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[base.index(flag) + 1] = value
    out = bench(*base)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert not list(tmp_path.glob("*/results.sqlite")), "a refused run leaves no results file"


def test_report_of_a_foreign_file_exits_2(tmp_path):
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "results.sqlite").write_bytes(b"not a database at all" * 100)
    out = bench("report", str(bad))
    assert out.returncode == 2 and "corrupt" in out.stderr


def test_csv_keeps_spec_parameters_together():
    assert _csv("full,snapkv:0.5,window=16,vt:num_hops=2,num_chains=1,tova:0.5") == [
        "full",
        "snapkv:0.5,window=16",
        "vt:num_hops=2,num_chains=1",
        "tova:0.5",
    ]
    assert _csv("full,snapkv:0.5+decode(h2o,budget=512,every=64),adakv:0.5,scorer=snapkv(window=8,kernel=3)") == [
        "full",
        "snapkv:0.5+decode(h2o,budget=512,every=64)",
        "adakv:0.5,scorer=snapkv(window=8,kernel=3)",
    ]


def test_a_position_method_runs_past_the_window_without_the_escape_hatch(model_dir, tmp_path):
    out = bench(
        "bench",
        "--model",
        str(model_dir),
        "--methods",
        "selfextend,string+snapkv:0.5",
        "--tasks",
        "niah_single_1",
        "--lengths",
        "2500",
        "--samples",
        "1",
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path),
        "--quiet",
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "latest" / "results.sqlite").exists()
