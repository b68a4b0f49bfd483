"""What the machine can serve: the device asked for exists, and a prompt's memory fits before it is run.

Both checks run before any expensive work (model loading for the device, prefill and sample building for
memory), so a run that cannot work is refused in a second with the reason instead of a traceback or an
out-of-memory kill minutes later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from contextlab.engine.result import full_cache_bytes
from contextlab.errors import DeviceError, MemoryEstimateError
from contextlab.hf.compat import text_config
from contextlab.methods.base import Method


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` parsed, or a :class:`DeviceError` naming why this machine cannot use it."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"cannot read device {device!r} ({err}); use e.g. cpu, cuda or cuda:1") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} asked for, but torch sees no CUDA GPU on this machine; use cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise DeviceError(f"device {device!r} asked for, but this machine has {count} GPU(s), cuda:0..{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {device!r} asked for, but MPS is not available here; use cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return parsed


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` now (host: the kernel's ``MemAvailable``), or None when the
    platform does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class MemoryEstimate:
    """A lower bound of the memory one prefill needs beyond the weights: the K/V the cache holds during the
    first forward (the whole prompt, or one chunk with chunked prefill; in every layer without eviction, in
    one layer when the method evicts right after each layer's attention, and at least what it keeps in every
    layer) and the largest activations of that forward (hidden states, attention projections and the MLP's
    gate, up and product). Attention score matrices, allocator slack and Python objects come on top, so a
    run refused here could never have fit."""

    cache_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.cache_bytes + self.activation_bytes


def estimate_prefill(model, method: Method, batch: int, tokens: int) -> MemoryEstimate:
    """Memory of prefilling ``batch`` rows of ``tokens`` each with ``method`` (its prefill chunk size and
    whether it evicts decide how much K/V is held at once)."""
    cfg = text_config(model.config)
    chunk = method.prefill_chunk_size()
    width = min(tokens, chunk) if chunk else tokens
    cache = full_cache_bytes(model, batch, width)
    if method.compresses:  # one layer holds the chunk before evicting; every layer holds what is kept
        kept = method.prompt_keep(tokens) or 0
        cache = max(cache // cfg.num_hidden_layers, full_cache_bytes(model, batch, kept))
    itemsize = next(model.parameters()).element_size()
    per_column = 4 * cfg.hidden_size + 3 * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    return MemoryEstimate(cache_bytes=cache, activation_bytes=batch * width * per_column * itemsize)


def check_memory(model, method: Method, batch: int, tokens: int, what: str = "") -> None:
    """Refuse (:class:`MemoryEstimateError`) a prefill whose :func:`estimate_prefill` exceeds the memory
    free on the model's device; a platform that reports no free memory is not checked."""
    device = next(model.parameters()).device
    free = available_bytes(device)
    if free is None:
        return
    estimate = estimate_prefill(model, method, batch, tokens)
    if estimate.total <= free:
        return
    what = what or f"{batch} row(s) of {tokens} tokens"
    raise MemoryEstimateError(
        f"prefilling {what} needs at least {_gib(estimate.total)} on {device.type} "
        f"(KV cache {_gib(estimate.cache_bytes)}, activations {_gib(estimate.activation_bytes)}), "
        f"but only {_gib(free)} is free; use shorter lengths, a smaller batch, an evicting method with chunked "
        "prefill (e.g. snapkv:0.5,prefill_chunk=4096) or a device with more memory"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
