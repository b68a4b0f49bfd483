"""Requests -> ragged batches on one worker thread, with a bounded queue.

The HTTP handlers run on the event loop; the model runs on a single worker thread (a model holds one
device; batching, not threads, gives the throughput). A request is a :class:`Job`; the worker takes the
oldest waiting job, then gathers more with the same method for up to ``batch_wait`` seconds (at most
``max_batch`` rows) and runs them as one :func:`contextlab.generate` call: rows are left-padded and every
row keeps exactly what it would keep alone, so batching does not change an answer. Jobs of other methods
wait for the next batch in arrival order. A job whose client went away before its batch started is
dropped (its slot freed); one that goes away mid-batch stops receiving tokens.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from contextlab.engine.generate import generate, prefill
from contextlab.engine.session import Session
from contextlab.serve.metrics import Metrics
from contextlab.serve.protocol import ApiError, GenerationRequest
from contextlab.serve.reuse import PrefixCache, prefix_key


@dataclass
class Outcome:
    """What a finished job gets: token ids and finish reason per row, the batch's cost."""

    tokens: list[list[int]]
    reasons: list[str]
    kv_bytes: int
    kv_bytes_full: int
    prefill_seconds: float
    decode_seconds: float
    batch_rows: int
    reuse: str = "none"  # shared prefix: "hit" (started from a kept copy), "miss" (prefilled, then kept), "none"


@dataclass
class Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    # ("tokens", [new id per row]) while streaming, then ("done", Outcome) or ("error", ApiError)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    def send(self, kind: str, payload) -> None:
        if not self.cancelled.is_set():
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Scheduler:
    def __init__(
        self,
        model,
        tokenizer,
        metrics: Metrics,
        max_queue: int,
        max_batch: int,
        batch_wait: float,
        prefixes: PrefixCache | None = None,
    ):
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.prefixes = prefixes or PrefixCache(0)
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.waiting: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.backlog: deque[Job] = deque()  # taken from the queue but of another method than the batch
        self.thread = threading.Thread(target=self._run, name="contextlab-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.waiting.put(None)
        self.thread.join(timeout=30)

    @property
    def queue_length(self) -> int:
        return self.waiting.qsize() + len(self.backlog)

    def submit(self, job: Job) -> None:
        """Queue ``job``, or refuse with 429 (and Retry-After) when the queue is full."""
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise ApiError(
                429,
                f"the server is busy ({self.waiting.maxsize} requests waiting); retry shortly",
                "rate_limit_error",
                retry_after=1,
            ) from None

    # -- worker thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._next(block=True)
            if first is None:
                return
            batch = self._gather(first)
            if batch:
                self._execute(batch)

    def _next(self, block: bool, timeout: float | None = None) -> Job | None:
        if self.backlog:
            return self.backlog.popleft()
        try:
            return self.waiting.get(block=block, timeout=timeout)
        except queue.Empty:
            return None

    def _gather(self, first: Job) -> list[Job]:
        """``first`` and the jobs of the same method that arrive within ``batch_wait`` (live ones only)."""
        batch = [first] if not first.cancelled.is_set() else []
        if first.request.prefix:  # a shared-prefix request runs alone, from its kept prefix
            return batch
        rows = len(first.request.rows)
        deadline = time.perf_counter() + self.batch_wait
        skipped: list[Job] = []
        while rows < self.max_batch:
            left = deadline - time.perf_counter()
            job = self._next(block=left > 0, timeout=max(left, 0))
            if job is None:
                if left <= 0:
                    break
                continue
            if job.cancelled.is_set():
                continue
            fits = rows + len(job.request.rows) <= self.max_batch
            if job.request.method == first.request.method and fits and not job.request.prefix:
                batch.append(job)
                rows += len(job.request.rows)
            else:
                skipped.append(job)
        self.backlog.extendleft(reversed(skipped))  # they keep their turn
        return batch

    def _execute(self, batch: list[Job]) -> None:
        try:
            if batch[0].request.prefix:
                self._from_prefix(batch[0])
            else:
                self._generate(batch)
        except ValueError as err:
            if len(batch) > 1:  # one request's problem (say, past the window) must not fail the others
                for job in batch:
                    self._execute([job])
                return
            batch[0].send("error", ApiError(400, str(err)))
        except Exception as err:  # the server keeps serving; the client learns what happened
            for job in batch:
                job.send("error", ApiError(500, f"generation failed: {type(err).__name__}: {err}", "server_error"))

    def _generate(self, batch: list[Job]) -> None:
        rows = [r for job in batch for r in job.request.rows]
        spans, start = [], 0
        for job in batch:
            spans.append((start, start + len(job.request.rows)))
            start = spans[-1][1]
        longest = max(job.request.max_tokens for job in batch)

        def on_tokens(step: list[int]) -> None:
            for job, (a, b) in zip(batch, spans, strict=True):
                if job.request.stream:
                    job.send("tokens", step[a:b])

        began = time.perf_counter()
        out = generate(
            self.model,
            self.tokenizer,
            rows,
            None,
            method=batch[0].request.method,
            max_new_tokens=longest,
            chat_template=False,
            on_tokens=on_tokens,
        )
        self.metrics.batch_done(len(rows), out.kv_bytes, time.perf_counter() - began)
        for job, (a, b) in zip(batch, spans, strict=True):
            limit = job.request.max_tokens
            tokens, reasons = _finished(out.token_ids[a:b], limit)
            share = (b - a) / len(rows)
            job.send(
                "done",
                Outcome(
                    tokens=tokens,
                    reasons=reasons,
                    kv_bytes=int(out.kv_bytes * share),
                    kv_bytes_full=int(out.kv_bytes_full * share),
                    prefill_seconds=out.prefill_seconds,
                    decode_seconds=out.decode_seconds,
                    batch_rows=len(rows),
                ),
            )

    def _from_prefix(self, job: Job) -> None:
        """Answer from the kept compressed prefix (prefilled and kept first on a miss): a copy of it takes
        the rest of the prompt, then decodes."""
        req = job.request
        ids = req.rows[0]
        key = prefix_key(req.method, ids[: req.prefix])
        began = time.perf_counter()
        prefilled = self.prefixes.get(key)
        reuse = "hit"
        if prefilled is None:
            prefilled = prefill(self.model, self.tokenizer, ids[: req.prefix], method=req.method)
            reuse = "miss" if self.prefixes.put(key, prefilled) else "none"
        prefill_seconds = time.perf_counter() - began
        session = Session.from_prefilled(self.model, self.tokenizer, copy.deepcopy(prefilled))
        on_tokens = (lambda step: job.send("tokens", step)) if req.stream else None
        turn = session.ask(ids[req.prefix :], req.max_tokens, on_tokens=on_tokens)
        self.metrics.batch_done(1, turn.kv_bytes, time.perf_counter() - began)
        tokens, reasons = _finished(turn.token_ids, req.max_tokens)
        job.send(
            "done",
            Outcome(
                tokens=tokens,
                reasons=reasons,
                kv_bytes=turn.kv_bytes,
                kv_bytes_full=turn.kv_bytes_full,
                prefill_seconds=prefill_seconds,
                decode_seconds=turn.seconds,
                batch_rows=1,
                reuse=reuse,
            ),
        )


def _finished(rows: list[list[int]], limit: int) -> tuple[list[list[int]], list[str]]:
    """Each row cut to the request's ``limit`` (a batch decodes to its longest request's), with OpenAI's finish
    reason: "length" when the limit cut it, "stop" when it ended at EOS."""
    tokens = [t[:limit] for t in rows]
    return tokens, ["length" if len(t) >= limit else "stop" for t in tokens]
