"""Choose, per prompt, between reading everything, a KV method, and retrieve-then-read."""

from __future__ import annotations

from dataclasses import dataclass, field

from contextlab.engine.result import full_cache_bytes
from contextlab.methods.base import check_int
from contextlab.methods.spec import build_method
from contextlab.strategies.base import Reader, RowAnswer, Strategy, check_read_method
from contextlab.strategies.retrieval import RAG


@dataclass(frozen=True)
class Router(Strategy):
    """Route each prompt: rag when it does not fit the window or exceeds the token budget, the ``kv`` method
    when a full cache would exceed ``kv_mb`` MiB, else the whole prompt; the route is recorded per row.

    LaRA (arXiv 2502.09977): neither RAG nor long context wins everywhere, so the choice must depend on
    length and budget. The rule, in order:

    1. the prompt and its answer do not fit the model's window -> ``rag`` (nothing else runs unextended);
    2. the prompt is longer than ``tokens`` (the token budget per answer; 0 = the window) -> ``rag``;
    3. ``kv_mb`` is set and a full cache of the prompt would hold more MiB than it -> the ``kv`` method;
    4. otherwise -> the whole prompt under ``full``.

    The route taken is recorded per row (``GenerationResult.routes``; the ``route`` column of a benchmark).
    ``rag`` runs with this router's ``k``, ``chunk`` and ``scorer``."""

    name = "router"
    paper = "LaRA, https://arxiv.org/abs/2502.09977"
    tokens: int = field(default=0, metadata={"help": "token budget per answer; 0 = the model's window"})
    kv_mb: float = field(default=0.0, metadata={"help": "KV memory budget in MiB; 0 = none"})
    kv: str = field(default="snapkv:0.5", metadata={"help": "KV method used past kv_mb (a ratio budget)"})
    k: int = field(default=8, metadata={"help": "rag: chunks read"})
    chunk: int = field(default=256, metadata={"help": "rag: tokens per chunk"})
    scorer: str = field(default="bm25", metadata={"help": "rag: bm25 | dense"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.read != "full":
            raise ValueError("router picks its own read method; set kv=... instead of composing with '+'")
        check_int("router: tokens (token budget; 0 = the window)", self.tokens, 0)
        if isinstance(self.kv_mb, bool) or not isinstance(self.kv_mb, (int, float)) or self.kv_mb < 0:
            raise ValueError(f"router: kv_mb must be a number of MiB >= 0 (0 = no budget), got {self.kv_mb!r}")
        check_read_method(self.name, self.kv)
        self.rag  # noqa: B018 - validates the rag parameters now

    @property
    def rag(self) -> RAG:
        return RAG(k=self.k, chunk=self.chunk, scorer=self.scorer)

    def check(self, native: int | None, max_new_tokens: int) -> None:
        self.rag.check(native, max_new_tokens)

    def route(self, model, prompt_tokens: int, max_new_tokens: int, window: int | None) -> str:
        """The route for a prompt of ``prompt_tokens`` (the rule in the class docstring)."""
        if window is not None and prompt_tokens + max_new_tokens > window:
            return self.rag.describe()
        if prompt_tokens > (self.tokens or window or prompt_tokens):
            return self.rag.describe()
        if self.kv_mb and full_cache_bytes(model, 1, prompt_tokens + max_new_tokens) > self.kv_mb * 2**20:
            return build_method(self.kv).describe()
        return "full"

    def answer(self, reader: Reader, max_new_tokens: int) -> RowAnswer:
        p = reader.prompt
        route = self.route(reader.model, p.total, max_new_tokens, reader.window)
        if route == self.rag.describe():
            return RowAnswer(self.rag.answer(reader, max_new_tokens).out, route)
        reader.read = build_method(route)
        return RowAnswer(reader.answer(p.body, max_new_tokens), route)
