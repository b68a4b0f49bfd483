"""What a benchmark ran on, for its results table."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def warn_if_slow_bf16(device: str = "cpu") -> None:
    """Say so when a benchmark runs bfloat16 on a CPU without native bfloat16 instructions: there PyTorch
    emulates it (a matmul measured 56x slower than float32 on an AVX2-only EPYC), so its seconds are not
    comparable with cells taken on a CPU that has them, and a long run may not finish."""
    flags = cpu_flags()
    if device == "cpu" and flags and not flags & set(BF16_FLAGS):
        print(
            "warning: this CPU has none of " + ", ".join(BF16_FLAGS) + ": bfloat16 runs emulated, many times "
            "slower than float32; seconds are not comparable with cells from a CPU that has them",
            flush=True,
        )
