"""``generate``: prefill -> compress -> (question) -> greedy decode, reporting its own cost.

``prefill`` exposes the first half on its own: it returns a compressed :class:`ContextlabCache` that stock
``model.generate()`` continues from (with the model switched to contextlab attention).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from contextlab.engine.result import GenerationResult, full_cache_bytes, kept_positions
from contextlab.engine.steps import (
    Prefilled,
    check_window,
    eos_token_ids,
    greedy,
    prepare,
    run_prefill,
    sync,
)
from contextlab.hf.attention import contextlab_attention_enabled
from contextlab.hf.rope import native_window, scaled_rope
from contextlab.methods.base import Method

__all__ = ["Prefilled", "generate", "prefill"]


def generate(
    model,
    tokenizer,
    context,
    question=None,
    *,
    method: str | Method = "full",
    max_new_tokens: int = 32,
    question_aware: bool = True,
    allow_beyond_window: bool = False,
    chat_template: bool = True,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> GenerationResult:
    """Answer ``question`` about ``context`` (text or token ids; one or a list) under ``method``.

    ``question_aware=True`` compresses context + question together (the SnapKV paper's protocol);
    ``False`` compresses the context alone and feeds the question afterwards (the kvpress protocol).
    Greedy decoding stops at the end-of-sequence token or after ``max_new_tokens``.
    ``allow_beyond_window`` lets a prompt run past the model's ``max_position_embeddings`` (to measure
    how a model fails there); otherwise that is an error.
    ``chat_template``: when the context and question are text and the tokenizer has a chat template, put
    them in one user turn of that template, the answer starting the assistant turn (False: plain text).
    ``on_tokens`` is called after every decoding step with each row's new token id (-1 once the row has
    finished), for streaming; it costs one host sync per step.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    method, plan, batched = prepare(model, tokenizer, context, question, method, question_aware, chat_template)
    needed = max(plan.total_tokens) + max_new_tokens
    check_window(model, method, needed, allow_beyond_window)
    with torch.inference_mode(), contextlab_attention_enabled(model), scaled_rope(model, method, needed):
        done = run_prefill(model, tokenizer, plan, method, max_new_tokens)
        kv_bytes = done.cache.kv_bytes()
        kept = kept_positions(done.cache, done.attention_mask, done.origins)
        start = time.perf_counter()
        decoded = greedy(
            model,
            done.cache,
            done.last_logits,
            done.attention_mask,
            max_new_tokens,
            eos_token_ids(tokenizer, model),
            on_tokens,
        )
        sync(done.input_ids.device)
        decode_seconds = time.perf_counter() - start
        kv_bytes_end = done.cache.kv_bytes()
    tokens = decoded.tokens
    device = done.input_ids.device
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else done.cache.peak_bytes
    return GenerationResult(
        texts=[tokenizer.decode(t, skip_special_tokens=True) for t in tokens],
        token_ids=tokens,
        batched=batched,
        method=method.describe(),
        kv_bytes=kv_bytes,
        kv_bytes_end=kv_bytes_end,
        read_bytes_per_step=done.cache.read_bytes_per_step(),
        kv_bytes_full=full_cache_bytes(model, len(plan.prompt), done.columns),
        peak_memory_bytes=int(peak),
        prefill_seconds=done.seconds,
        decode_seconds=decode_seconds,
        kept_positions=kept,
        prompt_tokens=plan.total_tokens,
        # question copies fed between chunks and tokens fed again by a re-encoding prefill (InfiniRetri)
        tokens_processed=sum(plan.total_tokens) + done.refed + sum(len(t) for t in tokens),
    )


def prefill(model, tokenizer, context, *, method: str | Method = "full") -> Prefilled:
    """Prefill and compress ``context`` (one or a batch) and return the cache for further use.

    To continue with stock transformers generation, keep the model on contextlab attention (the cache
    argument is ``cache`` from transformers 5.24, ``past_key_values`` before)::

        done = contextlab.prefill(model, tok, context, method="snapkv:0.5")
        with contextlab.attention_enabled(model):
            ids = torch.cat([done.input_ids, question_ids], dim=1)
            mask = torch.cat([done.attention_mask, torch.ones_like(question_ids)], dim=1)
            model.generate(input_ids=ids, attention_mask=mask, cache=done.cache, ...)
    """
    method, plan, _ = prepare(model, tokenizer, context, None, method, True)
    needed = max(plan.total_tokens)
    check_window(model, method, needed, False)
    native = native_window(model.config)
    if native and method.rope_scaling(needed, native) is not None:
        raise ValueError(
            f"{method.describe()} rescales the model's RoPE for one call; a cache it prefills cannot be continued "
            "by model.generate() at the original RoPE. Use contextlab.generate or a Session"
        )
    with torch.inference_mode(), contextlab_attention_enabled(model):
        return run_prefill(model, tokenizer, plan, method)
