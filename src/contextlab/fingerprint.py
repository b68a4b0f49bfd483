"""One digest of a model's weights, for files that are only valid for the model they were made with (saved
caches, per-head profiles).

Every parameter counts: its name, its shape and an evenly strided sample of its values, rounded to bfloat16
so the same checkpoint loaded in float32, float16 or bfloat16 gets the same digest (files that also depend
on the dtype check it separately). Two checkpoints of one architecture that differ anywhere beyond a
handful of values (a fine-tune, a merged LoRA) get different digests; reading a sample keeps it cheap on
any model size.
"""

from __future__ import annotations

import hashlib

import torch

SAMPLE = 4096  # values read per parameter


def weights_digest(model: torch.nn.Module) -> str:
    """Hex SHA-256 over every parameter's name, shape and a strided sample of its values (module docstring)."""
    hasher = hashlib.sha256()
    for name, weight in model.named_parameters():
        flat = weight.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE)
        sample = flat[::step][:SAMPLE].to(torch.bfloat16).float().cpu()
        hasher.update(f"{name}:{tuple(weight.shape)}".encode())
        hasher.update(sample.numpy().tobytes())
    return hasher.hexdigest()
