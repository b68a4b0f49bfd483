"""Where a chat model's template puts the user's text: the tokens before it and after it.

Chat models are prompted the way RULER prompts them: the context and question go in one user turn through
the tokenizer's own chat template, and the assistant turn starts with the task's answer prefix. Rendering
the template once around a marker splits it into ``head`` (BOS, system turn, user header) and ``tail``
(end of the user turn, assistant header); a prompt is then ``head + context + question + tail + prefix``,
built from token ids so lengths stay exact and the context/question split stays where it was.
"""

from __future__ import annotations

import weakref
from contextlib import suppress
from dataclasses import dataclass

from contextlab.errors import ContextlabError

_MARKER = "\x00contextlab-user-text\x00"
_FRAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (template, ChatFrame | None)


class ChatTemplateError(ContextlabError):
    """The tokenizer's chat template cannot hold a context in one user turn."""


@dataclass(frozen=True)
class ChatFrame:
    """Token ids a chat template puts around one user message, up to the assistant's first token."""

    head: list[int]
    tail: list[int]


def chat_frame(tokenizer) -> ChatFrame | None:
    """The tokenizer's chat frame, or None when it has no chat template (a base model). Memoized per
    tokenizer and template (setting ``tokenizer.chat_template`` afterwards is seen; the memo dies with the
    tokenizer)."""
    template = getattr(tokenizer, "chat_template", None)
    with suppress(KeyError, TypeError):
        memo_template, frame = _FRAMES[tokenizer]
        if memo_template == template:
            return frame
    frame = _build_frame(tokenizer) if template else None
    with suppress(TypeError):  # a tokenizer that is not weak-referenceable is just re-read next time
        _FRAMES[tokenizer] = (template, frame)
    return frame


def _build_frame(tokenizer) -> ChatFrame:
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _MARKER}], tokenize=False, add_generation_prompt=True
        )
    except Exception as err:  # jinja errors come in many types
        raise ChatTemplateError(f"the tokenizer's chat template failed on a single user turn: {err}") from err
    if text.count(_MARKER) != 1:
        raise ChatTemplateError(
            "the tokenizer's chat template does not place the user's text exactly once, so a context cannot be "
            "put in the user turn; load the model without its chat template (tokenizer.chat_template = None)"
        )
    before, after = text.split(_MARKER)
    return ChatFrame(head=_encode(tokenizer, before), tail=_encode(tokenizer, after))


def prefix_ids(tokenizer) -> list[int]:
    """The tokens before the context: a chat model's template head (BOS, system turn, user header), else
    what the tokenizer puts before a sequence (usually just BOS), found by encoding one word."""
    frame = chat_frame(tokenizer)
    if frame is not None:
        return list(frame.head)
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(without)
    return list(with_special[:n]) if n > 0 and with_special[n:] == without else []


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added."""
    return _encode(tokenizer, text)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
