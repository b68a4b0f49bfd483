"""Input-level strategies: what runs around :func:`contextlab.generate` instead of feeding the whole context.

A strategy gets the same inputs as ``generate`` (context and question, text or token ids, one or a batch)
and returns the same :class:`~contextlab.engine.result.GenerationResult`, its costs summed over every model
call it made: scoring passes, worker reads, the final read (``calls`` and ``tokens_processed`` say how many
and how much). Each read is an ordinary ``generate`` call under the strategy's KV method (``read``, set
with ``+``: ``rag:k=8+snapkv:0.5``) and must fit the model's native window, so strategies serve prompts far
past the window without any position extension.

A prompt is split into the parts a strategy rearranges (:class:`Prompt`): the chat template's head, the
context body, the question, the template's tail and the task's answer prefix. Reads are rebuilt from token
ids, so nothing is re-tokenized and the final read asks the question exactly as the task did.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import ClassVar

from contextlab.chat import chat_frame
from contextlab.engine.generate import generate
from contextlab.engine.inputs import normalise
from contextlab.engine.result import GenerationResult, full_cache_bytes
from contextlab.errors import ContextlabError
from contextlab.hf.rope import native_window
from contextlab.methods.base import Method
from contextlab.methods.spec import build_method


class StrategyError(ContextlabError):
    """A strategy's parameters cannot serve this prompt on this model (a chunk past the window...)."""


@dataclass(frozen=True)
class Prompt:
    """One row's token ids, split: ``head + body + query + tail + prefix`` is the prompt as given."""

    head: list[int]
    body: list[int]
    query: list[int]
    tail: list[int]
    prefix: list[int]

    @property
    def total(self) -> int:
        return len(self.head) + len(self.body) + len(self.query) + len(self.tail) + len(self.prefix)


def split_prompt(tokenizer, context: list[int], question: list[int]) -> Prompt:
    """Find the chat frame (when the tokenizer has one and the row was built with it) around a row."""
    frame = chat_frame(tokenizer)
    head, tail = (frame.head, frame.tail) if frame else ([], [])
    if not head or context[: len(head)] != head:
        head = []
    at = _last_index(question, tail) if tail else -1
    if at < 0:
        return Prompt(head=head, body=context[len(head) :], query=question, tail=[], prefix=[])
    return Prompt(
        head=head,
        body=context[len(head) :],
        query=question[:at],
        tail=question[at : at + len(tail)],
        prefix=question[at + len(tail) :],
    )


def _last_index(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub), -1, -1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


@dataclass
class Ledger:
    """What one row's calls cost, summed (bytes: the most any one call held, since calls run one after
    another). Time spent outside the model (retrieval) counts as prefill time: it comes before the answer."""

    calls: int = 0
    tokens_processed: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    kv_bytes: int = 0
    kv_bytes_end: int = 0
    peak_memory_bytes: int = 0

    def add(self, out: GenerationResult) -> None:
        self.calls += out.calls
        self.tokens_processed += out.tokens_processed
        self.prefill_seconds += out.prefill_seconds
        self.decode_seconds += out.decode_seconds
        self.kv_bytes = max(self.kv_bytes, out.kv_bytes)
        self.kv_bytes_end = max(self.kv_bytes_end, out.kv_bytes_end)
        self.peak_memory_bytes = max(self.peak_memory_bytes, out.peak_memory_bytes)

    def add_forward(self, calls: int, tokens: int, seconds: float) -> None:
        """Scoring passes through the model that generate nothing."""
        self.calls += calls
        self.tokens_processed += tokens
        self.prefill_seconds += seconds


