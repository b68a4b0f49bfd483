"""The OpenAI wire format: requests checked into :class:`GenerationRequest`, results shaped as responses.

Every problem with a request is an :class:`ApiError` carrying the HTTP status and an OpenAI-style error
body (``{"error": {"message", "type", "param", "code"}}``) whose message names the field and the fix.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from contextlab.engine.inputs import to_ids
from contextlab.methods.spec import build_method

EXTENSION = "contextlab"  # the request field holding contextlab's own settings
EXTENSION_KEYS = ("method", "prefix_tokens")
ROLES = ("system", "user", "assistant")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, **headers
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = {k.replace("_", "-").title(): str(v) for k, v in headers.items()}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class GenerationRequest:
    """One request: prompt rows (token ids; several for a completions request with a list of prompts), the
    method spec (canonical), the token limit and whether to stream."""

    kind: str  # "completion" or "chat"
    rows: list[list[int]]
    method: str
    max_tokens: int
    stream: bool
    prefix: int = 0  # leading tokens of the (single) row that form a shared, reusable context; 0: none
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_request(kind: str, body: object, tokenizer, config) -> GenerationRequest:
    """A checked :class:`GenerationRequest` from a decoded JSON body, or :class:`ApiError`. ``config`` is
    the :class:`~contextlab.serve.config.ServerConfig` (served name, default method, limits, reuse)."""
    served, default_method, max_tokens = config.served_name, config.method, config.max_tokens
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(
            404, f"model {model!r} is not served here; this server serves {served!r}", "not_found_error", "model"
        )
    _check_greedy(body)
    if kind == "completion":
        rows, prefix = _completion_rows(body, tokenizer), 0
    else:
        row, prefix = _chat_row(body, tokenizer)
        rows, prefix = [row], (prefix if prefix >= config.reuse_min_tokens else 0)
    limit_key = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    default = DEFAULT_COMPLETION_TOKENS if kind == "completion" else min(256, max_tokens)
    wanted = body.get(limit_key, default)
    if wanted is None:
        wanted = default
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
        raise ApiError(400, f"{limit_key} must be a positive integer, got {wanted!r}", param=limit_key)
    if wanted > max_tokens:
        raise ApiError(400, f"{limit_key}={wanted} exceeds this server's limit of {max_tokens}", param=limit_key)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", param="stream")
    prefix = _prefix_tokens(body, rows, prefix)
    if not config.reuse_bytes:
        prefix = 0
    return GenerationRequest(kind, rows, _method(body, default_method), wanted, stream, prefix)


def _prefix_tokens(body: dict, rows: list[list[int]], default: int) -> int:
    ext = body.get(EXTENSION)
    given = ext.get("prefix_tokens") if isinstance(ext, dict) else None
    if given is None:
        return default
    param = f"{EXTENSION}.prefix_tokens"
    if not isinstance(given, int) or isinstance(given, bool) or given < 1:
        raise ApiError(400, f"{param} must be a positive integer, got {given!r}", param=param)
    if len(rows) != 1:
        raise ApiError(400, f"{param} needs a single prompt, got {len(rows)}", param=param)
    if given >= len(rows[0]):
        raise ApiError(
            400, f"{param}={given} leaves nothing after the prefix (the prompt has {len(rows[0])} tokens)", param=param
        )
    return given


def _check_greedy(body: dict) -> None:
    """This server decodes greedily (what contextlab's accuracy numbers use); asking for sampling, several
    choices or stop strings is refused rather than silently ignored."""
    temperature, top_p, n = body.get("temperature"), body.get("top_p"), body.get("n")
    if temperature not in (None, 0, 0.0):
        raise ApiError(
            400,
            f"temperature={temperature!r}: this server decodes greedily; send 0 or leave it out",
            param="temperature",
        )
    if top_p not in (None, 1, 1.0):
        raise ApiError(400, f"top_p={top_p!r}: this server decodes greedily; send 1 or leave it out", param="top_p")
    if n not in (None, 1):
        raise ApiError(400, f"n={n!r}: one choice per prompt only", param="n")
    if body.get("stop") not in (None, [], ""):
        raise ApiError(400, "stop sequences are not supported; leave 'stop' out", param="stop")


def _method(body: dict, default: str) -> str:
    ext = body.get(EXTENSION)
    if ext is None:
        return default
    if not isinstance(ext, dict):
        raise ApiError(400, f"'{EXTENSION}' must be an object, got {type(ext).__name__}", param=EXTENSION)
    unknown = sorted(set(ext) - set(EXTENSION_KEYS))
    if unknown:
        raise ApiError(400, f"unknown '{EXTENSION}' keys {unknown}; known: {list(EXTENSION_KEYS)}", param=EXTENSION)
    spec = ext.get("method", default)
    try:
        return build_method(spec).describe()
    except (ValueError, TypeError) as err:
        raise ApiError(400, f"{EXTENSION}.method: {err}", param=f"{EXTENSION}.method") from None


def _completion_rows(body: dict, tokenizer) -> list[list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    prompts = [prompt] if isinstance(prompt, str) or _is_ids(prompt) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) or _is_ids(p) for p in prompts):
        raise ApiError(400, "'prompt' must be text, a list of token ids, or a list of either", param="prompt")
    rows = []
    for i, p in enumerate(prompts):
        ids = list(p) if _is_ids(p) else to_ids(tokenizer, p, special=True, what="prompt")
        if not ids or (isinstance(p, str) and not p.strip()):
            raise ApiError(400, f"prompt {i} is empty" if len(prompts) > 1 else "the prompt is empty", param="prompt")
        if max(ids) >= len(tokenizer) or min(ids) < 0:
            raise ApiError(
                400, f"prompt {i} holds token ids outside the vocabulary (0..{len(tokenizer) - 1})", param="prompt"
            )
        rows.append(ids)
    return rows


def _is_ids(value) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _chat_row(body: dict, tokenizer) -> tuple[list[int], int]:
    """The templated prompt's ids, and how many of them the messages before the last one make up (their
    own rendering must be a prefix of the whole prompt; 0 when it is not, or with a single message)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role among {list(ROLES)}", param="messages")
        plain.append({"role": m["role"], "content": _content(m.get("content"), i)})
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template; use /v1/completions with a plain prompt")
    ids = _template_ids(tokenizer, plain, True)
    if len(plain) < 2:
        return ids, 0
    earlier = _template_ids(tokenizer, plain[:-1], False)
    return ids, len(earlier) if ids[: len(earlier)] == earlier and len(earlier) < len(ids) else 0


def _template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _content(content, i: int) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, f"messages[{i}].content must be text (or a list of text parts)", param="messages")


# --- responses ------------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(req: GenerationRequest, served: str, texts: list[str], reasons: list[str], use: dict, extra: dict):
    if req.kind == "completion":
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        obj, prefix = "text_completion", "cmpl-"
    else:
        choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0]}, "finish_reason": reasons[0]}]
        obj, prefix = "chat.completion", "chatcmpl-"
    return {
        "id": prefix + req.id,
        "object": obj,
        "created": req.created,
        "model": served,
        "choices": choices,
        "usage": use,
        EXTENSION: extra,
    }


def chunk(req: GenerationRequest, served: str, index: int, text: str | None, reason: str | None, first: bool):
    """One server-sent event's payload of a streamed answer."""
    if req.kind == "completion":
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        obj, prefix = "text_completion", "cmpl-"
    else:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "finish_reason": reason}
        obj, prefix = "chat.completion.chunk", "chatcmpl-"
    return {"id": prefix + req.id, "object": obj, "created": req.created, "model": served, "choices": [choice]}
