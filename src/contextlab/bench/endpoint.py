"""Benchmark rows from any OpenAI-compatible server (contextlab's own, vLLM, SGLang) instead of a local model.

The prompts are the same samples a local run builds, tokenized by the tokenizer the run names, and sent as
token ids to ``/v1/completions`` (greedy: temperature 0), so every server sees exactly the tokens a local
run feeds its model. A method other than ``full`` is sent in contextlab's extension field
(``"contextlab": {"method": ...}``; only a contextlab server applies it). A batch's samples are sent
concurrently, so a batching server batches them.

Shared-context tasks send each turn as its own request, the context repeated and marked as a shared prefix
(``"contextlab": {"prefix_tokens": ...}``): a contextlab server compresses the context once, without the
question, and answers every turn from a copy of it, which is what a local run does with
``--context-only-compression --shared-mode requests``.

Costs: a contextlab server reports its KV bytes and prefill/decode seconds; other servers report none, so
those rows hold 0 bytes and the request's wall latency as ``decode_seconds``.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from contextlab.errors import ContextlabError

API_KEY_ENV = "CONTEXTLAB_ENDPOINT_KEY"


class EndpointError(ContextlabError):
    """The endpoint cannot be reached, does not serve the model, or refused a request."""


@dataclass(frozen=True)
class Answer:
    text: str
    completion_tokens: int
    latency: float  # client-side wall seconds of the request
    extension: dict | None  # the "contextlab" field of a contextlab server's response


class EndpointClient:
    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        try:
            import httpx
        except ImportError:
            raise EndpointError("endpoint runs need httpx: pip install 'contextlab[serve]'") from None
        self.url, self.model = url.rstrip("/"), model
        key = api_key or os.environ.get(API_KEY_ENV)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout)
        self.transport_errors = (httpx.TransportError,)

    def check(self) -> dict:
        """The endpoint's entry for the model (``/models``); an error naming what it serves otherwise."""
        reply = self._call("GET", "/models")
        served = [m.get("id") for m in reply.get("data", []) if isinstance(m, dict)]
        if self.model not in served:
            raise EndpointError(f"{self.url} does not serve model {self.model!r}; it serves {served}")
        return next(m for m in reply["data"] if m.get("id") == self.model)

    def complete(self, prompt: list[int], max_tokens: int, method: str, prefix: int = 0) -> Answer:
        body: dict = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        ext = {"method": method} if method != "full" else {}
        if prefix:
            ext["prefix_tokens"] = prefix
        if ext:
            body["contextlab"] = ext
        start = time.perf_counter()
        reply = self._call("POST", "/completions", body)
        latency = time.perf_counter() - start
        choice = reply["choices"][0]
        used = (reply.get("usage") or {}).get("completion_tokens", 0)
        return Answer(choice.get("text", ""), int(used or 0), latency, reply.get("contextlab"))

    def complete_all(
        self, prompts: list[list[int]], max_tokens: int, method: str, prefixes: list[int] | None = None
    ) -> list[Answer]:
        """Every prompt at once (one request each, sent concurrently); ``prefixes``: each prompt's shared
        prefix length (0: none)."""
        prefixes = prefixes or [0] * len(prompts)
        with ThreadPoolExecutor(max(1, len(prompts))) as pool:
            return list(pool.map(lambda p, k: self.complete(p, max_tokens, method, k), prompts, prefixes))

    def close(self) -> None:
        self.http.close()

    def _call(self, verb: str, path: str, body: dict | None = None) -> dict:
        try:
            reply = self.http.request(verb, self.url + path, json=body)
        except self.transport_errors as err:
            raise EndpointError(f"cannot reach {self.url}{path} ({type(err).__name__}: {err})") from None
        if reply.status_code != 200:
            raise EndpointError(f"{self.url}{path} answered {reply.status_code}: {_message(reply)}")
        try:
            return reply.json()
        except ValueError:
            raise EndpointError(f"{self.url}{path} answered with something that is not JSON") from None


def _message(reply) -> str:
    try:
        error = reply.json().get("error")
        return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return reply.text[:300]
