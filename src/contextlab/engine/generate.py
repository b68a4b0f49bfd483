"""``generate``: prefill -> compress -> (question) -> greedy decode, reporting its own cost.

``prefill`` exposes the first half on its own: it returns a compressed :class:`ContextlabCache` that stock
``model.generate()`` continues from (with the model switched to contextlab attention).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from contextlab.engine.inputs import Block, left_pad, normalise, positions_from_mask
from contextlab.engine.result import GenerationResult, full_cache_bytes, kept_positions
from contextlab.hf.attention import contextlab_attention_enabled
from contextlab.hf.cache import CompressionRequest, ContextlabCache
from contextlab.hf.compat import text_config
from contextlab.hf.support import check_supported
from contextlab.methods.base import PrefillMethod
from contextlab.methods.spec import build_method


@dataclass(frozen=True)
class Plan:
    """What gets compressed: ``prompt`` rows are prefilled (and compressed), ``after`` rows follow."""

    prompt: list[list[int]]
    after: list[list[int]] | None
    questions: list[list[int]] | None

    @property
    def total_tokens(self) -> list[int]:
        return [
            len(p) + (len(a) if self.after else 0) for p, a in zip(self.prompt, self.after or self.prompt, strict=True)
        ]


@dataclass
class Prefilled:
    """A cache holding the (compressed) prompt, and the padded ids and 2D mask it was built from."""

    cache: ContextlabCache
    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    last_logits: torch.Tensor  # [B, V] fp32
    seconds: float


def generate(
    model,
    tokenizer,
    context,
    question=None,
    *,
    method: str | PrefillMethod = "full",
    max_new_tokens: int = 32,
    question_aware: bool = True,
    allow_beyond_window: bool = False,
) -> GenerationResult:
    """Answer ``question`` about ``context`` (text or token ids; one or a list) under ``method``.

    ``question_aware=True`` compresses context + question together (the SnapKV paper's protocol);
    ``False`` compresses the context alone and feeds the question afterwards (the kvpress protocol).
    Greedy decoding stops at the end-of-sequence token or after ``max_new_tokens``.
    ``allow_beyond_window`` lets a prompt run past the model's ``max_position_embeddings`` (to measure
    how a model fails there); otherwise that is an error.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    method, plan, batched = _prepare(model, tokenizer, context, question, method, question_aware)
    _check_window(model, plan, max_new_tokens, allow_beyond_window)
    with torch.inference_mode(), contextlab_attention_enabled(model):
        done = _prefill(model, tokenizer, plan, method)
        kv_bytes = done.cache.kv_bytes()
        kept = kept_positions(done.cache, done.attention_mask)
        start = time.perf_counter()
        tokens, _, _ = _greedy(
            model, done.cache, done.last_logits, done.attention_mask, max_new_tokens, _eos_ids(tokenizer, model)
        )
        _sync(done.input_ids.device)
        decode_seconds = time.perf_counter() - start
    device = done.input_ids.device
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else done.cache.peak_bytes
    return GenerationResult(
        texts=[tokenizer.decode(t, skip_special_tokens=True) for t in tokens],
        token_ids=tokens,
        batched=batched,
        method=method.describe(),
        kv_bytes=kv_bytes,
        kv_bytes_full=full_cache_bytes(model, len(plan.prompt), done.attention_mask.shape[1]),
        peak_memory_bytes=int(peak),
        prefill_seconds=done.seconds,
        decode_seconds=decode_seconds,
        kept_positions=kept,
        prompt_tokens=plan.total_tokens,
    )


def prefill(model, tokenizer, context, *, method: str | PrefillMethod = "full") -> Prefilled:
    """Prefill and compress ``context`` (one or a batch) and return the cache for further use.

    To continue with stock transformers generation, keep the model on contextlab attention::

        done = contextlab.prefill(model, tok, context, method="snapkv:0.5")
        with contextlab.attention_enabled(model):
            ids = torch.cat([done.input_ids, question_ids], dim=1)
            mask = torch.cat([done.attention_mask, torch.ones_like(question_ids)], dim=1)
            model.generate(input_ids=ids, attention_mask=mask, past_key_values=done.cache, ...)
    """
    method, plan, _ = _prepare(model, tokenizer, context, None, method, True)
    _check_window(model, plan, 0, False)
    with torch.inference_mode(), contextlab_attention_enabled(model):
        return _prefill(model, tokenizer, plan, method)


