"""The engine's steps, shared by :func:`contextlab.generate` and :class:`contextlab.engine.session.Session`:
prepare inputs, prefill (whole or in chunks), one forward, greedy decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from contextlab.engine.inputs import Block, left_pad, normalise, positions_from_mask
from contextlab.engine.resources import check_memory
from contextlab.hf.cache import ContextlabCache
from contextlab.hf.compat import cache_kwarg
from contextlab.hf.rope import native_window
from contextlab.hf.support import check_supported
from contextlab.methods.base import POSITIONS, Method
from contextlab.methods.policy import SELECTED
from contextlab.methods.spec import build_method

SYNC_EVERY = 8  # decoding checks "has every row finished?" (a host sync) once per this many tokens


@dataclass(frozen=True)
class Plan:
    """What gets prefilled: ``prompt`` rows (evicted by prefill methods), then ``after`` rows if any."""

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
    copies: int = 0  # columns of question copies fed between prompt chunks (see Method.repeats_question)
    dropped: int = 0  # prompt columns a re-encoding prefill left out of input_ids (see Method.reencodes)
    refed: int = 0  # real tokens fed more than once (question copies, re-encoded tokens), all rows
    # re-encoding prefill: [B, N] prompt position of each row's n-th real token of input_ids, right-padded
    # with -1 (indexed by a token's rank in its row, not by column); tokens fed later continue after the last
    origins: torch.Tensor | None = None

    @property
    def columns(self) -> int:
        """Columns of real input (prompt, question, answer so far): what a full cache would hold per row."""
        return self.attention_mask.shape[1] - self.copies + self.dropped


@dataclass
class Decoded:
    """Greedy decoding's outcome: tokens per row (without EOS), the 2D mask of everything fed, and
    ``pending [B]``: each row's last emitted token (its EOS included) not fed to the cache yet, or -1."""

    tokens: list[list[int]]
    mask: torch.Tensor
    pending: torch.Tensor


def prepare(
    model, tokenizer, context, question, method, question_aware: bool, chat_template: bool = True
) -> tuple[Method, Plan, bool]:
    """Check the model, build the method and lay out what is prefilled (see :class:`Plan`)."""
    check_supported(model.config)
    method = build_method(method)
    contexts, questions, batched = normalise(tokenizer, context, question, chat_template=chat_template)
    if questions is None:
        plan = Plan(prompt=contexts, after=None, questions=None)
    elif question_aware:
        plan = Plan(prompt=[c + q for c, q in zip(contexts, questions, strict=True)], after=None, questions=questions)
    else:
        plan = Plan(prompt=contexts, after=questions, questions=questions)
    check_budget(method, plan)
    return method, plan, batched


def check_budget(method: Method, plan: Plan) -> None:
    """Budgets must fit every row; a question compressed with its context must fit the budget."""
    for i, prompt in enumerate(plan.prompt):
        row = f" (row {i})" if len(plan.prompt) > 1 else ""
        try:
            kept = method.prompt_keep(len(prompt))
        except ValueError as err:
            raise ValueError(f"{err}{row}") from None
        if kept is not None and plan.questions is not None and plan.after is None and len(plan.questions[i]) >= kept:
            raise ValueError(
                f"the question ({len(plan.questions[i])} tokens) is longer than the {kept} tokens "
                f"{method.describe()} keeps{row}; with question_aware=True the question is compressed with the "
                "context and would be evicted: raise the budget or use question_aware=False"
            )


