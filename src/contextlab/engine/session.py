"""Shared-context sessions (the SCBench protocol): prefill and compress one context once, then ask several
questions against the same cache.

``mode="turns"``: the questions are turns of one conversation; every question and answer stays in the
cache. ``mode="requests"``: each question starts from the same snapshot of the compressed context.
With ``question_aware=True`` the first question is compressed together with the context, so later
questions show what question-aware eviction threw away.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from contextlab.engine.inputs import is_batch, left_pad, to_ids
from contextlab.engine.result import full_cache_bytes
from contextlab.engine.steps import (
    Prefilled,
    check_window,
    eos_token_ids,
    forward,
    greedy,
    pad_token_id,
    prepare,
    run_prefill,
    sync,
)
from contextlab.hf.attention import contextlab_attention_enabled
from contextlab.hf.rope import scaled_rope

MODES = ("turns", "requests")


@dataclass
class TurnResult:
    texts: list[str]
    token_ids: list[list[int]]
    seconds: float  # question ingestion + decoding
    kv_bytes: int  # held by the cache after this turn
    kv_bytes_full: int  # what a full-attention cache would hold for the same tokens
    peak_memory_bytes: int  # CUDA: max allocated since the session began; CPU: peak bytes held by the cache


class Session:
    """One compressed context (one row or a batch) answering questions one turn at a time."""

    def __init__(
        self,
        model,
        tokenizer,
        context,
        first_question=None,
        *,
        method="full",
        question_aware=True,
        mode: str = "turns",
        max_total_tokens: int = 0,
        allow_beyond_window: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.eos = eos_token_ids(tokenizer, model)
        self.pad_id = pad_token_id(tokenizer, model)
        compress_with = first_question if question_aware else None
        self.method, plan, _ = prepare(model, tokenizer, context, compress_with, method, True)
        self.needed = max(plan.total_tokens) + max_total_tokens
        check_window(model, self.method, self.needed, allow_beyond_window)
        with torch.inference_mode(), contextlab_attention_enabled(model), self._rope():
            self.state: Prefilled = run_prefill(model, tokenizer, plan, self.method, max_total_tokens)
        self.first_question_in_cache = compress_with is not None
        self.turn = 0
        self.snapshot = copy.deepcopy(self.state) if mode == "requests" else None

    @classmethod
    def from_prefilled(cls, model, tokenizer, prefilled: Prefilled, *, mode: str = "turns") -> Session:
        """A session over a cache prefilled elsewhere (``contextlab.load_cache``, ``contextlab.prefill``):
        the questions it answers are all fed after the cache's content."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.eos = eos_token_ids(tokenizer, model)
        self.pad_id = pad_token_id(tokenizer, model)
        self.method = prefilled.cache.method
        self.needed = prefilled.attention_mask.shape[1]
        self.state = prefilled
        self.first_question_in_cache, self.turn = False, 0
        self.snapshot = copy.deepcopy(prefilled) if mode == "requests" else None
        return self

    @property
    def prefill_seconds(self) -> float:
        return self.state.seconds

    def ask(self, question, max_new_tokens: int = 32, on_tokens=None) -> TurnResult:
        """Answer ``question`` (text or ids; one per row) and return the answers of every row.
        ``on_tokens`` streams each step's token per row (see :func:`contextlab.generate`)."""
        state = self.state if self.mode == "turns" or self.snapshot is None else copy.deepcopy(self.snapshot)
        rows = state.input_ids.shape[0]
        device = state.input_ids.device
        with torch.inference_mode(), contextlab_attention_enabled(self.model), self._rope():
            sync(device)
            start = time.perf_counter()
            if self.first_question_in_cache and self.turn == 0:
                logits, mask = state.last_logits, state.attention_mask
            else:
                block = left_pad(self._question_ids(question, rows), self.pad_id, device)
                mask = torch.cat([state.attention_mask, block.mask], dim=1)
                logits = forward(self.model, state.cache, block.ids, mask)
            decoded = greedy(self.model, state.cache, logits, mask, max_new_tokens, self.eos, on_tokens)
            tokens = decoded.tokens
            if self.mode == "turns":
                self._close_turn(state, decoded.mask, decoded.pending)
            sync(device)
            seconds = time.perf_counter() - start
        self.turn += 1
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else state.cache.peak_bytes
        full = full_cache_bytes(self.model, rows, state.columns)
        return TurnResult(
            texts=texts,
            token_ids=tokens,
            seconds=seconds,
            kv_bytes=state.cache.kv_bytes(),
            kv_bytes_full=full,
            peak_memory_bytes=int(peak),
        )

    def _rope(self):
        """RoPE scaling methods scale the model's RoPE for every call of the session, at one planned length."""
        return scaled_rope(self.model, self.method, self.needed)

    def _question_ids(self, question, rows: int) -> list[list[int]]:
        questions = question if is_batch(question) else [question]
        if len(questions) != rows:
            raise ValueError(f"this session holds {rows} contexts but got {len(questions)} questions")
        ids = [to_ids(self.tokenizer, q, special=False, what="question") for q in questions]
        if any(not q for q in ids):
            raise ValueError("a question is empty")
        return ids

    def _close_turn(self, state: Prefilled, mask: torch.Tensor, pending: torch.Tensor) -> None:
        """Feed each row's last emitted token, so the whole answer is in the cache for the next turn."""
        fed = (pending >= 0).to(mask.dtype).view(-1, 1)
        mask = torch.cat([mask, fed], dim=1)
        ids = pending.clamp(min=0).view(-1, 1)
        forward(self.model, state.cache, ids, mask)
        state.attention_mask = mask
