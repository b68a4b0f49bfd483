"""Run a benchmark: every (method, task, length) cell over the same samples, rows stored as they finish.

Samples of a (task, length) are generated once from the run's seed and shared by every method, so methods
are compared on identical prompts. Samples are batched (left-padded) ``batch_size`` at a time; the cost
columns of a row are its batch's cost divided by the batch size (``peak_memory_bytes`` is the batch's).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from contextlab.bench.endpoint import EndpointClient
from contextlab.bench.metrics import score
from contextlab.bench.row import ResultRow
from contextlab.bench.spec import RunSpec, TaskSpec
from contextlab.bench.tasks import TASKS, Sample
from contextlab.engine.generate import generate
from contextlab.engine.resources import check_memory
from contextlab.engine.session import Session
from contextlab.engine.steps import check_window as engine_check_window
from contextlab.hf.rope import native_window
from contextlab.strategies import Strategy, build


@dataclass(frozen=True)
class Cell:
    method: str
    task: TaskSpec
    length: int


@dataclass
class RunContext:
    """What every cell of a run shares: the model, its tokenizer and the run's settings."""

    model: torch.nn.Module | None  # None for an endpoint run
    tokenizer: object
    spec: RunSpec
    device_name: str
    versions: str
    client: EndpointClient | None = None  # set for an endpoint run (contextlab.bench.endpoint)
    samples: dict = field(default_factory=dict)  # (task key, length) -> list[Sample]
    generation_seconds: float = 0.0

    def task_samples(self, task: TaskSpec, length: int) -> list[Sample]:
        key = (task.key, length)
        if key not in self.samples:
            self.samples[key] = TASKS.get(task.name)(
                self.tokenizer,
                length,
                sample_seed(self.spec.seed, task.key, length),
                num_samples=self.spec.samples,
                **task.params,
            )
        return self.samples[key]


def sample_seed(seed: int, task_key: str, length: int) -> int:
    digest = hashlib.sha256(f"{seed}|{task_key}|{length}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def plan_cells(spec: RunSpec) -> list[Cell]:
    return [Cell(m, t, n) for t in spec.task_specs for n in spec.lengths for m in spec.methods]


def environment(model, device: torch.device) -> dict:
    import transformers

    import contextlab

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "contextlab": contextlab.__version__,
        "device": f"{device.type}: {name}",
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "model_dtype": str(next(model.parameters()).dtype),
    }


def check_window(model, spec: RunSpec) -> None:
    """Every (method, length) of the run must fit what the method serves on this model (the engine's
    check); ``--allow-beyond-window`` runs them anyway. An input-level strategy reads within the window
    whatever the length: its parameters must fit a read in it."""
    for text in spec.methods:
        method = build(text)
        if isinstance(method, Strategy):
            method.check(native_window(model.config), spec.max_new_tokens)
            continue
        for n in spec.lengths:
            try:
                engine_check_window(
                    model,
                    method,
                    n + spec.max_new_tokens,
                    spec.allow_beyond_window,
                    f"length {n} (+{spec.max_new_tokens} new tokens)",
                    "pass --allow-beyond-window",
                )
            except ValueError as err:
                raise ValueError(f"{text}: {err}") from None


def check_memory_fits(model, spec: RunSpec) -> None:
    """Every method's longest prompts, a full batch of them, must fit the memory free on the model's device
    (the engine's lower-bound estimate), checked before any sample is built. A strategy's rows run one at
    a time, each read no longer than its largest."""
    batch, longest = min(spec.batch_size, spec.samples), max(spec.lengths)
    for text in spec.methods:
        method = build(text)
        if isinstance(method, Strategy):
            read = _largest_read(model, method, spec.max_new_tokens, longest)
            check_memory(model, method.read_method, 1, read, f"{text}'s largest read ({read} tokens)")
        else:
            check_memory(model, method, batch, longest, f"{text} at length {longest} with batch {batch}")


def _largest_read(model, strategy: Strategy, max_new_tokens: int, length: int) -> int:
    native = native_window(model.config)
    return min(length, strategy.largest_read(native, max_new_tokens)) if native else length


def check_budgets(spec: RunSpec) -> None:
    """Token budgets must fit every length of the run (ratios always do)."""
    shortest = min(spec.lengths)
    for text in spec.methods:
        method = build(text)
        try:
            (method.read_method if isinstance(method, Strategy) else method).prompt_keep(shortest)
        except ValueError as err:
            raise ValueError(f"{text}: {err} at length {shortest}; use a ratio or a smaller budget") from None


