"""The FastAPI application: OpenAI-compatible endpoints in front of the :class:`Scheduler`.

``/v1/completions`` and ``/v1/chat/completions`` (streamed as server-sent events or not), ``/v1/models``,
``/health`` and ``/metrics``. Every endpoint but ``/health`` asks for the API key when one is set. A
request's method comes from its ``"contextlab": {"method": ...}`` field, else the server's default; greedy
outputs equal :func:`contextlab.generate` on the same prompt (batched or alone).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from contextlab.engine.steps import check_window
from contextlab.hf.rope import native_window
from contextlab.methods.spec import build_method
from contextlab.serve.config import ServerConfig
from contextlab.serve.metrics import Metrics
from contextlab.serve.protocol import ApiError, GenerationRequest, chunk, parse_request, response, usage
from contextlab.serve.reuse import PrefixCache
from contextlab.serve.scheduler import Job, Outcome, Scheduler

POLL_SECONDS = 0.25  # how often a waiting non-streaming request checks that its client is still there


class Server:
    """The model, its scheduler and the checks every request goes through."""

    def __init__(self, config: ServerConfig, model, tokenizer) -> None:
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.metrics = Metrics()
        self.prefixes = PrefixCache(config.reuse_bytes)
        self.scheduler = Scheduler(
            model, tokenizer, self.metrics, config.max_queue, config.max_batch, config.batch_wait, self.prefixes
        )
        self.max_prompt = config.max_prompt_tokens or native_window(model.config) or 2**31
        build_method(config.method)  # a bad default method fails at start, not on the first request

    def authorize(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", "authentication_error")

    async def read_json(self, request: Request) -> object:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.config.max_body_bytes:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {self.config.max_body_bytes}")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > self.config.max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {self.config.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err})") from None

    def check_fits(self, req: GenerationRequest) -> None:
        longest = max(len(r) for r in req.rows)
        if longest > self.max_prompt:
            raise ApiError(
                413, f"the prompt has {longest} tokens; this server accepts at most {self.max_prompt}", param="prompt"
            )
        method = build_method(req.method)
        try:
            for row in req.rows:
                method.prompt_keep(len(row))
            check_window(self.model, method, longest + req.max_tokens, False, escape=None)
        except ValueError as err:
            raise ApiError(400, str(err), param="prompt") from None

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def create_app(config: ServerConfig, model=None, tokenizer=None) -> FastAPI:
    """The application serving ``model`` (loaded from ``config.model`` when not given)."""
    if model is None:
        from contextlab.loading import load

        model, tokenizer = load(config.model, device=config.device, trust_remote_code=config.trust_remote_code)
    server = Server(config, model, tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        yield
        server.scheduler.stop()

    app = FastAPI(title="contextlab", lifespan=lifespan)
    app.state.server = server

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return _guarded(server, request, "/v1/models", lambda: JSONResponse(_model_list(server)))

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        def render() -> Response:
            text = server.metrics.render(server.scheduler.queue_length, server.prefixes)
            return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

        return _guarded(server, request, "/metrics", render)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(server, request, "completion", "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _generate(server, request, "chat", "/v1/chat/completions")

    return app


def _model_list(server: Server) -> dict:
    return {
        "object": "list",
        "data": [{"id": server.config.served_name, "object": "model", "created": 0, "owned_by": "contextlab"}],
    }


def _guarded(server: Server, request: Request, endpoint: str, make) -> Response:
    try:
        server.authorize(request)
    except ApiError as err:
        return _error(server, endpoint, err)
    server.metrics.request_done(endpoint, 200)
    return make()


def _error(server: Server, endpoint: str, err: ApiError) -> JSONResponse:
    server.metrics.request_done(endpoint, err.status)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _generate(server: Server, request: Request, kind: str, endpoint: str) -> Response:
    began = time.perf_counter()
    try:
        server.authorize(request)
        body = await server.read_json(request)
        req = parse_request(kind, body, server.tokenizer, server.config)
        server.check_fits(req)
        job = Job(req, asyncio.get_running_loop())
        server.scheduler.submit(job)
    except ApiError as err:
        return _error(server, endpoint, err)
    if req.stream:
        return StreamingResponse(_events(server, job, endpoint, began), media_type="text/event-stream")
    outcome = await _wait(job, request)
    if outcome is None:  # the client left: nothing to answer
        server.metrics.request_done(endpoint, 499)
        return Response(status_code=499)
    if isinstance(outcome, ApiError):
        return _error(server, endpoint, outcome)
    prompt_tokens = sum(len(r) for r in req.rows)
    completion_tokens = sum(len(t) for t in outcome.tokens)
    server.metrics.tokens(prompt_tokens, completion_tokens)
    server.metrics.request_done(endpoint, 200, time.perf_counter() - began)
    body = response(
        req,
        server.config.served_name,
        [server.text(t) for t in outcome.tokens],
        outcome.reasons,
        usage(prompt_tokens, completion_tokens),
        _extension(req, outcome),
    )
    return JSONResponse(body)


def _extension(req: GenerationRequest, outcome: Outcome) -> dict:
    return {
        "method": req.method,
        "kv_bytes": outcome.kv_bytes,
        "kv_bytes_full": outcome.kv_bytes_full,
        "prefill_seconds": round(outcome.prefill_seconds, 6),
        "decode_seconds": round(outcome.decode_seconds, 6),
        "batch_rows": outcome.batch_rows,
        "reuse": outcome.reuse,
        "prefix_tokens": req.prefix,
    }


async def _wait(job: Job, request: Request) -> Outcome | ApiError | None:
    """The job's outcome; None when the client disconnects first (the job is then cancelled)."""
    pending = asyncio.ensure_future(job.events.get())
    while True:
        done, _ = await asyncio.wait({pending}, timeout=POLL_SECONDS)
        if done:
            kind, payload = pending.result()
            if kind in ("done", "error"):
                return payload
            pending = asyncio.ensure_future(job.events.get())
            continue
        if await request.is_disconnected():
            job.cancelled.set()
            pending.cancel()
            return None


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _events(server: Server, job: Job, endpoint: str, began: float) -> AsyncIterator[str]:
    """Server-sent events: one chunk per decoded piece of text, the finish reasons, then ``[DONE]``. Text is
    sent once it decodes cleanly (a multi-byte character split over tokens waits for its last token)."""
    req, served = job.request, server.config.served_name
    rows = len(req.rows)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    sent, first, finished, timed = [""] * rows, [True] * rows, False, False
    try:
        while True:
            kind, payload = await job.events.get()
            if kind == "tokens":
                for i, token in enumerate(payload):
                    if token < 0 or len(tokens[i]) >= req.max_tokens:
                        continue
                    tokens[i].append(token)
                    text = server.text(tokens[i])
                    if text.endswith("\ufffd") or not text.startswith(sent[i]) or text == sent[i]:
                        continue
                    if not timed:
                        server.metrics.first_token(endpoint, time.perf_counter() - began)
                        timed = True
                    yield _sse(chunk(req, served, i, text[len(sent[i]) :], None, first[i]))
                    sent[i], first[i] = text, False
            elif kind == "done":
                for i, row_tokens in enumerate(payload.tokens):
                    text = server.text(row_tokens)
                    rest = text[len(sent[i]) :] if text.startswith(sent[i]) else ""
                    yield _sse(chunk(req, served, i, rest, payload.reasons[i], first[i]))
                server.metrics.tokens(sum(len(r) for r in req.rows), sum(len(t) for t in payload.tokens))
                server.metrics.request_done(endpoint, 200, time.perf_counter() - began)
                yield _sse("[DONE]")
                finished = True
                return
            else:
                server.metrics.request_done(endpoint, payload.status)
                yield _sse(payload.body())
                yield _sse("[DONE]")
                finished = True
                return
    finally:
        if not finished:  # the client went away mid-stream
            job.cancelled.set()
            server.metrics.request_done(endpoint, 499)
