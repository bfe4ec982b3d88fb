"""Continuous batching at the denoising-step level. No HTTP here.

A request is data: a `Job` (tokens, fixed positions, its own time grid, predictor
and generator) plus how often it wants progress. One worker thread owns the
device. Between two steps it retires finished and cancelled requests and admits
waiting ones while the rows fit `max_rows`; then it runs ONE model pass per
distinct sequence length over every running row, each row at its own t.

Rows of different lengths are grouped by length rather than padded into one
pass: most traffic uses the model's full length, grouped passes stay dense (no
padded FLOPs, no attention mask that would push SDPA off its fast kernels), and a
row's result never depends on its neighbours' lengths.

Callers get an async iterator of events: `step` every `stream_every` steps, then
`done` (or `error`). A failure in a pass fails only the requests of that pass;
a CUDA out-of-memory error is retried request by request before anything fails.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .generation import decode_rows, token_pieces
from .loading import LoadedModel
from .sampling import Job, denoising_step

log = logging.getLogger("sedd.engine")


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; retry later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and admits no new requests."""


@dataclass
class Event:
    """`step`: progress; `done`: the final texts; `error`: what went wrong (`error`, a sentence) and why it
    ended (`outcome`: "error" for a failed pass, "shutdown" when the engine stopped first). JSON-ready."""

    type: str
    data: dict[str, Any]


class EngineObserver(Protocol):
    def on_pass(self, rows: int, seconds: float, positions: int) -> None: ...

    def on_request_end(self, outcome: str, samples: int, tokens: int, seconds: float) -> None:
        """`tokens`: positions the request generated (its prompt excluded)."""


@dataclass(eq=False)  # a request is an identity: field-wise == would compare token tensors
class Request:
    job: Job
    stream_every: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    id: int
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_event: float | None = None
    pieces: bool = False  # per-position strings in step events, for displays
    cancelled: bool = False
    finished: bool = False

    def cancel(self) -> None:
        """Leave the batch before the next step (safe from any thread)."""
        self.cancelled = True

    async def events(self):
        while True:
            event = await self.queue.get()
            yield event
            if event.type in ("done", "error"):
                return