def check_window(
    model,
    method: Method,
    total: int,
    allow_beyond_window: bool,
    what: str = "",
    escape: str | None = "pass allow_beyond_window=True",
) -> None:
    """The one window check: ``total`` positions (prompt + tokens to follow) must fit what ``method`` serves
    on this model (:meth:`Method.window_for`): the native window, unless the method extends positions.
    ``allow_beyond_window`` lets a longer sequence run anyway (to measure how a model fails there);
    ``escape`` says how a caller's user asks for that (None: they cannot)."""
    native = native_window(model.config)
    if not native:
        return
    limit = method.window_for(native)  # also validates the method's parameters against this window
    if limit is None or total <= limit or allow_beyond_window:
        return
    what = what or f"{total} tokens (prompt + new tokens)"
    if POSITIONS in method.roles:
        raise ValueError(
            f"{what} exceed the {limit} positions {method.describe()} serves on this model (native window "
            f"{native}); raise its group or factor, or leave them unset to fit the length"
        )
    escape = f", or {escape} to measure how the model fails there" if escape else ""
    raise ValueError(
        f"{what} exceed the model's window of {native} positions (max_position_embeddings); "
        f"{method.describe()} does not change positions, so this would run the model out of its trained range. "
        "Add a position-extending method (selfextend, string, lminfinite, ntk, yarn, linear; e.g. "
        f"'selfextend+snapkv:0.5'){escape}."
    )


