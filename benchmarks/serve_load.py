#!/usr/bin/env python
"""``contextlab serve`` under load: errors and latency under concurrency, shared-context reuse, correctness.

Every section starts its own server as a subprocess (``python -m contextlab.cli serve --model M --port P
...`` on a free loopback port, ``HF_HUB_OFFLINE=1``), polls ``GET /health`` until it answers 200 (deadline
180 s), measures, and terminates it (SIGTERM, then SIGKILL after 30 s) when the section ends, also on errors.
Clients use ``httpx`` from threads of this process. The targets are those of issue 12; each is reported as
met / not met from the numbers measured in the run.

1. ``load``: reference model (``--model reference``), server ``--method full --max-batch 8 --max-queue 64``
   unless ``--method`` / ``--max-batch`` / ``--max-queue`` say otherwise. ``--clients`` (32) concurrent
   clients each send ``--requests`` (200) requests one after the other to ``/v1/completions``: short prompts
   ``"Note {i}: the code is {4 random digits}. The code is"`` (seeded), ``max_tokens`` 16. A 429 is retried
   after its ``Retry-After`` (counted apart, it is the documented answer of a full queue); any other non-200
   status or transport error counts as an error (the request is not retried). One short warm-up request runs
   before the clients start; ``/metrics`` is read before and after and the section uses the difference.
   Reported: requests, errors by status, 429s, p50/p90/p99 latency (nearest rank) of the successful
   requests (the successful attempt, send to full response), throughput over the section's wall time (first
   client start to last client end) in requests/s and completion tokens/s (``usage.completion_tokens``),
   mean batch rows (``contextlab_batch_rows_total / contextlab_batches_total`` differences), and the server's
   resident memory: ``VmRSS`` of ``/proc/<pid>/status`` sampled every 0.5 s, at the start (just before the
   clients start) and the maximum during the section. Targets: 0 errors other than 429s; server RSS bounded,
   taken as max RSS < start RSS + 1 GiB.
2. ``reuse``: ``--reuse-model`` (SmolLM2-135M-Instruct), server ``--method`` ``--reuse-method`` (snapkv:0.5).
   One context of ``--context-tokens`` (4000) tokens of the King James Bible (from Genesis 1:1; counted with
   the model's tokenizer, without template), then 10 different questions sent one after the other as
   streamed chat requests, ``messages = [user: context, assistant: "I have read the text.", user:
   question]``, ``max_tokens`` 16. The server treats the first two messages as a shared prefix (they reach
   ``--reuse-min-tokens``, 1024): question 1 prefills and keeps it (a miss), later questions start from a copy.
   TTFT = time from sending the request to the first SSE ``data: {`` chunk whose delta has non-empty content
   (when an answer has no content at all, the first chunk of any kind; flagged). The reuse outcome of each
   request is the change of ``contextlab_reuse_total{outcome=hit|miss}`` in ``/metrics`` around it. Each
   server gets one short chat warm-up request (below the reuse threshold) first, so question 1's time is
   cache-cold but not process-cold. Baseline: the same questions on a second server started with
   ``--reuse-mb 0`` (reuse off: every question prefills the whole prompt, question-aware). Target: TTFT of
   questions 2-10 >= 5x lower than the cold first one, i.e. TTFT(q1) / median TTFT(q2..10) >= 5.
3. ``correctness``: reference model, 16 prompts (King James passages of 100-700 characters, i.e. as many
   tokens for this byte-level model, so eviction methods do evict; every other one ends in a code note);
   for each method in ``full``, ``snapkv:0.5`` and ``streaming:sink=4,window=64`` (sent per request as
   ``"contextlab": {"method": m}``), all prompts at once (released together by a barrier, so they batch; the
   batch rows each response reports are recorded) and then one at a time, ``max_tokens`` 16, each answer's
   text compared with ``cl.generate(model, tok, prompt, None, method=m, max_new_tokens=16,
   chat_template=False).text`` computed in this process before the server starts. Target: every answer
   equal.

Results: ``benchmarks/results/serve_load.json`` (one key per section, each with the environment: versions,
CPU, threads, platform, date) and ``benchmarks/results/serve_load.md`` (regenerated from the JSON after
every section). ``--quick`` (8 clients x 5 requests; a ~1500-token context, 3 questions and
``--reuse-min-tokens 512``; 4 prompts) writes to a folder in the temporary directory instead.

    PYTHONPATH=. python -u benchmarks/serve_load.py [--sections load reuse correctness] [--clients 32]
        [--requests 200] [--method full] [--reuse-model smollm2-135m-instruct] [--reuse-method snapkv:0.5]
        [--server-threads N] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import transformers
from benchmarks._machine import cpu_name

import contextlab as cl
from contextlab.bench.tasks.text import kjv_text

RESULTS = Path(__file__).parent / "results"
QUICK_DIR = Path(tempfile.gettempdir()) / "contextlab-serve-load-quick"
SECTIONS = ["load", "reuse", "correctness"]
HEALTH_DEADLINE = 180.0
RSS_PERIOD = 0.5
RSS_BOUND_MIB = 1024.0
MAX_429_RETRIES = 1000  # a request refused this many times in a row counts as an error
ACK = "I have read the text."
QUESTIONS = [
    "What did God create in the beginning?",
    "What did God call the light?",
    "Who was the first man?",
    "What was the name of the garden God planted?",
    "Which tree were the man and the woman told not to eat from?",
    "Who killed Abel?",
    "On which day did God rest from his work?",
    "What did God make from the rib taken from the man?",
    "What was the name of Adam's son born after Abel died?",
    "What rivers went out of the garden?",
]
CORRECTNESS_METHODS = ["full", "snapkv:0.5", "streaming:sink=4,window=64"]


def say(*parts) -> None:
    print(*parts, flush=True)


# -- environment -----------------------------------------------------------------------------------------------
def environment(args) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "httpx": httpx.__version__,
        "contextlab": cl.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads_client": torch.get_num_threads(),
        "server_threads": args.server_threads or f"torch default ({torch.get_num_threads()} here)",
        "loadavg_before": list(os.getloadavg()),
        "quick": args.quick,
    }


# -- the server subprocess -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``contextlab serve`` as a subprocess; use as a context manager (terminated on exit, errors included)."""

    def __init__(self, model: str, options: list[str], threads: int | None, log_dir: Path, label: str) -> None:
        self.port = free_port()
        self.command = [sys.executable, "-m", "contextlab.cli", "serve", "--model", model, "--port", str(self.port)]
        self.command += options
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)
        self.log_path = log_dir / f"server-{label}-{self.port}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.start_seconds = 0.0

    def __enter__(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.log_path.open("w")
        say("starting:", " ".join(self.command[1:]))
        began = time.perf_counter()
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy(began)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - began
        say(f"server pid {self.proc.pid} healthy on port {self.port} after {self.start_seconds:.1f}s")
        return self

    def _wait_healthy(self, began: float) -> None:
        with httpx.Client(timeout=5.0) as client:
            while time.perf_counter() - began < HEALTH_DEADLINE:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode} before /health:\n{self.tail()}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise RuntimeError(f"the server did not answer /health within {HEALTH_DEADLINE:.0f}s:\n{self.tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode
        self.log.close()

    def __exit__(self, *exc) -> None:
        self.stop()

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{'name{labels}': value}``."""
        text = httpx.get(self.url + "/metrics", timeout=30.0).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def rss_mib(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None


class RssSampler:
    """The server's VmRSS every ``RSS_PERIOD`` seconds on a thread, until stopped."""

    def __init__(self, server: Server) -> None:
        self.server, self.samples, self.done = server, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.is_set():
            value = self.server.rss_mib()
            if value is not None:
                self.samples.append(value)
            self.done.wait(RSS_PERIOD)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# -- load ----------------------------------------------------------------------------------------------------
def load_client(url: str, prompts: list[str], max_tokens: int) -> dict:
    """One client: its prompts one after the other; 429s retried after Retry-After."""
    out = {"latencies": [], "end_to_end": [], "completion_tokens": 0, "errors": Counter(), "r429": 0, "samples": []}
    with httpx.Client(base_url=url, timeout=300.0) as client:
        for prompt in prompts:
            body = {"prompt": prompt, "max_tokens": max_tokens}
            first = time.perf_counter()
            for _ in range(MAX_429_RETRIES):
                sent = time.perf_counter()
                try:
                    r = client.post("/v1/completions", json=body)
                except httpx.TransportError as err:
                    out["errors"][type(err).__name__] += 1
                    if len(out["samples"]) < 3:
                        out["samples"].append(f"{type(err).__name__}: {err}")
                    break
                if r.status_code == 429:
                    out["r429"] += 1
                    time.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                if r.status_code != 200:
                    out["errors"][str(r.status_code)] += 1
                    if len(out["samples"]) < 3:
                        out["samples"].append(f"{r.status_code}: {r.text[:300]}")
                    break
                now = time.perf_counter()
                out["latencies"].append(now - sent)
                out["end_to_end"].append(now - first)
                out["completion_tokens"] += r.json()["usage"]["completion_tokens"]
                break
            else:
                out["errors"]["429 (gave up)"] += 1
    return out


def section_load(args, log_dir: Path) -> dict:
    rng = random.Random(args.seed)
    plan = [
        [
            f"Note {c * args.requests + i}: the code is {rng.randrange(10000):04d}. The code is"
            for i in range(args.requests)
        ]
        for c in range(args.clients)
    ]
    options = ["--method", args.method, "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
    result: dict = {
        "model": "reference",
        "server_options": options,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": args.load_max_tokens,
    }
    with Server("reference", options, args.server_threads, log_dir, "load") as server:
        result["server_start_s"] = server.start_seconds
        with httpx.Client(base_url=server.url, timeout=120.0) as client:  # warm-up, outside the measurement
            client.post("/v1/completions", json={"prompt": "Note 0: the code is 1234. The code is", "max_tokens": 4})
        before = server.metrics()
        rss_start = server.rss_mib()
        with RssSampler(server) as rss, ThreadPoolExecutor(args.clients) as pool:
            began = time.perf_counter()
            outs = list(pool.map(lambda p: load_client(server.url, p, args.load_max_tokens), plan))
            wall = time.perf_counter() - began
        alive = server.alive()
        after = server.metrics() if alive else {}
        rss_end = server.rss_mib()
    result["server_exit_code"] = server.exit_code
    result["server_alive_at_end"] = alive
    if not alive:
        result["server_log_tail"] = server.tail()
    latencies = [x for o in outs for x in o["latencies"]]
    end_to_end = [x for o in outs for x in o["end_to_end"]]
    errors: Counter = Counter()
    for o in outs:
        errors.update(o["errors"])
    batches = delta(after, before, "contextlab_batches_total")
    rows = delta(after, before, "contextlab_batch_rows_total")
    served_200 = delta(after, before, 'contextlab_requests_total{endpoint="/v1/completions",status="200"}')
    completion_tokens = sum(o["completion_tokens"] for o in outs)
    samples = [rss_start, *rss.samples, rss_end]
    samples = [s for s in samples if s is not None]
    result |= {
        "requests": args.clients * args.requests,
        "succeeded": len(latencies),
        "errors": dict(errors),
        "error_samples": [s for o in outs for s in o["samples"]][:5],
        "r429": sum(o["r429"] for o in outs),
        "latency_s": {f"p{p}": percentile(latencies, p) for p in (50, 90, 99)} | {"max": max(latencies, default=None)},
        "end_to_end_s": {f"p{p}": percentile(end_to_end, p) for p in (50, 90, 99)},
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "completion_tokens": completion_tokens,
        "completion_tokens_per_s": completion_tokens / wall,
        "batches": batches,
        "batch_rows": rows,
        "mean_batch_rows": rows / batches if batches else None,
        "server_200_completions": served_200,
        "rss_start_mib": rss_start,
        "rss_max_mib": max(samples) if samples else None,
        "rss_end_mib": rss_end,
        "rss_samples": len(rss.samples),
    }
    errors_total = sum(errors.values())
    result["target_errors_met"] = errors_total == 0 and alive
    result["target_rss_met"] = (
        rss_start is not None
        and result["rss_max_mib"] is not None
        and result["rss_max_mib"] < rss_start + RSS_BOUND_MIB
    )
    say(
        f"load: {result['succeeded']}/{result['requests']} ok, errors {dict(errors)}, 429s {result['r429']}, "
        f"p50 {result['latency_s']['p50']}, {result['requests_per_s']:.1f} req/s, mean batch rows "
        f"{result['mean_batch_rows']}, RSS {rss_start} -> max {result['rss_max_mib']} MiB"
    )
    return result


# -- reuse ---------------------------------------------------------------------------------------------------
def chat_ids(tok, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def build_context(tok, tokens: int) -> str:
    """The first ``tokens`` tokens of the King James Bible (from Genesis 1:1) as text, cut at a line end."""
    text = kjv_text()[: tokens * 8]
    ids = tok(text, add_special_tokens=False)["input_ids"][:tokens]
    context = tok.decode(ids)
    return context[: context.rfind("\n")] if "\n" in context else context


def streamed_chat(client: httpx.Client, messages: list[dict], max_tokens: int) -> dict:
    sent = time.perf_counter()
    try:
        return _streamed_chat(client, messages, max_tokens)
    except httpx.TransportError as err:
        return {"status": type(err).__name__, "error": str(err), "total_s": time.perf_counter() - sent}


def _streamed_chat(client: httpx.Client, messages: list[dict], max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True}
    sent = time.perf_counter()
    first_content = first_chunk = None
    text, error = "", None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return {"status": r.status_code, "error": r.text[:500], "total_s": time.perf_counter() - sent}
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            payload = json.loads(line[6:])
            if "error" in payload:
                error = payload["error"]
                continue
            first_chunk = first_chunk if first_chunk is not None else now - sent
            piece = payload["choices"][0]["delta"].get("content") or ""
            if piece and first_content is None:
                first_content = now - sent
            text += piece
    total = time.perf_counter() - sent
    return {
        "status": 200,
        "error": error,
        "ttft_s": first_content if first_content is not None else first_chunk,
        "ttft_from_content": first_content is not None,
        "total_s": total,
        "text": text,
    }


def run_questions(args, log_dir: Path, tok, context: str, questions: list[str], reuse_on: bool) -> dict:
    options = ["--method", args.reuse_method, "--reuse-min-tokens", str(args.reuse_min_tokens)]
    if not reuse_on:
        options += ["--reuse-mb", "0"]
    label = "reuse-on" if reuse_on else "reuse-off"
    out: dict = {"server_options": options, "questions": []}
    with Server(args.reuse_model, options, args.server_threads, log_dir, label) as server:
        out["server_start_s"] = server.start_seconds
        with httpx.Client(base_url=server.url, timeout=900.0) as client:
            warm = streamed_chat(client, [{"role": "user", "content": "Say hello."}], 4)
            out["warmup"] = {k: warm.get(k) for k in ("status", "ttft_s", "total_s")}
            for i, question in enumerate(questions):
                messages = [
                    {"role": "user", "content": context},
                    {"role": "assistant", "content": ACK},
                    {"role": "user", "content": question},
                ]
                before = server.metrics()
                answer = streamed_chat(client, messages, args.reuse_max_tokens)
                after = server.metrics()
                hits = delta(after, before, 'contextlab_reuse_total{outcome="hit"}')
                misses = delta(after, before, 'contextlab_reuse_total{outcome="miss"}')
                answer["reuse"] = "hit" if hits else ("miss" if misses else "none")
                answer["question"] = question
                answer["prompt_tokens"] = len(chat_ids(tok, messages, True))
                out["questions"].append(answer)
                say(
                    f"{label} q{i + 1}: status {answer['status']} ttft {answer.get('ttft_s')} total "
                    f"{answer['total_s']:.2f}s reuse {answer['reuse']} text {answer.get('text', '')[:60]!r}"
                )
        out["metrics_end"] = {k: v for k, v in server.metrics().items() if k.startswith("contextlab_reuse")}
    out["server_exit_code"] = server.exit_code
    ok = [q for q in out["questions"] if q["status"] == 200 and q.get("ttft_s") is not None]
    if len(ok) == len(questions) and len(ok) >= 2:
        cold, warm_ttfts = ok[0]["ttft_s"], [q["ttft_s"] for q in ok[1:]]
        out["cold_ttft_s"] = cold
        out["later_median_ttft_s"] = statistics.median(warm_ttfts)
        out["later_max_ttft_s"] = max(warm_ttfts)
        out["ratio"] = cold / out["later_median_ttft_s"]
    return out


def section_reuse(args, log_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from contextlab.loading import resolve

    tok = AutoTokenizer.from_pretrained(resolve(args.reuse_model))
    context = build_context(tok, args.context_tokens)
    questions = QUESTIONS[: args.questions]
    shared = [{"role": "user", "content": context}, {"role": "assistant", "content": ACK}]
    result: dict = {
        "model": args.reuse_model,
        "method": args.reuse_method,
        "context_tokens": len(tok(context, add_special_tokens=False)["input_ids"]),
        "prefix_tokens": len(chat_ids(tok, shared, False)),
        "reuse_min_tokens": args.reuse_min_tokens,
        "max_tokens": args.reuse_max_tokens,
    }
    say(f"reuse: context {result['context_tokens']} tokens, shared prefix {result['prefix_tokens']} templated")
    result["reuse_on"] = run_questions(args, log_dir, tok, context, questions, True)
    result["reuse_off"] = run_questions(args, log_dir, tok, context, questions, False)
    ratio = result["reuse_on"].get("ratio")
    result["target_met"] = ratio is not None and ratio >= args.reuse_target
    result["target"] = args.reuse_target
    return result


# -- correctness -----------------------------------------------------------------------------------------------
def correctness_prompts(count: int, seed: int) -> list[str]:
    """King James passages of 100-700 characters (one token per byte here, so past streaming's 68-token
    budget), every other one ending in a note to complete (``"... Note i: the code is 1234. The code is"``)."""
    rng, text, out = random.Random(seed), kjv_text(), []
    for i in range(count):
        start = text.index("\n", rng.randrange(len(text) - 2000)) + 1
        passage = text[start : start + rng.randrange(100, 700)].strip()
        out.append(passage + (f" Note {i}: the code is {rng.randrange(10000):04d}. The code is" if i % 2 == 0 else ""))
    return out


def ask(url: str, prompt: str, method: str, max_tokens: int, barrier: threading.Barrier | None = None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "contextlab": {"method": method}}
    with httpx.Client(base_url=url, timeout=600.0) as client:
        if barrier is not None:
            barrier.wait()
        try:
            r = client.post("/v1/completions", json=body)
        except httpx.TransportError as err:
            return {"status": type(err).__name__, "text": None}
    if r.status_code != 200:
        return {"status": r.status_code, "text": None, "error": r.text[:300]}
    data = r.json()
    return {"status": 200, "text": data["choices"][0]["text"], "batch_rows": data["contextlab"]["batch_rows"]}


def section_correctness(args, log_dir: Path) -> dict:
    prompts = correctness_prompts(args.prompts, args.seed)
    model, tok = cl.load("reference")
    expected = {}
    for method in CORRECTNESS_METHODS:
        expected[method] = [
            cl.generate(
                model, tok, p, None, method=method, max_new_tokens=args.correct_max_tokens, chat_template=False
            ).text
            for p in prompts
        ]
    del model
    result: dict = {
        "model": "reference",
        "prompts": len(prompts),
        "prompt_chars": [len(p) for p in prompts],
        "max_tokens": args.correct_max_tokens,
        "methods": {},
    }
    with Server("reference", [], args.server_threads, log_dir, "correctness") as server:
        for method in CORRECTNESS_METHODS:
            barrier = threading.Barrier(len(prompts))
            with ThreadPoolExecutor(len(prompts)) as pool:
                futures = [pool.submit(ask, server.url, p, method, args.correct_max_tokens, barrier) for p in prompts]
                batched = [f.result() for f in futures]
            alone = [ask(server.url, p, method, args.correct_max_tokens) for p in prompts]
            cell = {}
            for mode, answers in (("batched", batched), ("alone", alone)):
                matches = [a["text"] == e for a, e in zip(answers, expected[method], strict=True)]
                cell[mode] = {
                    "matches": sum(matches),
                    "total": len(prompts),
                    "statuses": dict(Counter(str(a["status"]) for a in answers)),
                    "batch_rows": [a.get("batch_rows") for a in answers],
                    "mismatches": [
                        {"prompt": i, "expected": e, "got": a["text"], "error": a.get("error")}
                        for i, (a, e, m) in enumerate(zip(answers, expected[method], matches, strict=True))
                        if not m
                    ][:5],
                }
                say(
                    f"correctness {method} {mode}: {sum(matches)}/{len(prompts)} equal, batch rows "
                    f"{cell[mode]['batch_rows']}"
                )
            result["methods"][method] = cell
    result["server_exit_code"] = server.exit_code
    result["target_met"] = all(
        c[mode]["matches"] == c[mode]["total"] for c in result["methods"].values() for mode in ("batched", "alone")
    )
    return result


# -- report ----------------------------------------------------------------------------------------------------
def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def verdict(met: bool) -> str:
    return "**met**" if met else "**NOT met**"


def env_line(env: dict) -> str:
    return (
        f"Run {env['date']} on {env['cpu']} ({env['cpu_count']} cores; torch threads here "
        f"{env['torch_threads_client']}, "
        f"server threads {env['server_threads']}), {env['platform']}; Python {env['python']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, httpx {env['httpx']}, contextlab {env['contextlab']}; load average "
        f"before {'/'.join(f'{x:.2f}' for x in env['loadavg_before'])}"
        + (" (quick mode: smoke-test sizes)" if env.get("quick") else "")
        + "."
    )


def report_load(r: dict) -> list[str]:
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"
    lat = r["latency_s"]
    rows = [
        [
            f"{r['clients']} x {r['requests_per_client']}",
            str(r["requests"]),
            str(r["succeeded"]),
            errors,
            str(r["r429"]),
            fmt(lat["p50"]),
            fmt(lat["p90"]),
            fmt(lat["p99"]),
            fmt(r["requests_per_s"], 1),
            fmt(r["completion_tokens_per_s"], 1),
            fmt(r["mean_batch_rows"], 2),
            fmt(r["rss_start_mib"], 0),
            fmt(r["rss_max_mib"], 0),
        ]
    ]
    head = ["clients x requests", "requests", "ok", "errors", "429s", "p50 s", "p90 s", "p99 s", "req/s"]
    head += ["completion tok/s", "mean batch rows", "RSS start MiB", "RSS max MiB"]
    out = [
        "## Load (reference model)",
        "",
        env_line(r["env"]),
        "",
        f"Server: `contextlab serve --model reference {' '.join(r['server_options'])}` (started in "
        f"{r['server_start_s']:.1f}s). Each client sends its requests one after the other to `/v1/completions` "
        f"(`max_tokens` {r['max_tokens']}, short seeded prompts); 429s are retried after `Retry-After`. Latency: "
        "the successful attempt, send to full response (nearest-rank percentiles). Throughput over the "
        f"section's wall time ({r['wall_s']:.1f}s). Mean batch rows from `/metrics` (`contextlab_batch_rows_total` / "
        f"`contextlab_batches_total`: {r['batch_rows']:.0f} / {r['batches']:.0f}). RSS: `VmRSS` of the server "
        f"process every {RSS_PERIOD}s ({r['rss_samples']} samples), start = just before the clients start.",
        "",
        markdown(head, rows),
        "",
        f"- target 0 errors other than 429s: {sum(r['errors'].values())} errors, {r['r429']} 429s "
        f"(server alive at the end: {r['server_alive_at_end']}; the server counted "
        f"{r['server_200_completions']:.0f} completions answered 200): {verdict(r['target_errors_met'])}",
        f"- target server RSS bounded (max < start + {RSS_BOUND_MIB:.0f} MiB): start {fmt(r['rss_start_mib'], 0)} MiB, "
        f"max {fmt(r['rss_max_mib'], 0)} MiB, end {fmt(r['rss_end_mib'], 0)} MiB: {verdict(r['target_rss_met'])}",
    ]
    if r["error_samples"]:
        out.append("- first errors: " + "; ".join(f"`{s[:200]}`" for s in r["error_samples"]))
    if not r["server_alive_at_end"]:
        out += ["", "Server log tail:", "", "```", r.get("server_log_tail", ""), "```"]
    return [*out, ""]


def report_reuse(r: dict) -> list[str]:
    out = [
        f"## Shared-context reuse ({r['model']}, `{r['method']}`)",
        "",
        env_line(r["env"]),
        "",
        f"Context: the first {r['context_tokens']} tokens of the King James Bible ({r['prefix_tokens']} tokens "
        'for the templated shared messages `[user: context, assistant: "I have read the text."]`), then '
        f"{len(r['reuse_on']['questions'])} questions sent one after the other as streamed chat requests "
        f"(`max_tokens` {r['max_tokens']}; reuse from {r['reuse_min_tokens']} shared tokens). TTFT: send to "
        "the first SSE chunk with content. Reuse outcome: change of `contextlab_reuse_total` around the request. "
        "One short warm-up chat request per server first. Reuse off: a second server with `--reuse-mb 0` "
        "(each question prefills the whole prompt, question-aware, so the answers may differ).",
        "",
    ]
    on, off = r["reuse_on"]["questions"], r["reuse_off"]["questions"]
    rows = []
    for i in range(max(len(on), len(off))):
        a = on[i] if i < len(on) else {}
        b = off[i] if i < len(off) else {}
        rows.append(
            [
                str(i + 1),
                fmt(a.get("ttft_s")) + ("" if a.get("ttft_from_content", True) else " (no content)"),
                fmt(a.get("total_s")),
                str(a.get("reuse", "—")),
                fmt(b.get("ttft_s")) + ("" if b.get("ttft_from_content", True) else " (no content)"),
                fmt(b.get("total_s")),
                str(b.get("reuse", "—")),
                f"`{(a.get('text') or '').strip()[:40]}`",
                str(a.get("status")) + " / " + str(b.get("status")),
            ]
        )
    head = ["question", "TTFT s (reuse)", "total s (reuse)", "outcome", "TTFT s (off)", "total s (off)"]
    head += ["outcome (off)", "answer (reuse)", "status"]
    out += [markdown(head, rows), ""]
    summary = []
    for label, s in (("reuse on", r["reuse_on"]), ("reuse off", r["reuse_off"])):
        summary.append(
            [
                label,
                fmt(s.get("cold_ttft_s")),
                fmt(s.get("later_median_ttft_s")),
                fmt(s.get("later_max_ttft_s")),
                fmt(s.get("ratio"), 2) + ("x" if s.get("ratio") is not None else ""),
                fmt(s.get("server_start_s"), 1),
            ]
        )
    n = len(on)
    head = ["server", "cold TTFT s (q1)", f"median TTFT s (q2-{n})", f"max TTFT s (q2-{n})", "ratio", "server start s"]
    out += [
        markdown(head, summary),
        "",
        f"- target TTFT of questions 2-{n} >= {r['target']:g}x lower than the cold first one (reuse on): ratio "
        f"{fmt(r['reuse_on'].get('ratio'), 2)}: {verdict(r['target_met'])}",
        "",
    ]
    return out


def report_correctness(r: dict) -> list[str]:
    rows = []
    for method, cell in r["methods"].items():
        for mode in ("batched", "alone"):
            c = cell[mode]
            rows_seen = sorted({x for x in c["batch_rows"] if x is not None})
            rows.append(
                [
                    f"`{method}`",
                    mode,
                    f"{c['matches']} / {c['total']}",
                    ", ".join(f"{k}: {v}" for k, v in c["statuses"].items()),
                    ", ".join(map(str, rows_seen)) or "—",
                ]
            )
    out = [
        "## Correctness: server vs `cl.generate` (reference model)",
        "",
        env_line(r["env"]),
        "",
        f"{r['prompts']} prompts ({min(r['prompt_chars'])}-{max(r['prompt_chars'])} characters = byte tokens), "
        f"`max_tokens` {r['max_tokens']}, the method per request; batched: all prompts released together "
        "(batch rows as each response reports them); alone: one at a time. Expected: `cl.generate(model, tok, "
        "prompt, None, method=m, max_new_tokens=16, chat_template=False).text` in the benchmark process.",
        "",
        markdown(["method", "mode", "equal", "statuses", "batch rows seen"], rows),
        "",
        f"- target greedy outputs equal `cl.generate` (batched or not): {verdict(r['target_met'])}",
    ]
    for method, cell in r["methods"].items():
        for mode in ("batched", "alone"):
            for m in cell[mode]["mismatches"]:
                out.append(f"  - `{method}` {mode} prompt {m['prompt']}: expected {m['expected']!r}, got {m['got']!r}")
    return [*out, ""]


def report(store: dict) -> str:
    lines = [
        "# `contextlab serve` under load (benchmarks/serve_load.py)",
        "",
        "Command: `PYTHONPATH=. python -u benchmarks/serve_load.py` (sections accumulate in the JSON; each run "
        "replaces the sections it runs). Each section starts its own server subprocess on a free loopback port. "
        "Timings depend on the machine and on what else runs on it.",
        "",
    ]
    if "load" in store:
        lines += report_load(store["load"])
    if "reuse" in store:
        lines += report_reuse(store["reuse"])
    if "correctness" in store:
        lines += report_correctness(store["correctness"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=200, help="requests per client (load)")
    parser.add_argument("--method", default="full", help="server method of the load section")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--reuse-model", default="smollm2-135m-instruct")
    parser.add_argument("--reuse-method", default="snapkv:0.5")
    parser.add_argument("--context-tokens", type=int, default=4000)
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--reuse-min-tokens", type=int, default=1024)
    parser.add_argument("--reuse-target", type=float, default=5.0, help="required cold / later TTFT ratio")
    parser.add_argument("--prompts", type=int, default=16, help="prompts of the correctness section")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--server-threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, results in a temp folder")
    args = parser.parse_args()
    args.load_max_tokens = args.reuse_max_tokens = args.correct_max_tokens = 16
    out_dir = RESULTS
    if args.quick:
        args.clients, args.requests = 8, 5
        args.context_tokens, args.questions, args.reuse_min_tokens = 1500, 3, 512
        args.prompts = 4
        out_dir = QUICK_DIR
    if not 2 <= args.questions <= len(QUESTIONS):
        parser.error(f"--questions must be between 2 and {len(QUESTIONS)}")
    json_path, md_path = out_dir / "serve_load.json", out_dir / "serve_load.md"
    log_dir = Path(tempfile.mkdtemp(prefix="contextlab-serve-load-logs-"))
    store = json.loads(json_path.read_text()) if json_path.exists() else {}
    runners = {"load": section_load, "reuse": section_reuse, "correctness": section_correctness}
    timings = {}
    for section in SECTIONS:
        if section not in args.sections:
            continue
        say(f"== {section}")
        began = time.perf_counter()
        env = environment(args)
        result = runners[section](args, log_dir)
        env["loadavg_after"] = list(os.getloadavg())
        result["env"] = env
        result["section_s"] = time.perf_counter() - began
        store[section] = result
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(store, indent=1))
        md_path.write_text(report(store))
        timings[section] = result["section_s"]
        say(f"== {section} done in {timings[section]:.0f}s")
    say(report(store))
    say(f"wrote {md_path} and {json_path}; server logs in {log_dir}; section seconds: {timings}")


if __name__ == "__main__":
    main()
