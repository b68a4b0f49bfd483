"""Turn user inputs (text or token ids, one or a batch) into left-padded tensors.

Positions follow each row's own tokens: the first real token of a row is position 0 however much padding
precedes it, so a row gives the same result alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from contextlab.chat import ChatFrame, chat_frame

TextOrIds = str | Sequence[int]


def is_batch(value) -> bool:
    """A list of texts or of token-id lists is a batch; a text or one token-id list is a single input."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and not isinstance(value[0], int)


def to_ids(tokenizer, value: TextOrIds, *, special: bool, what: str) -> list[int]:
    if isinstance(value, str) and not value.strip():
        return []
    if isinstance(value, str):
        ids = list(tokenizer(value, add_special_tokens=special)["input_ids"])
    elif isinstance(value, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        ids = list(value)
    else:
        raise ValueError(f"{what} must be text or a list of token ids, got {type(value).__name__}")
    return ids


def normalise(
    tokenizer, context, question, *, chat_template: bool = True
) -> tuple[list[list[int]], list[list[int]] | None, bool]:
    """(context rows, question rows or None, whether the input was a batch); raises on empty input.

    When the context and question are both text and the tokenizer has a chat template (and
    ``chat_template`` is True), each row becomes one user turn: the template's head + context, then
    two newlines, the question and the template's tail (the assistant header). Token ids are always taken
    as given.
    """
    batched = is_batch(context)
    contexts = list(context) if batched else [context]
    questions = None
    if question is not None:
        questions = list(question) if is_batch(question) else [question]
        if len(questions) == 1 and len(contexts) > 1:
            questions = questions * len(contexts)
        if len(questions) != len(contexts):
            raise ValueError(f"got {len(contexts)} contexts but {len(questions)} questions")
    frame = _frame_for(tokenizer, contexts, questions) if chat_template else None
    ctx_ids = []
    for i, c in enumerate(contexts):
        ids = to_ids(tokenizer, c, special=frame is None, what="context")
        if not ids or (isinstance(c, str) and not c.strip()):
            raise ValueError(f"context {i} is empty" if batched else "the context is empty")
        ctx_ids.append(list(frame.head) + ids if frame else ids)
    q_ids = None
    if questions is not None:
        q_ids = [to_ids(tokenizer, q, special=False, what="question") for q in questions]
        if any(len(q) == 0 for q in q_ids):
            raise ValueError("a question is empty; pass question=None to continue the context instead")
        if frame is not None:
            q_ids = [
                to_ids(tokenizer, "\n\n" + q, special=False, what="question") + list(frame.tail) for q in questions
            ]
    return ctx_ids, q_ids, batched


def _frame_for(tokenizer, contexts: list, questions: list | None) -> ChatFrame | None:
    """The chat frame to wrap text rows in: only when every context and question is text."""
    if questions is None or not all(isinstance(v, str) for v in (*contexts, *questions)):
        return None
    return chat_frame(tokenizer)


@dataclass
class Block:
    """A left-padded block of new tokens for every row: ``ids``/``mask`` ``[B, T]``."""

    ids: torch.Tensor
    mask: torch.Tensor


def left_pad(rows: list[list[int]], pad_id: int, device) -> Block:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return Block(ids.to(device), mask.to(device))


def positions_from_mask(full_mask: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` position of each column within its row's real tokens (0 on padding)."""
    return (full_mask.long().cumsum(-1) - 1).clamp(min=0)