@dataclass
class Reader:
    """One row's prompt and the means to read parts of it with the model; every read is booked."""

    model: object
    tokenizer: object
    prompt: Prompt
    read: Method
    question_aware: bool
    window: int | None
    ledger: Ledger = field(default_factory=Ledger)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def answer(self, body: list[int], max_new_tokens: int, query: list[int] | None = None) -> GenerationResult:
        """Answer the row's question (or ``query``) about ``body``, in the task's own answer format."""
        p = self.prompt
        return self.ask(p.head + body, (p.query if query is None else query) + p.tail + p.prefix, max_new_tokens)

    def note(self, body: list[int], instruction: str, max_new_tokens: int) -> GenerationResult:
        """Write a note about ``body`` following ``instruction`` (the assistant turn starts empty)."""
        return self.ask(self.prompt.head + body, self.encode(instruction) + self.prompt.tail, max_new_tokens)

    def ask(self, context: list[int], question: list[int], max_new_tokens: int) -> GenerationResult:
        return self.ask_batch([context], question, max_new_tokens)

    def ask_batch(self, contexts: list[list[int]], question: list[int], max_new_tokens: int) -> GenerationResult:
        """One ``generate`` call over several contexts with the same question (left-padded batch)."""
        for context in contexts:
            needed = len(context) + len(question) + max_new_tokens
            if self.window and needed > self.window:
                raise StrategyError(
                    f"a read of {len(context) + len(question)} tokens + {max_new_tokens} new would pass the "
                    f"model's window of {self.window}; use smaller chunks or fewer of them"
                )
        out = generate(
            self.model,
            self.tokenizer,
            contexts,
            [question] * len(contexts),
            method=self.read,
            max_new_tokens=max_new_tokens,
            question_aware=self.question_aware,
        )
        self.ledger.add(out)
        return out

    def timed(self, fn, *args):
        """Call ``fn`` (retrieval outside the model) and book its seconds."""
        start = time.perf_counter()
        value = fn(*args)
        self.ledger.prefill_seconds += time.perf_counter() - start
        return value


@dataclass
class RowAnswer:
    out: GenerationResult  # the final read
    route: str | None = None


@dataclass(frozen=True)
class Strategy:
    """Base of the input-level strategies. Subclasses set ``name``/``paper`` and implement :meth:`answer`.

    ``read`` is the KV method every read runs under (``full`` unless composed: ``rag:k=8+snapkv:0.5``)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    read: str = field(default="full", metadata={"help": "KV method of every read, set with '+'"})

    def __post_init__(self) -> None:
        try:
            build_method(self.read)
        except ValueError as err:
            raise ValueError(f"{self.name}: its read method {self.read!r}: {err}") from None

    @property
    def read_method(self) -> Method:
        return build_method(self.read)

    def describe(self) -> str:
        params = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if f.name != "read" and getattr(self, f.name) != f.default
        ]
        text = f"{self.name}:{','.join(params)}" if params else self.name
        return text if self.read == "full" else f"{text}+{self.read}"

    def largest_read(self, native: int, max_new_tokens: int) -> int:
        """Tokens of the longest single read at most (for memory checks); the window by default."""
        return native - max_new_tokens

    def check(self, native: int | None, max_new_tokens: int) -> None:
        """Raise StrategyError when the parameters cannot fit a read in the window (before any work)."""

    def answer(self, reader: Reader, max_new_tokens: int) -> RowAnswer:
        raise NotImplementedError

    def generate(
        self,
        model,
        tokenizer,
        context,
        question,
        *,
        max_new_tokens: int = 32,
        question_aware: bool = True,
        chat_template: bool = True,
    ) -> GenerationResult:
        """Answer ``question`` about ``context`` (one or a batch; rows are answered one after another)."""
        if question is None:
            raise ValueError(f"{self.name} answers a question about the context; give one (question is None)")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        contexts, questions, batched = normalise(tokenizer, context, question, chat_template=chat_template)
        window = native_window(model.config)
        self.check(window, max_new_tokens)
        rows, lengths = [], []
        for c, q in zip(contexts, questions, strict=True):
            reader = Reader(model, tokenizer, split_prompt(tokenizer, c, q), self.read_method, question_aware, window)
            rows.append((reader, self.answer(reader, max_new_tokens)))
            lengths.append(len(c) + len(q))
        return combine(model, self.describe(), rows, lengths, batched)


def combine(model, method: str, rows: list[tuple[Reader, RowAnswer]], prompt_tokens: list[int], batched: bool):
    """One result for the batch: each row's final answer, its costs summed over rows (a row's bytes are the
    most any of its reads held; the peak is the batch's largest)."""
    ledgers = [reader.ledger for reader, _ in rows]
    return GenerationResult(
        texts=[a.out.texts[0] for _, a in rows],
        token_ids=[a.out.token_ids[0] for _, a in rows],
        batched=batched,
        method=method,
        kv_bytes=sum(x.kv_bytes for x in ledgers),
        kv_bytes_end=sum(x.kv_bytes_end for x in ledgers),
        kv_bytes_full=sum(full_cache_bytes(model, 1, n) for n in prompt_tokens),
        peak_memory_bytes=max(x.peak_memory_bytes for x in ledgers),
        prefill_seconds=sum(x.prefill_seconds for x in ledgers),
        decode_seconds=sum(x.decode_seconds for x in ledgers),
        kept_positions=[],
        prompt_tokens=prompt_tokens,
        calls=sum(x.calls for x in ledgers),
        tokens_processed=sum(x.tokens_processed for x in ledgers),
        routes=[a.route for _, a in rows],
    )