def run_prefill(model, tokenizer, plan: Plan, method: Method, new_tokens: int = 0) -> Prefilled:
    """Prefill the prompt (in chunks of ``method.prefill_chunk_size()`` columns, clamped to the prompt),
    then any ``after`` rows, into a fresh cache driven by ``method``; room for ``new_tokens`` more tokens
    (the ``after`` rows and the answer) is planned from the start. A prompt whose estimated memory exceeds
    what the device has free is refused first (:func:`~contextlab.engine.resources.check_memory`)."""
    check_memory(model, method, len(plan.prompt), max(len(p) for p in plan.prompt))
    method = method.bind(model, tokenizer)  # a method that measures the model first (minference) does it here
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer, model)
    cache = ContextlabCache(model.config, method)
    if method.compresses and not cache.compressible:
        raise ValueError(
            f"{method.describe()} has nothing to compress: every layer of this model uses "
            "sliding-window attention, whose cache is already bounded"
        )
    prompt = left_pad(plan.prompt, pad_id, device)
    width = prompt.ids.shape[1]
    after_width = max(len(a) for a in plan.after) if plan.after else 0
    bounds = chunk_bounds(width, method.prefill_chunk_size())
    repeat = left_pad(plan.questions, pad_id, device) if _repeats_question(method, plan, len(bounds)) else None
    copies = len(bounds) - 1 if repeat is not None else 0  # question copies fed after every chunk but the last
    extra = [copies * len(q) for q in plan.questions] if repeat is not None else [0] * len(plan.prompt)
    q_width = repeat.ids.shape[1] if repeat is not None else 0
    cache.begin_prompt(
        width + copies * q_width,
        [len(p) + e for p, e in zip(plan.prompt, extra, strict=True)],
        after_width + new_tokens,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if method.reencodes() and len(bounds) > 1:
        return _prefill_reencoding(model, cache, method, plan, prompt, bounds, repeat, pad_id, after_width + new_tokens)
    sync(device)
    start = time.perf_counter()
    id_parts, mask_parts = [], []
    for i, (first, stop) in enumerate(bounds):
        id_parts.append(prompt.ids[:, first:stop])
        mask_parts.append(prompt.mask[:, first:stop])
        fed = id_parts[-1]
        cache.state.transient = 0
        if repeat is not None and i < len(bounds) - 1:
            id_parts.append(repeat.ids)
            mask_parts.append(repeat.mask)
            fed = torch.cat([fed, repeat.ids], dim=1)
            cache.state.transient = q_width
        logits = forward(model, cache, fed, torch.cat(mask_parts, dim=1))
        if cache.state.transient:
            # The copy was read and evicted: it takes no position (later tokens continue the prompt's count).
            mask_parts[-1] = torch.zeros_like(mask_parts[-1])
    cache.state.transient = 0
    prompt = Block(torch.cat(id_parts, dim=1), torch.cat(mask_parts, dim=1))
    ids, mask = prompt.ids, prompt.mask
    if plan.after is not None:
        after = left_pad(plan.after, pad_id, device)
        ids, mask = torch.cat([ids, after.ids], dim=1), torch.cat([mask, after.mask], dim=1)
        logits = forward(model, cache, after.ids, mask)
    sync(device)
    return Prefilled(cache, ids, mask, logits, time.perf_counter() - start, copies * q_width, refed=sum(extra))


def _prefill_reencoding(
    model, cache, method: Method, plan: Plan, prompt: Block, bounds, repeat: Block | None, pad_id: int, room: int
) -> Prefilled:
    """Prefill for a method that keeps token ids (:meth:`Method.reencodes`; InfiniRetri as in its paper):
    every chunk is fed in a fresh cache after the tokens the previous forward chose, with contiguous
    positions from 0 (and the question copy after it when ``repeat``); the method leaves the positions it
    keeps in ``shared[SELECTED]``. The last chunk's cache (kept tokens + last chunk, the question with it)
    is the one returned, and ``input_ids`` are what it was fed. One segment cache lives at a time: the peak
    reported is the largest of theirs."""
    device = prompt.ids.device
    tokens = plan.prompt  # each row's real tokens: a prompt position indexes them
    kept: list[list[int]] = [[] for _ in tokens]  # prompt positions carried to the next segment
    seen = [0] * len(tokens)  # real prompt tokens of each row before the current chunk
    refed, peak = 0, 0
    sync(device)
    start = time.perf_counter()
    for i, (first, stop) in enumerate(bounds):
        last = i == len(bounds) - 1
        where = []  # prompt positions fed in this segment, per row
        for r, row in enumerate(tokens):
            fresh = min(stop - first, max(0, len(row) - (prompt.ids.shape[1] - stop)))  # row r's tokens in the chunk
            where.append(kept[r] + list(range(seen[r], seen[r] + fresh)))
            seen[r] += fresh
            refed += len(kept[r])
        segment = [[row[p] for p in w] for row, w in zip(tokens, where, strict=True)]
        block = left_pad(segment, pad_id, device)
        fed, mask = block.ids, block.mask
        if i:
            cache = ContextlabCache(model.config, method)  # the previous segment's cache is dropped
        copy = repeat is not None and not last
        lengths = [len(s) for s in segment]
        if copy:
            fed, mask = torch.cat([fed, repeat.ids], dim=1), torch.cat([mask, repeat.mask], dim=1)
            lengths = [n + len(q) for n, q in zip(lengths, plan.questions, strict=True)]
            refed += sum(len(q) for q in plan.questions)
        cache.begin_prompt(fed.shape[1], lengths, room if last else 0)
        cache.state.transient = repeat.ids.shape[1] if copy else 0
        cache.state.segment = not last
        logits = forward(model, cache, fed, mask)
        cache.state.transient, cache.state.segment = 0, False
        peak = max(peak, cache.tracker.peak)
        if not last:
            chosen = cache.state.shared.pop(SELECTED).tolist()  # positions within each row's segment
            kept = [[w[p] for p in c if p >= 0] for w, c in zip(where, chosen, strict=True)]
    cache.tracker.peak = peak
    ids_out, mask_out = block.ids, block.mask
    if plan.after is not None:
        after = left_pad(plan.after, pad_id, device)
        ids_out, mask_out = torch.cat([ids_out, after.ids], dim=1), torch.cat([mask_out, after.mask], dim=1)
        logits = forward(model, cache, after.ids, mask_out)
        where = [
            w + list(range(seen[r], seen[r] + len(a))) for r, (w, a) in enumerate(zip(where, plan.after, strict=True))
        ]
    sync(device)
    seconds = time.perf_counter() - start
    dropped = prompt.ids.shape[1] - block.ids.shape[1]  # prompt columns a full cache would hold and this does not
    return Prefilled(cache, ids_out, mask_out, logits, seconds, 0, dropped, refed, _right_padded(where, device))


def _right_padded(rows: list[list[int]], device) -> torch.Tensor:
    """``rows`` as one ``[B, longest]`` long tensor, -1 after each row's end."""
    out = torch.full((len(rows), max(map(len, rows))), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        out[r, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out.to(device)


def _repeats_question(method: Method, plan: Plan, chunks: int) -> bool:
    """The question is fed after every chunk when the method asks for it, the prompt is chunked and ends
    with the question (question-aware)."""
    return method.repeats_question() and chunks > 1 and plan.questions is not None and plan.after is None


def chunk_bounds(width: int, chunk: int | None) -> list[tuple[int, int]]:
    """Column ranges that feed a prompt of ``width`` columns ``chunk`` at a time (None or a chunk at least as
    long as the prompt: one forward). Chunks are counted back from the prompt's end, so the last chunk ends
    with the prompt (and holds the question) and every left-padded row of a batch is cut at the same
    distances from its end as it would be alone; the first chunk takes the remainder."""
    chunk = min(chunk or width, width)
    first = width % chunk
    starts = ([0] if first else []) + list(range(first, width, chunk))
    return [(a, min(width, b)) for a, b in zip(starts, [*starts[1:], width], strict=True)]


def forward(model, cache, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None = None):
    """Feed ``ids [B, T]`` given the full 2D ``mask`` so far (None = no padding anywhere); returns the last
    position's logits ``[B, V]`` in fp32."""
    if positions is None:
        positions = positions_from_mask(mask)[:, -ids.shape[1] :]
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kwarg(model): cache},
    )
    return out.logits[:, -1].float()


def greedy(
    model,
    cache,
    logits: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    eos: set[int],
    on_tokens: Callable[[list[int]], None] | None = None,
) -> Decoded:
    """Greedy decoding from ``logits [B, V]``; stops at every row's EOS or after ``max_new_tokens``.
    ``on_tokens`` (for streaming) is called after every step with each row's new token (-1 for a row that
    has finished: its EOS and everything after); it costs one host sync per token.

    No host sync per token: tokens go into a preallocated device tensor, the mask into a preallocated
    buffer (no per-token ``torch.cat``), positions are carried on the device, and "has every row finished?"
    is asked once every ``SYNC_EVERY`` tokens. A row's tokens after its EOS are fed masked out, so they are
    never visible to later turns.
    """
    batch, width = mask.shape
    device = logits.device
    out = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device)
    full_mask = torch.cat([mask, mask.new_zeros(batch, max_new_tokens)], dim=1)
    next_position = mask.long().sum(-1, keepdim=True)  # [B, 1]
    no_padding = batch == 1 and bool(mask.all())  # then no mask is needed while decoding
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    cache.reserve(max_new_tokens)
    step = 0
    for step in range(max_new_tokens):
        nxt = logits.argmax(dim=-1)  # [B]
        is_eos = torch.isin(nxt, eos_t)
        out[:, step] = torch.where(finished | is_eos, -1, nxt)
        if on_tokens is not None:
            on_tokens(out[:, step].tolist())
        pending = torch.where(finished, -1, nxt)
        finished |= is_eos
        last = step == max_new_tokens - 1
        if last or (((step + 1) % SYNC_EVERY == 0 or batch == 1) and bool(finished.all())):
            break
        fed = (pending >= 0).to(mask.dtype)
        full_mask[:, width] = fed
        width += 1
        logits = forward(model, cache, nxt.view(batch, 1), None if no_padding else full_mask[:, :width], next_position)
        next_position = next_position + fed.view(batch, 1).long()
    tokens = [[t for t in row if t >= 0] for row in out[:, : step + 1].tolist()]
    return Decoded(tokens, full_mask[:, :width], pending)


def pad_token_id(tokenizer, model) -> int:
    for candidate in (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        getattr(model.config, "pad_token_id", None),
    ):
        if isinstance(candidate, int):
            return candidate
    return 0


def eos_token_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        configured = [configured]
    return ids | set(configured or ())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
