"""Input-level strategies: what runs around :func:`contextlab.generate` instead of feeding the whole context.

A strategy gets the same inputs as ``generate`` (context and question, text or token ids, one or a batch)
and returns the same :class:`~contextlab.engine.result.GenerationResult`, its costs summed over every model
call it made: scoring passes, worker reads, the final read (``calls`` and ``tokens_processed`` say how many
and how much). Each read is an ordinary ``generate`` call under the strategy's KV method (``read``, set
with ``+``: ``rag:k=8+snapkv:0.5``) and must fit the model's native window, so strategies serve prompts far
past the window without any position extension.

A prompt is split into the parts a strategy rearranges (:class:`Prompt`): the chat template's head, the
context body, the question, the template's tail and the task's answer prefix. Reads are rebuilt from the row's token
ids (the context is never re-tokenized), so the final read asks the question exactly as the task did;
worker and margin instructions quote the question as decoded text.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import ClassVar

from contextlab.chat import chat_frame, encode, prefix_ids
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
    """Split a row into its parts: the head is the chat template's head (or, for a base model, the BOS the
    tokenizer puts first) when the context starts with it; the tail is the template's tail, the prefix what
    follows it (a task's ``Answer:``). Without a template, a short last line ending in ``:`` is the prefix."""
    head = prefix_ids(tokenizer)
    if not head or context[: len(head)] != head:
        head = []
    body = context[len(head) :]
    frame = chat_frame(tokenizer)
    at = _last_index(question, frame.tail) if frame and frame.tail else -1
    if at >= 0:
        end = at + len(frame.tail)
        return Prompt(head, body, question[:at], question[at:end], question[end:])
    cut = _answer_prefix_start(tokenizer, question)
    return Prompt(head, body, question[:cut], [], question[cut:])


def _last_index(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub), -1, -1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


def _answer_prefix_start(tokenizer, question: list[int]) -> int:
    """Where a base model's prompt cue starts (``\nAnswer:``), or the question's end when there is none."""
    pieces = tokenizer.batch_decode([[t] for t in question])
    for i in range(len(pieces) - 1, 0, -1):
        if "\n" in pieces[i]:
            rest = "".join(pieces[i:]).strip()
            return i if rest.endswith(":") and 0 < len(rest) <= 24 else len(question)
    return len(question)


@dataclass
class Ledger:
    """What one row's calls cost, summed (bytes: the most any one call held, since calls run one after
    another). Everything before the final answer's first token is prefill time: retrieval outside the model,
    scoring passes, and worker or margin reads with their generated notes; decode time is the answer's."""

    calls: int = 0
    tokens_processed: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    kv_bytes: int = 0
    kv_bytes_end: int = 0
    peak_memory_bytes: int = 0

    def add(self, out: GenerationResult, final: bool) -> None:
        self.calls += out.calls
        self.tokens_processed += out.tokens_processed
        self.prefill_seconds += out.prefill_seconds + (0.0 if final else out.decode_seconds)
        self.decode_seconds += out.decode_seconds if final else 0.0
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
        return encode(self.tokenizer, text)

    @property
    def room(self) -> int | None:
        """Tokens a read may give the context body when it asks the row's own question (None: no window)."""
        p = self.prompt
        return None if self.window is None else self.window - (p.total - len(p.body))

    def answer(self, body: list[int], max_new_tokens: int) -> GenerationResult:
        """The final read: the row's question about ``body``, in the task's own answer format."""
        p = self.prompt
        return self.ask_batch([p.head + body], p.query + p.tail + p.prefix, max_new_tokens, final=True)

    def note(self, bodies: list[list[int]], instruction: str, max_new_tokens: int) -> GenerationResult:
        """Notes about each of ``bodies`` (one batched call) following ``instruction``; the assistant turn
        starts empty (a base model's starts after ``Notes:``)."""
        cue = self.prompt.tail if self.prompt.tail else self.encode("\nNotes:")
        contexts = [self.prompt.head + b for b in bodies]
        return self.ask_batch(contexts, self.encode(instruction) + cue, max_new_tokens, final=False)

    def ask_batch(
        self, contexts: list[list[int]], question: list[int], max_new_tokens: int, final: bool
    ) -> GenerationResult:
        """One ``generate`` call over contexts sharing a question (left-padded batch), booked in the ledger."""
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
        self.ledger.add(out, final)
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


def check_read_method(strategy: str, spec: str) -> Method:
    """The KV method a strategy reads under; a fixed token budget is refused (reads vary in length, and a
    budget larger than a short read fails in the middle of a run)."""
    try:
        method = build_method(spec)
    except ValueError as err:
        raise ValueError(f"{strategy}: its read method {spec!r}: {err}") from None
    try:
        fixed = method.prompt_keep(1 << 14) is not None and method.prompt_keep(1 << 14) == method.prompt_keep(1 << 15)
    except ValueError:
        fixed = True
    if fixed:
        raise ValueError(
            f"{strategy}: its read method {spec!r} keeps a fixed number of tokens, but a strategy's reads vary in "
            "length; give it a ratio (e.g. snapkv:0.5)"
        )
    return method


@dataclass(frozen=True)
class Strategy:
    """Base of the input-level strategies. Subclasses set ``name``/``paper`` and implement :meth:`answer`.

    ``read`` is the KV method every read runs under (``full`` unless composed: ``rag:k=8+snapkv:0.5``)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    read: str = field(default="full", metadata={"help": "KV method of every read, set with '+'"})

    def __post_init__(self) -> None:
        check_read_method(self.name, self.read)

    @property
    def read_method(self) -> Method:
        return build_method(self.read)

    def describe(self) -> str:
        params = []
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            if f.name == "kv":  # a method spec: compared in its canonical spelling
                value, default = build_method(value).describe(), build_method(default).describe()
            if f.name != "read" and value != default:
                params.append(f"{f.name}={value}")
        text = f"{self.name}:{','.join(params)}" if params else self.name
        read = self.read_method.describe()
        return text if read == "full" else f"{text}+{read}"

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
        read_bytes_per_step=sum(a.out.read_bytes_per_step for _, a in rows),
    )
