"""Read only the chunks that matter: retrieve-then-read (BM25 or dense) and XL3M segment selection."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from contextlab.methods.base import check_int
from contextlab.strategies.base import Reader, RowAnswer, Strategy, StrategyError
from contextlab.strategies.chunking import Chunk, check_chunking, make_chunks, merge_spans
from contextlab.strategies.scoring import SCORERS, bm25_scores, certainty_scores, dense_scores, require
from contextlab.strategies.selection import select_top

# Room a read keeps for the chat frame and the question beside the chunks when parameters are checked
# before any row is seen (the exact check happens at each read).
QUESTION_ROOM = 64


def _check_selection(strategy, k: int, tokens: int | None) -> None:
    check_int(f"{strategy}: k (chunks read)", k, 1)
    check_int(f"{strategy}: tokens (token budget)", tokens, 1, allow_none=True)


def _check_fits(name: str, chunk: int, k: int, tokens: int | None, native: int | None, new: int) -> None:
    if native is None:
        return
    if chunk + QUESTION_ROOM + new > native:
        raise StrategyError(
            f"{name}: a chunk of {chunk} tokens (+ the question and {new} new tokens) is larger than the model's "
            f"window of {native}; use chunk <= {native - QUESTION_ROOM - new}"
        )
    selected = min(k * chunk, tokens) if tokens else k * chunk
    if selected + QUESTION_ROOM + new > native:
        raise StrategyError(
            f"{name}: k x chunk = {k} x {chunk} = {k * chunk} tokens read at once pass the model's window of "
            f"{native}; lower k or chunk, or cap the read with tokens=N"
        )


def select(reader: Reader, scores: list[float], chunks: list[Chunk], k: int, tokens: int | None, new: int):
    """The top ``k`` chunks, their tokens capped by ``tokens`` and by the room the row's read has in the
    window beside its chat frame, question and answer."""
    if reader.room is not None:
        room = reader.room - new
        tokens = min(tokens, room) if tokens else room
    return select_top(scores, chunks, k=k, tokens=tokens)


def read_selected(reader: Reader, chunks: list[Chunk], chosen: list[int], max_new_tokens: int):
    """The final read: the chosen chunks in context order (overlaps merged), then the question."""
    body = reader.prompt.body
    spans = merge_spans([chunks[i] for i in chosen])
    return reader.answer([t for s in spans for t in body[s.start : s.end]], max_new_tokens)


def body_chunks(reader: Reader, chunk: int, overlap: int, unit: str) -> list[Chunk]:
    chunks = make_chunks(reader.tokenizer, reader.prompt.body, chunk, overlap, unit)
    if not chunks:
        raise StrategyError("the context is empty once the chat template's tokens are set aside")
    return chunks


@dataclass(frozen=True)
class ChunkSelection(Strategy):
    """What rag and xl3m share: chunk the context, score, read the top ``k`` chunks (their subclasses
    declare ``k``, ``chunk``, ``overlap``, ``unit`` and ``tokens``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_chunking(self.chunk, self.overlap, self.unit)
        _check_selection(self.name, self.k, self.tokens)

    def check(self, native: int | None, max_new_tokens: int) -> None:
        _check_fits(self.name, self.chunk, self.k, self.tokens, native, max_new_tokens)

    def largest_read(self, native: int, max_new_tokens: int) -> int:
        return min(self.k * self.chunk, self.tokens or self.k * self.chunk) + QUESTION_ROOM


@dataclass(frozen=True)
class RAG(ChunkSelection):
    """Retrieve-then-read: cut the context into chunks, score each against the question (BM25 or a dense
    sentence embedding), read the top ``k`` in their original order with the question.

    LaRA (arXiv 2502.09977) finds neither RAG nor long context wins everywhere; LongBench finds retrieval
    helps models weak on long contexts. Costs: the retriever's seconds plus one read of about
    ``k * chunk`` tokens, whatever the context's length."""

    name = "rag"
    paper = "LaRA, https://arxiv.org/abs/2502.09977"
    k: int = field(default=8, metadata={"help": "chunks read"})
    chunk: int = field(default=256, metadata={"help": "tokens per chunk"})
    overlap: int = field(default=0, metadata={"help": "tokens two neighbouring chunks share"})
    unit: str = field(default="sentence", metadata={"help": "chunk by token | sentence | paragraph"})
    scorer: str = field(default="bm25", metadata={"help": "bm25 | dense (all-MiniLM-L6-v2)"})
    tokens: int | None = field(default=None, metadata={"help": "cap on tokens read (default k x chunk)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scorer not in SCORERS:
            raise ValueError(f"rag: scorer must be one of {SCORERS}, got {self.scorer!r}")
        require(self.scorer)

    def answer(self, reader: Reader, max_new_tokens: int) -> RowAnswer:
        chunks = body_chunks(reader, self.chunk, self.overlap, self.unit)
        body = reader.prompt.body
        texts = reader.tokenizer.batch_decode([body[c.start : c.end] for c in chunks])
        question = reader.tokenizer.decode(reader.prompt.query).strip()
        score = bm25_scores if self.scorer == "bm25" else dense_scores
        scores = reader.timed(score, texts, question)
        chosen = select(reader, scores, chunks, self.k, self.tokens, max_new_tokens)
        return RowAnswer(read_selected(reader, chunks, chosen, max_new_tokens))


@dataclass(frozen=True)
class XL3M(ChunkSelection):
    """XL3M segment selection: score every segment by the model's own certainty about the question read
    right after it (mean log-probability of the question's tokens; a segment is scored as plain text, with
    no chat template around it), keep the ``k`` most certain segments in their original order, answer from
    them.

    XL3M (arXiv 2405.17755), training-free; "a Llama2-7B model is able to reason 20M long sequences". The
    paper ranks segments by the entropy of the model's predictions over the question (low entropy: certain);
    here certainty is the question's own mean log-probability, which also rewards a segment that makes the
    question's rare words (a needle's key) predictable.
    Costs: one pass over the whole context in segments (no generation), then one read of about
    ``k * chunk`` tokens."""

    name = "xl3m"
    paper = "XL3M, https://arxiv.org/abs/2405.17755"
    k: int = field(default=4, metadata={"help": "segments read"})
    chunk: int = field(default=512, metadata={"help": "tokens per segment"})
    overlap: int = field(default=0, metadata={"help": "tokens two neighbouring segments share"})
    unit: str = field(default="sentence", metadata={"help": "segment by token | sentence | paragraph"})
    tokens: int | None = field(default=None, metadata={"help": "cap on tokens read (default k x chunk)"})
    batch: int = field(default=4, metadata={"help": "segments scored per forward pass"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("xl3m: batch", self.batch, 1)

    def answer(self, reader: Reader, max_new_tokens: int) -> RowAnswer:
        chunks = body_chunks(reader, self.chunk, self.overlap, self.unit)
        body, query = reader.prompt.body, reader.prompt.query
        pieces = [body[c.start : c.end] for c in chunks]
        longest = max(len(p) for p in pieces) + len(query)
        if reader.window is not None and longest > reader.window:
            raise StrategyError(
                f"xl3m: a segment and the question ({longest} tokens) pass the model's window of {reader.window}"
            )
        start = time.perf_counter()
        scores, passes = certainty_scores(reader.model, pieces, query, self.batch)
        reader.ledger.add_forward(passes, sum(len(p) + len(query) for p in pieces), time.perf_counter() - start)
        chosen = select(reader, scores, chunks, self.k, self.tokens, max_new_tokens)
        return RowAnswer(read_selected(reader, chunks, chosen, max_new_tokens))
