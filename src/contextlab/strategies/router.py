"""Choose, per prompt, between reading everything, a KV method, and retrieve-then-read."""

from __future__ import annotations

from dataclasses import dataclass, field

from contextlab.engine.result import full_cache_bytes
from contextlab.methods.base import check_int
from contextlab.methods.spec import build_method
from contextlab.strategies.base import Reader, RowAnswer, Strategy, check_read_method
from contextlab.strategies.retrieval import RAG

# ``tokens=0`` budgets an eighth of the model's window. A model reads reliably from far less than the
# window it claims: STRING (arXiv 2410.18745) finds effective lengths "typically not exceeding half of their
# training lengths", Needle Threading "significantly shorter than the supported context length". On
# SmolLM2-135M-Instruct (8K window) full attention already trails one-chunk BM25 rag at 2K tokens (a quarter
# of the window: 93% vs 100% on the single needle, n = 30) and at 4K (87% vs 100%); both answer every
# needle at 1K (benchmarks/results/input_level.md). Set ``tokens`` to a model's measured effective length
# to let it read whole prompts further.
DEFAULT_SHARE = 8


@dataclass(frozen=True)
class Router(Strategy):
    """Route each prompt: rag when it does not fit the window or exceeds the token budget (default: an eighth
    of the window), the ``kv`` method when a full cache would exceed ``kv_mb`` MiB, else the whole prompt;
    the route is recorded per row.

    LaRA (arXiv 2502.09977): neither RAG nor long context wins everywhere, so the choice must depend on
    length and budget. The rule, in order:

    1. the prompt and its answer do not fit the model's window -> ``rag`` (nothing else runs unextended);
    2. the prompt is longer than ``tokens`` (the token budget per answer; 0 = an eighth of the window, see
       ``DEFAULT_SHARE``) -> ``rag``;
    3. ``kv_mb`` is set and a full cache of the prompt would hold more MiB than it -> the ``kv`` method;
    4. otherwise -> the whole prompt under ``full``.

    The route taken is recorded per row (``GenerationResult.routes``; the ``route`` column of a benchmark).
    ``rag`` runs with this router's ``k``, ``chunk`` and ``scorer``."""

    name = "router"
    paper = "LaRA, https://arxiv.org/abs/2502.09977"
    tokens: int = field(default=0, metadata={"help": "token budget per answer; 0 = an eighth of the window"})
    kv_mb: float = field(default=0.0, metadata={"help": "KV memory budget in MiB; 0 = none"})
    kv: str = field(default="snapkv:0.5", metadata={"help": "KV method used past kv_mb (a ratio budget)"})
    k: int = field(default=8, metadata={"help": "rag: chunks read"})
    chunk: int = field(default=256, metadata={"help": "rag: tokens per chunk"})
    scorer: str = field(default="bm25", metadata={"help": "rag: bm25 | dense"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.read != "full":
            raise ValueError("router picks its own read method; set kv=... instead of composing with '+'")
        check_int("router: tokens (token budget; 0 = an eighth of the window)", self.tokens, 0)
        if isinstance(self.kv_mb, bool) or not isinstance(self.kv_mb, (int, float)) or self.kv_mb < 0:
            raise ValueError(f"router: kv_mb must be a number of MiB >= 0 (0 = no budget), got {self.kv_mb!r}")
        check_read_method(self.name, self.kv)
        self.rag  # noqa: B018 - validates the rag parameters now

    @property
    def rag(self) -> RAG:
        return RAG(k=self.k, chunk=self.chunk, scorer=self.scorer)

    def check(self, native: int | None, max_new_tokens: int) -> None:
        self.rag.check(native, max_new_tokens)

    def budget(self, window: int | None) -> int | float:
        """Tokens a prompt may hold and still be read whole (rule 2); no limit when the window is unknown and
        ``tokens`` is 0."""
        if self.tokens:
            return self.tokens
        return window // DEFAULT_SHARE if window else float("inf")

    def route(self, model, prompt_tokens: int, max_new_tokens: int, window: int | None) -> str:
        """The route for a prompt of ``prompt_tokens`` (the rule in the class docstring)."""
        if window is not None and prompt_tokens + max_new_tokens > window:
            return self.rag.describe()
        if prompt_tokens > self.budget(window):
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
