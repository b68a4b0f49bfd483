"""Decode-time eviction: during long generations, every ``every`` appended tokens, keep ``budget`` tokens.

``decode(h2o,budget=512,every=64)`` wraps a scorer (streaming, snapkv, tova, h2o, knorm, random). Every
``every`` tokens appended after the prompt (generated tokens, or a question fed after the context) the
layer is scored and cut back to ``budget`` tokens, so a cache that started at any size holds exactly
``budget`` tokens after each eviction and at most ``budget + every - 1`` in between. The scorer reads the
queries buffered since the last eviction (H2O: all of them, and the accumulated attention of surviving
tokens carries over, so "pivotal tokens persist" as in Scissorhands, Liu et al. 2023,
https://arxiv.org/abs/2305.17118; SnapKV: its window; TOVA: the newest query). Composes after a prefill
method: ``snapkv:0.5+decode(h2o,budget=512)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from contextlab.methods.base import DECODE_EVICTION, Budget, Method, PrefillMethod, check_int, param, with_budget
from contextlab.methods.eviction import resolve_scorer
from contextlab.methods.policy import LayerPolicy, Step
from contextlab.methods.prefill import evict, score_inputs
from contextlab.store import DenseStore

DECODE_SCORERS = {"streaming", "snapkv", "tova", "h2o", "knorm", "random"}


@dataclass(frozen=True, eq=False)
class DecodeEviction(Method):
    """Evict during decoding: every ``every`` appended tokens, keep ``budget`` tokens chosen by ``scorer``."""

    name = "decode"
    paper = (
        "Zhang et al., 2023, H2O, https://arxiv.org/abs/2306.14048; Liu et al., 2023, Scissorhands, "
        "https://arxiv.org/abs/2305.17118; Oren et al., 2024, TOVA, https://arxiv.org/abs/2401.06104"
    )
    roles: ClassVar[frozenset[str]] = frozenset({DECODE_EVICTION})
    positional: ClassVar[str | None] = "scorer"
    scorer: str | Method = param("scorer: streaming, snapkv, tova, h2o, knorm or random", "h2o")  # noqa: RUF009
    budget: Budget | None = param("tokens each layer keeps after an eviction (budget=N)", None)  # noqa: RUF009
    every: int = param("evict every this many appended tokens", 64)

    def __post_init__(self) -> None:
        check_int("every", self.every, 1)
        if not isinstance(self.budget, Budget) or self.budget.tokens is None:
            raise ValueError(
                f"decode eviction needs a token budget, e.g. decode(h2o,budget=512); got {self.budget!r} "
                "(a ratio of a sequence that keeps growing is no fixed budget)"
            )
        need = self.scoring.protected_tokens()
        if self.budget.tokens <= need:
            raise ValueError(
                f"decode budget of {self.budget.tokens} tokens is not above the {need} tokens "
                f"{self.scoring.nested()} always keeps (sinks/window); raise the budget"
            )

    @cached_property
    def scorer_method(self) -> PrefillMethod:
        """The scorer as given, resolved and checked (no budget)."""
        return resolve_scorer(self.scorer, "decode", DECODE_SCORERS)

    @cached_property
    def scoring(self) -> PrefillMethod:
        """The scorer with this method's budget."""
        return with_budget(self.scorer_method, self.budget)

    @property
    def compresses(self) -> bool:
        return True

    def params(self) -> list[str]:
        out = [p for p in super().params() if not p.startswith("scorer=")]
        return [f"scorer={self.scorer_method.nested()}", *out]

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        return DecodeEvictionPolicy(self, layer_idx, num_layers)


class DecodeEvictionPolicy(LayerPolicy):
    """Buffers the queries a scorer needs and evicts every ``every`` decode-phase tokens."""

    def __init__(self, method: DecodeEviction, layer_idx: int, num_layers: int) -> None:
        self.scorer = method.scoring
        self.budget = method.budget.tokens
        self.every = method.every
        self.wanted = self.scorer.decode_queries(method.every)
        self.queries: torch.Tensor | None = None  # [B, Hq, <= wanted, D] newest queries
        self.carried: torch.Tensor | None = None  # [B, H, slots] H2O importance of the kept slots
        self.since = 0

    def after_forward(self, store: DenseStore, step: Step) -> None:
        if step.phase != "decode":
            return
        self._buffer(step.queries)
        self.since += step.tokens
        if self.since < self.every:
            return
        self.since = 0
        if store.length > self.budget:
            self._evict(store, step)
        self.queries = None

    def _buffer(self, queries: torch.Tensor) -> None:
        if not self.wanted:
            return
        both = queries if self.queries is None else torch.cat([self.queries, queries], dim=2)
        self.queries = both[:, :, -self.wanted :]

    def _evict(self, store: DenseStore, step: Step) -> None:
        view = store.view()
        b = view.keys.shape[0]
        keep = torch.full((b,), self.budget, device=view.keys.device)
        inputs = score_inputs(view, step, keep, view.valid.sum(-1).amax(-1), self._prior(store, view.length))
        if self.queries is not None:
            inputs.queries = self.queries
        heavy = self.scorer.heavy(inputs) if getattr(self.scorer, "accumulates", False) else None
        scores = None if heavy is None else self.scorer.protect(heavy, inputs)
        indices, kept = evict(store, self.scorer, inputs, self.every, scores)
        self.carried = None if heavy is None else heavy.gather(-1, indices).masked_fill(~kept, 0)

    def _prior(self, store: DenseStore, length: int) -> torch.Tensor | None:
        """Carried importance aligned with the store's view (new slots start at 0)."""
        if self.carried is None or store.split or self.carried.shape[-1] > length:
            return None
        pad = length - self.carried.shape[-1]
        return torch.nn.functional.pad(self.carried, (0, pad))

    def decode_reserve(self, tokens: int) -> int:
        return min(tokens, self.every)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.queries, self.carried) if t is not None)

    def map_batch(self, fn) -> None:
        self.queries = None if self.queries is None else fn(self.queries)
        self.carried = None if self.carried is None else fn(self.carried)
