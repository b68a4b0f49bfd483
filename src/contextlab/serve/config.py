"""Settings of ``contextlab serve``: what is served, how much work is accepted, who may call."""

from __future__ import annotations

import os
from dataclasses import dataclass

API_KEY_ENV = "CONTEXTLAB_API_KEY"


@dataclass(frozen=True)
class ServerConfig:
    """``max_queue`` requests may wait (beyond it: 429 with Retry-After); up to ``max_batch`` compatible
    requests (same method) run as one ragged batch, gathered for at most ``batch_wait`` seconds after the
    first arrives. ``max_prompt_tokens`` (default: the model's window) and ``max_tokens`` bound each
    request; bodies above ``max_body_bytes`` are refused before they are parsed. Shared prefixes are kept
    compressed up to ``reuse_bytes`` (see :mod:`contextlab.serve.reuse`)."""

    model: str = "reference"
    model_name: str | None = None  # the id clients send as "model" (default: the --model value)
    method: str = "full"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 64
    max_batch: int = 8
    batch_wait: float = 0.005
    max_prompt_tokens: int | None = None
    max_tokens: int = 1024
    max_body_bytes: int = 4 * 2**20
    reuse_bytes: int = 1024 * 2**20  # compressed shared prefixes kept (KV bytes); 0 turns reuse off
    reuse_min_tokens: int = 1024  # a chat's earlier messages are a shared prefix from this many tokens on
    trust_remote_code: bool = False
    device: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_batch", "max_tokens", "max_body_bytes", "port"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be a positive integer, got {self.max_prompt_tokens!r}")
        if self.reuse_bytes < 0 or self.reuse_min_tokens < 1:
            raise ValueError("reuse_bytes must be >= 0 and reuse_min_tokens >= 1")
        if self.batch_wait < 0:
            raise ValueError(f"batch_wait must be >= 0 seconds, got {self.batch_wait!r}")

    @property
    def served_name(self) -> str:
        return self.model_name or self.model

    @classmethod
    def key_from_env(cls) -> str | None:
        return os.environ.get(API_KEY_ENV) or None