def _prepare(model, tokenizer, context, question, method, question_aware: bool):
    check_supported(model.config)
    method = build_method(method)
    contexts, questions, batched = normalise(tokenizer, context, question)
    if questions is None:
        plan = Plan(prompt=contexts, after=None, questions=None)
    elif question_aware:
        plan = Plan(prompt=[c + q for c, q in zip(contexts, questions, strict=True)], after=None, questions=questions)
    else:
        plan = Plan(prompt=contexts, after=questions, questions=questions)
    return method, plan, batched


def _check_window(model, plan: Plan, max_new_tokens: int, allow_beyond_window: bool) -> None:
    window = getattr(text_config(model.config), "max_position_embeddings", None)
    longest = max(plan.total_tokens)
    if window and longest + max_new_tokens > window and not allow_beyond_window:
        raise ValueError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's window of {window} "
            "positions (max_position_embeddings); eviction methods do not change positions, so this would run "
            "the model out of its trained range. Pass allow_beyond_window=True to measure that on purpose."
        )


def _prefill(model, tokenizer, plan: Plan, method: PrefillMethod) -> Prefilled:
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer, model)
    cache = ContextlabCache(model.config)
    prompt = left_pad(plan.prompt, pad_id, device)
    request = _request(method, plan, prompt)
    if request is not None:
        if not cache.compressible:
            raise ValueError(
                f"{method.describe()} has nothing to compress: every layer of this model uses "
                "sliding-window attention, whose cache is already bounded"
            )
        cache.arm(request)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    ids, mask = prompt.ids, prompt.mask
    logits = _forward(model, cache, ids, mask)
    if plan.after is not None:
        after = left_pad(plan.after, pad_id, device)
        ids, mask = torch.cat([ids, after.ids], dim=1), torch.cat([mask, after.mask], dim=1)
        logits = _forward(model, cache, after.ids, mask)
    _sync(device)
    return Prefilled(
        cache=cache,
        input_ids=ids,
        attention_mask=mask,
        last_logits=logits,
        seconds=time.perf_counter() - start,
    )


def _request(method: PrefillMethod, plan: Plan, block: Block) -> CompressionRequest | None:
    if not method.compresses:
        return None
    keep = []
    for i, prompt in enumerate(plan.prompt):
        row = f" (row {i})" if len(plan.prompt) > 1 else ""
        try:
            kept = method.budget.keep(len(prompt))
        except ValueError as err:
            raise ValueError(f"{err}{row}") from None
        if plan.questions is not None and plan.after is None and len(plan.questions[i]) >= kept:
            raise ValueError(
                f"the question ({len(plan.questions[i])} tokens) is longer than the {kept} tokens "
                f"{method.describe()} keeps{row}; with question_aware=True the question is compressed with the "
                "context and would be evicted: raise the budget or use question_aware=False"
            )
        keep.append(kept)
    return CompressionRequest(
        method=method,
        length=block.ids.shape[1],
        valid=block.mask.bool(),
        positions=positions_from_mask(block.mask),
        keep=torch.tensor(keep, device=block.ids.device),
    )


def _pad_id(tokenizer, model) -> int:
    for candidate in (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        getattr(model.config, "pad_token_id", None),
    ):
        if isinstance(candidate, int):
            return candidate
    return 0


def _eos_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        configured = [configured]
    return ids | set(configured or ())


def _forward(model, cache, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Feed ``ids [B, T]`` given the full 2D ``mask`` so far; returns the last position's logits ``[B, V]``."""
    positions = positions_from_mask(mask)[:, -ids.shape[1] :]
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _greedy(model, cache, logits: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: set[int]):
    """Greedy decoding from ``logits [B, V]``. Returns the tokens of each row (without EOS), the 2D mask
    after what was fed, and ``pending [B]``: each row's last emitted token (its EOS included) that was
    not fed to the cache yet, or -1. A row's tokens after its EOS are fed masked out, so they never
    become visible to later turns."""
    batch = logits.shape[0]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    pending = torch.full((batch,), -1, dtype=torch.long, device=logits.device)
    eos_t = torch.tensor(sorted(eos), device=logits.device)
    for step in range(max_new_tokens):
        nxt = logits.argmax(dim=-1)  # [B]
        is_eos = torch.isin(nxt, eos_t)
        for row in (~finished & ~is_eos).nonzero().flatten().tolist():
            tokens[row].append(int(nxt[row]))
        pending = torch.where(finished, -1, nxt)
        finished |= is_eos
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        fed = (pending >= 0).to(mask.dtype).view(batch, 1)
        mask = torch.cat([mask, fed], dim=1)
        logits = _forward(model, cache, nxt.view(batch, 1), mask)
        pending = torch.full_like(pending, -1)
    return tokens, mask, pending