def pending_indices(cell: Cell, samples: list[Sample], done: set[tuple]) -> list[int]:
    """Samples of a cell with at least one turn not stored yet."""
    turns = len(samples[0].all_turns) if samples else 1
    return [
        i
        for i in range(len(samples))
        if any((cell.method, cell.task.key, cell.length, i, t) not in done for t in range(turns))
    ]


def run_cell(ctx: RunContext, cell: Cell, indices: list[int]) -> Iterator[list[ResultRow]]:
    """Rows of the given samples of a cell, one list per finished batch."""
    samples = ctx.task_samples(cell.task, cell.length)
    size = ctx.spec.batch_size
    for start in range(0, len(indices), size):
        batch = indices[start : start + size]
        if ctx.client is not None:
            runner = _endpoint_batch
        elif isinstance(build(cell.method), Strategy):
            runner = _strategy_batch
        else:
            runner = _shared_batch if cell.task.shared_context else _plain_batch
        began = time.perf_counter()
        rows = runner(ctx, cell, [samples[i] for i in batch], batch)
        ctx.generation_seconds += time.perf_counter() - began
        yield rows


@dataclass(frozen=True)
class BatchCost:
    """A batch's cost as each of its rows records it: bytes and seconds divided by the batch size, the peak
    memory the batch's."""

    kv_bytes: int
    kv_bytes_full: int
    peak_memory_bytes: int
    prefill_seconds: float
    decode_seconds: float
    batch_size: int

    @classmethod
    def of(cls, out, n: int, prefill_seconds: float, decode_seconds: float) -> BatchCost:
        return cls(
            kv_bytes=out.kv_bytes // n,
            kv_bytes_full=out.kv_bytes_full // n,
            peak_memory_bytes=out.peak_memory_bytes,
            prefill_seconds=prefill_seconds / n,
            decode_seconds=decode_seconds / n,
            batch_size=n,
        )


def _plain_batch(ctx: RunContext, cell: Cell, samples: list[Sample], indices: list[int]) -> list[ResultRow]:
    spec, n = ctx.spec, len(samples)
    out = generate(
        ctx.model,
        ctx.tokenizer,
        [s.context_ids for s in samples],
        [s.question_ids for s in samples],
        method=cell.method,
        max_new_tokens=spec.max_new_tokens,
        question_aware=spec.question_aware,
        allow_beyond_window=spec.allow_beyond_window,
    )
    cost = BatchCost.of(out, n, out.prefill_seconds, out.decode_seconds)
    return [
        _row(ctx, cell, s, i, 0, text, len(tokens), cost, Work(1, s.length + len(tokens)))
        for s, i, text, tokens in zip(samples, indices, out.texts, out.token_ids, strict=True)
    ]


def _strategy_batch(ctx: RunContext, cell: Cell, samples: list[Sample], indices: list[int]) -> list[ResultRow]:
    """An input-level strategy answers each sample (and each turn of a shared context: it re-reads the
    context for every question, at its full cost) on its own, so every row's cost is its own."""
    spec, strategy, rows = ctx.spec, build(cell.method), []
    for s, i in zip(samples, indices, strict=True):
        for turn, asked in enumerate(s.all_turns):
            out = strategy.generate(
                ctx.model,
                ctx.tokenizer,
                s.context_ids,
                asked.question_ids,
                max_new_tokens=spec.max_new_tokens,
                question_aware=spec.question_aware,
            )
            cost = BatchCost.of(out, 1, out.prefill_seconds, out.decode_seconds)
            work = Work(out.calls, out.tokens_processed, out.routes[0])
            rows.append(_row(ctx, cell, s, i, turn, out.text, len(out.tokens), cost, work))
    return rows


def _shared_batch(ctx: RunContext, cell: Cell, samples: list[Sample], indices: list[int]) -> list[ResultRow]:
    spec, n = ctx.spec, len(samples)
    session = Session(
        ctx.model,
        ctx.tokenizer,
        [s.context_ids for s in samples],
        [s.question_ids for s in samples],
        method=cell.method,
        question_aware=spec.question_aware,
        mode=spec.shared_mode,
        max_total_tokens=spec.max_new_tokens * len(samples[0].all_turns),
        allow_beyond_window=spec.allow_beyond_window,
    )
    rows = []
    for turn in range(len(samples[0].all_turns)):
        result = session.ask([s.all_turns[turn].question_ids for s in samples], spec.max_new_tokens)
        cost = BatchCost.of(result, n, session.prefill_seconds if turn == 0 else 0.0, result.seconds)
        rows += [
            _row(ctx, cell, s, i, turn, text, len(tokens), cost, _turn_work(s, turn, len(tokens)))
            for s, i, text, tokens in zip(samples, indices, result.texts, result.token_ids, strict=True)
        ]
    return rows


