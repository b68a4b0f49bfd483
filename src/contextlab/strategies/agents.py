"""Read everything, a window at a time, and answer from notes: Chain of Agents and Writing in the Margins."""

from __future__ import annotations

from dataclasses import dataclass, field

from contextlab.methods.base import check_int
from contextlab.strategies.base import Reader, RowAnswer, Strategy, StrategyError
from contextlab.strategies.chunking import check_chunking
from contextlab.strategies.retrieval import QUESTION_ROOM, body_chunks

# Words the notes are asked in. Kept short: every token of them is read once per chunk.
WORKER = (
    "\n\n{question}\nUpdate the notes for this question: keep what the earlier notes say that helps answer it "
    "and add what the text says that helps. Copy names and numbers exactly. Reply with the notes only."
)
MARGIN = (
    "\n\n{question}\nIf the text above helps answer this question, copy the facts that help (names and numbers "
    "exactly). If it does not, reply NONE."
)
NOTES_HEADER = "Notes taken while reading a long text:\n"


def _check_window(name: str, chunk: int, note_room: int, native: int | None, new: int) -> None:
    if native is not None and chunk + note_room + QUESTION_ROOM + new > native:
        raise StrategyError(
            f"{name}: a chunk of {chunk} tokens, {note_room} tokens of notes, the question and {new} new tokens "
            f"pass the model's window of {native}; use chunk <= {native - note_room - QUESTION_ROOM - new}"
        )


@dataclass(frozen=True)
class ChainOfAgents(Strategy):
    """Chain of Agents: workers read the chunks in order, each rewriting a bounded note from the previous
    worker's note and its own chunk; a manager answers the question from the last note alone.

    Chain of Agents (arXiv 2406.02818): "up to 10% over strong baselines of RAG, Full-Context, and
    multi-agent LLMs". Costs: one read and up to ``note`` generated tokens per chunk, then the answer."""

    name = "coa"
    paper = "Chain of Agents, https://arxiv.org/abs/2406.02818"
    chunk: int = field(default=2048, metadata={"help": "tokens each worker reads"})
    note: int = field(default=96, metadata={"help": "tokens a worker's note may hold"})
    unit: str = field(default="sentence", metadata={"help": "chunk by token | sentence | paragraph"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_chunking(self.chunk, 0, self.unit)
        check_int(f"{self.name}: note", self.note, 1)

    def check(self, native: int | None, max_new_tokens: int) -> None:
        _check_window(self.name, self.chunk, 2 * self.note, native, max_new_tokens)

    def largest_read(self, native: int, max_new_tokens: int) -> int:
        return self.chunk + self.note + QUESTION_ROOM * 2

    def answer(self, reader: Reader, max_new_tokens: int) -> RowAnswer:
        question = reader.tokenizer.decode(reader.prompt.query).strip()
        body, note = reader.prompt.body, []
        for c in body_chunks(reader, self.chunk, 0, self.unit):
            text = reader.encode("Text:\n") + body[c.start : c.end]
            if note:
                text += reader.encode("\n\nNotes so far:\n") + note
            note = reader.note([text], WORKER.format(question=question), self.note).token_ids[0]
        return RowAnswer(reader.answer(reader.encode(NOTES_HEADER) + note, max_new_tokens))


@dataclass(frozen=True)
class WritingInMargins(Strategy):
    """Writing in the Margins: after each chunk the model writes a margin note for the question (NONE when the
    chunk is irrelevant); irrelevant margins are dropped and the answer reads the relevant ones. When the
    whole prompt and the margins fit the window, the answer reads the context too, as in the paper;
    beyond the window it reads the margins alone (and when every margin says NONE, the question alone:
    the model found nothing, and its answer says so or guesses).

    WiM (arXiv 2408.14906): "average enhancement of 7.5% in accuracy for reasoning skills" and "more than a
    30.0% increase in the F1-score for aggregation tasks". Here each margin is written from its own chunk
    (the paper writes it with the cache of every chunk before), so margins are independent and go through
    the model ``batch`` at a time; a margin is kept unless it says NONE (the paper asks the model a second
    question to classify it)."""

    name = "wim"
    paper = "Writing in the Margins, https://arxiv.org/abs/2408.14906"
    chunk: int = field(default=2048, metadata={"help": "tokens per chunk"})
    margin: int = field(default=48, metadata={"help": "tokens a margin note may hold"})
    unit: str = field(default="sentence", metadata={"help": "chunk by token | sentence | paragraph"})
    batch: int = field(default=4, metadata={"help": "margins written per batched call"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_chunking(self.chunk, 0, self.unit)
        check_int(f"{self.name}: margin", self.margin, 1)
        check_int(f"{self.name}: batch", self.batch, 1)

    def check(self, native: int | None, max_new_tokens: int) -> None:
        _check_window(self.name, self.chunk, self.margin, native, max_new_tokens)

    def largest_read(self, native: int, max_new_tokens: int) -> int:
        return native - max_new_tokens

    def answer(self, reader: Reader, max_new_tokens: int) -> RowAnswer:
        prompt = reader.prompt
        question = reader.tokenizer.decode(prompt.query).strip()
        chunks = body_chunks(reader, self.chunk, 0, self.unit)
        margins: list[list[int]] = []
        for start in range(0, len(chunks), self.batch):
            bodies = [prompt.body[c.start : c.end] for c in chunks[start : start + self.batch]]
            out = reader.note(bodies, MARGIN.format(question=question), self.margin)
            margins += [ids for ids, text in zip(out.token_ids, out.texts, strict=True) if _relevant(text)]
        room = reader.room - max_new_tokens if reader.room is not None else 1 << 62
        notes = reader.encode(NOTES_HEADER)
        for m in margins:  # margins past what a read can hold are dropped, the latest first
            line = m + reader.encode("\n")
            if len(notes) + len(line) > room:
                break
            notes += line
        with_context = reader.encode("\n\n") + notes
        if len(prompt.body) + len(with_context) <= room:
            return RowAnswer(reader.answer(prompt.body + with_context, max_new_tokens))
        return RowAnswer(reader.answer(notes, max_new_tokens))


def _relevant(margin: str) -> bool:
    text = margin.strip().strip(".").lower()
    return bool(text) and not text.startswith("none")
