"""Prometheus metrics on a registry of the app's own, fed by the engine through `EngineObserver`.

The engine calls `on_pass` and `on_request_end` from its worker thread; prometheus-client
metrics are thread-safe, and the recent-rate window has its own lock.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("ok", "cancelled", "error", "shutdown", "rejected")
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The server's metrics; implements sedd_core.engine.EngineObserver."""

    def __init__(self, rate_window_s: float = 10.0):
        self.registry = CollectorRegistry(auto_describe=True)
        self._engine = None
        self._rate_window_s = rate_window_s
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self._started = time.monotonic()
        r = self.registry
        self.queue_depth = Gauge("sedd_queue_depth", "Requests waiting for rows", registry=r)
        self.running_rows = Gauge("sedd_running_rows", "Rows (samples) in the running batch", registry=r)
        self.queue_depth.set_function(lambda: self._engine.queue_depth if self._engine is not None else 0)
        self.running_rows.set_function(lambda: self._engine.running_rows if self._engine is not None else 0)
        self.rows_per_pass = Histogram("sedd_rows_per_pass", "Rows in one model pass", buckets=ROW_BUCKETS,
                                       registry=r)
        self.step_seconds = Histogram("sedd_step_seconds", "Seconds of one model pass (one denoising step)",
                                      buckets=STEP_BUCKETS, registry=r)
        self.passes = Counter("sedd_passes", "Model passes run", registry=r)
        self.requests = Counter("sedd_requests", "Generation requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        self.request_seconds = Histogram("sedd_request_seconds", "Seconds from submission to the end of a request",
                                         buckets=REQUEST_BUCKETS, registry=r)
        self.tokens = Counter("sedd_tokens_generated", "Tokens of finished samples", registry=r)
        self.tokens_per_second = Gauge("sedd_tokens_per_second",
                                       f"Tokens of finished samples per second over the last {rate_window_s:g} s",
                                       registry=r)
        self.tokens_per_second.set_function(self._recent_rate)
        self.ready = Gauge("sedd_ready", "1 once the model is loaded and warmed up", registry=r)

    def bind(self, engine) -> None:
        """Read queue depth and running rows from `engine` at scrape time."""
        self._engine = engine
        self.ready.set(1)

    # ---- EngineObserver ---------------------------------------------------------------------
    def on_pass(self, rows: int, seconds: float, positions: int) -> None:
        self.rows_per_pass.observe(rows)
        self.step_seconds.observe(seconds)
        self.passes.inc()

    def on_request_end(self, outcome: str, samples: int, tokens: int, seconds: float) -> None:
        self.requests.labels(outcome=outcome).inc()
        self.request_seconds.observe(seconds)
        if outcome == "ok":
            self.tokens.inc(tokens)
            with self._lock:
                self._recent.append((time.monotonic(), tokens))

    def rejected(self) -> None:
        """A request turned away before it reached the engine (full queue, shutting down)."""
        self.requests.labels(outcome="rejected").inc()

    # ---- exposition ---------------------------------------------------------------------------
    def _recent_rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self._rate_window_s:
                self._recent.popleft()
            total = sum(tokens for _, tokens in self._recent)
        window = min(self._rate_window_s, max(now - self._started, 1e-3))
        return total / window

    def render(self) -> bytes:
        return generate_latest(self.registry)