def _endpoint_batch(ctx: RunContext, cell: Cell, samples: list[Sample], indices: list[int]) -> list[ResultRow]:
    """The batch's samples sent to the endpoint at once, turn by turn (see :mod:`contextlab.bench.endpoint`)."""
    spec, n, rows = ctx.spec, len(samples), []
    shared = cell.task.shared_context
    for turn in range(len(samples[0].all_turns)):
        prompts = [s.context_ids + s.all_turns[turn].question_ids for s in samples]
        prefixes = [len(s.context_ids) if shared else 0 for s in samples]
        answers = ctx.client.complete_all(prompts, spec.max_new_tokens, cell.method, prefixes)
        for s, i, prompt, answer in zip(samples, indices, prompts, answers, strict=True):
            cost = _endpoint_cost(answer, n)
            work = Work(1, len(prompt) + answer.completion_tokens)
            rows.append(_row(ctx, cell, s, i, turn, answer.text, answer.completion_tokens, cost, work))
    return rows


def _endpoint_cost(answer, n: int) -> BatchCost:
    """A contextlab server's reported costs; others report none (0 bytes, the wall latency as decode)."""
    ext = answer.extension or {}
    return BatchCost(
        kv_bytes=int(ext.get("kv_bytes", 0)),
        kv_bytes_full=int(ext.get("kv_bytes_full", 0)),
        peak_memory_bytes=0,
        prefill_seconds=float(ext.get("prefill_seconds", 0.0)),
        decode_seconds=float(ext.get("decode_seconds", answer.latency)),
        batch_size=n,
    )


@dataclass(frozen=True)
class Work:
    """What a row cost in model work: calls, tokens through the model, and the route a router took."""

    calls: int
    tokens_processed: int
    route: str | None = None


def _turn_work(sample: Sample, turn: int, new_tokens: int) -> Work:
    """A shared-context turn: the first reads context and question, a later one its question only."""
    asked = len(sample.all_turns[turn].question_ids)
    return Work(1, (sample.length if turn == 0 else asked) + new_tokens)


def _row(
    ctx: RunContext,
    cell: Cell,
    sample: Sample,
    index: int,
    turn: int,
    text: str,
    new_tokens: int,
    cost: BatchCost,
    work: Work,
) -> ResultRow:
    asked = sample.all_turns[turn]
    return ResultRow(
        method=cell.method,
        task=cell.task.key,
        length=cell.length,
        sample_index=index,
        turn=turn,
        task_name=cell.task.name,
        task_params=json.dumps(cell.task.params, sort_keys=True),
        seed=sample.seed,
        depth=sample.depth,
        metric=asked.metric,
        score=score(asked.metric, text, asked.answers),
        prediction=text,
        answers=json.dumps(asked.answers),
        prompt_tokens=sample.length,
        prompt_chars=len(ctx.tokenizer.decode(sample.context_ids + asked.question_ids)),
        new_tokens=new_tokens,
        **asdict(cost),
        **asdict(work),
        model=ctx.spec.model,
        device=ctx.device_name,
        versions=ctx.versions,
    )


@dataclass
class RunSummary:
    run_dir: str
    rows_written: int
    wall_seconds: float
    generation_seconds: float

    @property
    def harness_share(self) -> float:
        """Share of the wall time spent outside generation (sample building, scoring, storage, progress)."""
        return 1.0 - self.generation_seconds / self.wall_seconds if self.wall_seconds else 0.0


def execute_local(
    ctx: RunContext,
    work: list[tuple[Cell, list[int]]],
    write: Callable[[list[ResultRow]], None],
    advance: Callable[[int], None],
) -> None:
    """Run each cell's pending samples in this process, storing every batch as it finishes."""
    for cell, indices in work:
        for rows in run_cell(ctx, cell, indices):
            write(rows)
            advance(len({r.sample_index for r in rows}))
