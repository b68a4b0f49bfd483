"""What every Triton launcher does first: import triton and a kernel module lazily, and refuse CPU tensors
unless the kernels were defined under Triton's interpreter (``TRITON_INTERPRET=1`` set before import)."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def triton_available() -> bool:
    """Whether the triton package imports (the ``auto`` backends use Triton for CUDA tensors only then)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def load_kernels(module: str, tensor: torch.Tensor) -> tuple[ModuleType, ModuleType]:
    """``(triton, kernels)`` for launching ``module``'s kernels on ``tensor``'s device.

    Raises ``ImportError`` without triton and ``ValueError`` for CPU tensors outside the interpreter."""
    try:
        import triton
    except ImportError as error:
        raise ImportError("the 'triton' backend needs the triton package (pip install triton)") from error
    kernels = importlib.import_module(module)
    if not tensor.is_cuda and not kernels.INTERPRETED:
        raise ValueError(
            f"the 'triton' backend needs CUDA tensors (got {tensor.device}), or TRITON_INTERPRET=1 set "
            f"before {module} is imported"
        )
    return triton, kernels
