"""Running Triton kernels on CPU tensors in a fresh interpreter with ``TRITON_INTERPRET=1`` (triton reads the
variable when kernels are defined, which the test process may already have done)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def run_interpreted(tmp_path_factory, name: str, script: str):
    """Run ``script`` (which saves its results with ``torch.save`` to ``sys.argv[1]``) under the interpreter
    and return what it saved; skips without triton."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    path = tmp_path_factory.mktemp(name) / "triton.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    run = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(path)
