"""What a benchmark ran on, for its results table."""

from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line's value in Linux ``/proc/cpuinfo``; None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` says."""
    return _cpuinfo("model name") or platform.processor() or "unknown CPU"


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where they cannot be read."""
    return set((_cpuinfo("flags") or "").split())


def warn_if_slow_bf16(model, remedy: str = "") -> None:
    """Say so when a benchmark runs bfloat16 on a CPU without native bfloat16 instructions: there PyTorch
    emulates it (a matmul measured 56x slower than float32 on an AVX2-only EPYC), so its seconds are not
    comparable with cells taken on a CPU that has them, and a long run may not finish. ``remedy``: what the
    benchmark offers instead, appended to the warning."""
    flags, weight = cpu_flags(), next(model.parameters())
    if weight.device.type == "cpu" and str(weight.dtype) == "torch.bfloat16" and flags and not flags & set(BF16_FLAGS):
        print(
            "warning: this CPU has none of " + ", ".join(BF16_FLAGS) + ": bfloat16 runs emulated, many times "
            "slower than float32; seconds are not comparable with cells from a CPU that has them" + remedy,
            flush=True,
        )