class Engine:
    def __init__(self, lm: LoadedModel, *, max_rows: int = 32, max_queue: int = 64,
                 observer: EngineObserver | None = None):
        self.lm = lm
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.observer = observer
        self.fault_injector: Callable[[Sequence[Job]], None] | None = None  # tests raise from here
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closing = False
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="sedd-engine", daemon=True)
        self.passes = 0

    # ---- public API (event-loop side) -------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        return sum(r.job.rows for r in self._running)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (False before start() and after a crash or stop())."""
        return self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return not self._closing

    def submit(self, job: Job, stream_every: int = 1, pieces: bool = False) -> Request:
        if job.rows > self.max_rows:
            raise ValueError(f"a request may have at most {self.max_rows} samples (rows per pass); got {job.rows}")
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down and accepts no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the limit); retry shortly")
            request = Request(job=job, stream_every=max(1, stream_every), loop=loop, queue=asyncio.Queue(),
                              id=next(self._ids), pieces=pieces)
            self._waiting.append(request)
            self._cond.notify()
        return request

    async def drain(self, timeout: float) -> None:
        """Stop admitting; let running and waiting requests finish for up to `timeout` s, then fail the rest."""
        with self._cond:
            self._closing = True
        deadline = time.monotonic() + timeout
        while (self._waiting or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.stop()

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        for request in list(self._waiting) + self._running:
            self._fail(request, "the server shut down before this request finished", "shutdown")
        self._waiting.clear()
        self._running.clear()

    # ---- worker thread ------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopped and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopped:
                    return
                self._retire_cancelled()
                self._admit()
            if self._running:
                self._step()

    def _retire_cancelled(self) -> None:
        for request in [r for r in self._running if r.cancelled]:
            self._running.remove(request)
            self._end(request, "cancelled")
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._end(request, "cancelled")

    def _admit(self) -> None:
        rows = self.running_rows
        while self._waiting and rows + self._waiting[0].job.rows <= self.max_rows:
            request = self._waiting.popleft()
            request.started = time.perf_counter()
            self._running.append(request)
            rows += request.job.rows

    def _step(self) -> None:
        by_length: dict[int, list[Request]] = {}
        for request in self._running:
            by_length.setdefault(request.job.length, []).append(request)
        for group in by_length.values():
            self._run_pass(group)
        for request in list(self._running):
            if request.finished:
                self._running.remove(request)
            elif request.job.done:
                self._running.remove(request)
                self._finish(request)
            elif request.job.step_index % request.stream_every == 0:
                self._emit_step(request)

    def _run_pass(self, group: list[Request]) -> None:
        jobs = [r.job for r in group]
        start = time.perf_counter()
        try:
            if self.fault_injector is not None:
                self.fault_injector(jobs)
            positions = denoising_step(self.lm.runner, self.lm.graph, self.lm.noise, jobs)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(group) > 1:
                log.warning("out of GPU memory on a pass of %d requests; retrying them one by one", len(group))
                for request in group:
                    self._run_pass([request])
            else:
                self._fail(group[0], "out of GPU memory for this request; ask for fewer samples or a shorter length",
                           "error")
            return
        except Exception as exc:  # contained: only this pass's requests fail
            log.exception("denoising pass failed")
            for request in group:
                self._fail(request, f"generation failed: {exc.__class__.__name__}: {exc}", "error")
            return
        self.passes += 1
        if self.observer is not None:
            self.observer.on_pass(sum(j.rows for j in jobs), time.perf_counter() - start, positions)

    # ---- events -------------------------------------------------------------------------
    def _send(self, request: Request, event: Event) -> None:
        if request.first_event is None:
            request.first_event = time.perf_counter()
        try:
            request.loop.call_soon_threadsafe(request.queue.put_nowait, event)
        except RuntimeError:  # the caller's loop is gone
            request.cancelled = True

    def _emit_step(self, request: Request) -> None:
        job = request.job
        mask_id = self.lm.mask_id
        masks_left = (job.x == mask_id).sum(dim=1).tolist() if mask_id is not None else [0] * job.rows
        texts = decode_rows(self.lm, job.x, placeholder=True)
        samples = [{"text": text, "masks_left": left} for text, left in zip(texts, masks_left)]
        data = {"step": job.step_index, "steps": job.steps, "t": job.current_t(), "samples": samples}
        if request.pieces:
            for sample, row in zip(samples, job.x.tolist()):
                sample["pieces"] = token_pieces(self.lm, row)
            data.update(prefix_tokens=job.prefix_len, suffix_tokens=job.suffix_len)
        self._send(request, Event("step", data))

    def _finish(self, request: Request) -> None:
        job = request.job
        now = time.perf_counter()
        texts = decode_rows(self.lm, job.x)
        self._send(request, Event("done", {
            "samples": [{"text": text} for text in texts],
            "tokens": job.x.tolist(),
            "timing": {"queued_s": round(request.started - request.submitted, 4),
                       "run_s": round(now - request.started, 4), "total_s": round(now - request.submitted, 4)},
        }))
        request.finished = True
        self._end(request, "ok")

    def _fail(self, request: Request, message: str, outcome: str) -> None:
        if request.finished:
            return
        self._send(request, Event("error", {"error": message, "outcome": outcome}))
        request.finished = True
        self._end(request, outcome)

    def _end(self, request: Request, outcome: str) -> None:
        request.finished = True
        if self.observer is not None:
            seconds = time.perf_counter() - request.submitted
            job = request.job
            generated = job.rows * (job.length - job.prefix_len - job.suffix_len)
            self.observer.on_request_end(outcome, job.rows, generated, seconds)
