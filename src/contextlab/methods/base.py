"""The prefill-eviction protocol: budgets, what a scorer sees, and how scores become kept tokens.

Pure tensor code; nothing here imports transformers. Shapes use ``B`` batch, ``H`` KV heads, ``G`` query
heads per KV head, ``Tq`` queries in the current forward, ``S`` cached tokens, ``D`` head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

PROTECTED = 1e12  # score of a token that must be kept (sinks, window); scores that use it are float64


@dataclass(frozen=True)
class Budget:
    """How many tokens each (row, KV head) keeps: ``ratio`` is the fraction REMOVED, ``tokens`` an absolute
    count. Exactly one is set."""

    ratio: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError(
                f"a budget needs exactly one of ratio or tokens, got ratio={self.ratio}, tokens={self.tokens}"
            )
        if self.ratio is not None and (isinstance(self.ratio, bool) or not 0.0 <= self.ratio < 1.0):
            raise ValueError(f"ratio (fraction of tokens removed) must be in [0, 1), got {self.ratio!r}")
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise ValueError(f"budget_tokens must be a positive integer, got {self.tokens!r}")

    def keep(self, length: int) -> int:
        """Tokens kept out of ``length``: ``length - floor(length * ratio)`` or ``tokens``."""
        if self.tokens is not None:
            if self.tokens > length:
                raise ValueError(f"budget of {self.tokens} tokens is larger than the context ({length} tokens)")
            return self.tokens
        return length - math.floor(length * self.ratio)

    def describe(self) -> str:
        return f"ratio={self.ratio}" if self.ratio is not None else f"budget={self.tokens}"


@dataclass
class ScoreInputs:
    """Everything a scorer may look at for one layer, right after that layer's prefill attention.

    ``queries``: ``[B, H*G, Tq, D]`` post-RoPE queries of this forward (the last ``Tq`` cached tokens).
    ``keys``/``values``: ``[B, H, S, D]`` post-RoPE keys and values of every cached token.
    ``valid``: ``[B, S]`` False on padding. ``positions``: ``[B, S]`` position of each token in its row.
    ``keep``: ``[B]`` tokens each row keeps under the plain budget (before per-layer/per-head rules).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    keep: torch.Tensor
    scaling: float
    layer_idx: int
    num_layers: int

    @property
    def groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]


@dataclass(frozen=True)
class PrefillMethod:
    """Base of prefill-eviction methods: score every cached token once the prompt is in, keep the best.

    Subclasses set ``name``/``paper`` and override :meth:`score`; per-layer or per-head budget rules
    override :meth:`keep_counts`. A method with no budget (``full``) never compresses.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    budget: Budget | None = field(default=None)

    @property
    def compresses(self) -> bool:
        return self.budget is not None

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """``[B, H, S]`` importance of each cached token (higher is kept first)."""
        raise NotImplementedError

    def keep_counts(self, inputs: ScoreInputs, scores: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` tokens kept per row and KV head; by default the plain budget for every head."""
        b, h, _ = scores.shape
        return inputs.keep.view(b, 1).expand(b, h)

    def describe(self) -> str:
        return self.name if self.budget is None else f"{self.name}:{self.budget.describe()}"


def select_tokens(scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``counts[b, h]`` best-scored valid tokens, sorted by position.

    ``scores``: ``[B, H, S]``; ``counts``: ``[B, H]``; ``valid``: ``[B, S]``.
    Returns ``indices [B, H, C]`` (C = max count) and ``kept [B, H, C]`` (False on the slots past a
    row/head's own count, which point at arbitrary tokens and must never be attended to).
    """
    s = scores.shape[-1]
    capacity = int(counts.max())
    masked = scores.double().masked_fill(~valid[:, None, :], float("-inf"))
    # A stable sort breaks exact ties by position, so a row keeps the same tokens alone or in a batch.
    top = masked.sort(dim=-1, descending=True, stable=True).indices[..., :capacity]  # [B, H, C], best first
    kept = torch.arange(capacity, device=scores.device).view(1, 1, -1) < counts.unsqueeze(-1)
    # Sort kept slots by position, dropped slots after them.
    order = torch.where(kept, top, top + s).argsort(dim=-1)
    return top.gather(-1, order), kept.gather(-1, order)
