"""Counters, gauges and latency histograms of the server, written in Prometheus' text format (``/metrics``)."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect_left(self.buckets, value)
        if i < len(self.buckets):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{{labels}le="{bound}"}} {running}')
        out += [
            f'{name}_bucket{{{labels}le="+Inf"}} {self.count}',
            f"{name}_sum{{{labels.rstrip(',')}}} {self.sum:.6f}",
            f"{name}_count{{{labels.rstrip(',')}}} {self.count}",
        ]
        return out


class Metrics:
    """Thread-safe: handlers (event loop) and the worker thread both write."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = self.completion_tokens = self.batches = self.batch_rows = 0
        self.kv_bytes_held = 0
        self.latency: dict[str, Histogram] = {}
        self.ttft: dict[str, Histogram] = {}

    def request_done(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1
            if seconds is not None:
                self.latency.setdefault(endpoint, Histogram()).observe(seconds)

    def first_token(self, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.ttft.setdefault(endpoint, Histogram()).observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def batch_done(self, rows: int, kv_bytes: int, seconds: float) -> None:
        with self.lock:
            self.batches += 1
            self.batch_rows += rows
            self.kv_bytes_held = kv_bytes  # the cache of the last batch (freed after it; reuse caches add later)

    def render(self, queue_length: int, prefixes=None) -> str:
        reuse = (
            []
            if prefixes is None
            else [
                "# HELP contextlab_reuse_total Shared-prefix lookups, by outcome.",
                "# TYPE contextlab_reuse_total counter",
                f'contextlab_reuse_total{{outcome="hit"}} {prefixes.hits}',
                f'contextlab_reuse_total{{outcome="miss"}} {prefixes.misses}',
                "# TYPE contextlab_reuse_evictions_total counter",
                f"contextlab_reuse_evictions_total {prefixes.evictions}",
                "# HELP contextlab_reuse_bytes KV bytes of the compressed prefixes kept for reuse.",
                "# TYPE contextlab_reuse_bytes gauge",
                f"contextlab_reuse_bytes {prefixes.nbytes}",
                "# TYPE contextlab_reuse_entries gauge",
                f"contextlab_reuse_entries {len(prefixes.entries)}",
            ]
        )
        with self.lock:
            lines = [
                "# HELP contextlab_requests_total Requests answered, by endpoint and HTTP status.",
                "# TYPE contextlab_requests_total counter",
                *(
                    f'contextlab_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())
                ),
                "# TYPE contextlab_prompt_tokens_total counter",
                f"contextlab_prompt_tokens_total {self.prompt_tokens}",
                "# TYPE contextlab_completion_tokens_total counter",
                f"contextlab_completion_tokens_total {self.completion_tokens}",
                "# TYPE contextlab_batches_total counter",
                f"contextlab_batches_total {self.batches}",
                "# TYPE contextlab_batch_rows_total counter",
                f"contextlab_batch_rows_total {self.batch_rows}",
                "# HELP contextlab_kv_bytes_held KV-cache bytes of the last batch, as its method keeps them.",
                "# TYPE contextlab_kv_bytes_held gauge",
                f"contextlab_kv_bytes_held {self.kv_bytes_held}",
                "# TYPE contextlab_queue_length gauge",
                f"contextlab_queue_length {queue_length}",
                "# HELP contextlab_request_seconds Request latency (arrival to last byte), by endpoint.",
                "# TYPE contextlab_request_seconds histogram",
            ]
            for endpoint, hist in sorted(self.latency.items()):
                lines += hist.lines("contextlab_request_seconds", f'endpoint="{endpoint}",')
            lines += [
                "# HELP contextlab_time_to_first_token_seconds Arrival to first streamed token, by endpoint.",
                "# TYPE contextlab_time_to_first_token_seconds histogram",
            ]
            for endpoint, hist in sorted(self.ttft.items()):
                lines += hist.lines("contextlab_time_to_first_token_seconds", f'endpoint="{endpoint}",')
        return "\n".join(lines + reuse) + "\n"
