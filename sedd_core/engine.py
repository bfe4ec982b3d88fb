"""Continuous batching at the denoising-step level. No HTTP, no text here.

A request is data: a `Job` (tokens, fixed positions, its own time grid, predictor
and generator) plus how often it wants progress. One worker thread owns the
device. Between two steps it retires finished and cancelled requests and admits
waiting ones while the rows fit `max_rows`; then it runs ONE model pass per
distinct sequence length over every running row, each row at its own t.

Rows of different lengths are grouped by length rather than padded into one
pass: most traffic uses the model's full length, grouped passes stay dense (no
padded FLOPs, no attention mask that would push SDPA off its fast kernels), and a
row's result never depends on its neighbours' lengths.

The engine emits typed records of token ids, never text (decoding and response
shapes belong to the caller, off the device thread): a `StepOutput` every
`stream_every` steps, then one `FinalOutput` or `ErrorOutput`. A failure in a pass
fails only the requests of that pass; a CUDA out-of-memory error is retried
request by request before anything fails.

Device work other than sampling (likelihood scoring) comes as a `ChunkedWork` item
(`submit_work`): after each round of passes the worker computes one bounded chunk of
the oldest item, so sampling keeps flowing, and sends one `WorkOutput` when it is done.
Work items share the queue limit.
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
from typing import Literal, Protocol

import torch

from .loading import LoadedModel
from .sampling import Job, denoising_step

log = logging.getLogger("sedd.engine")


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; retry later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and admits no new requests."""


@dataclass(frozen=True)
class StepOutput:
    """Progress of one submission after `step` of its `steps` predictor steps."""

    request_id: int
    step: int
    steps: int
    t: float  # diffusion time reached
    tokens: torch.Tensor  # long (rows, length) on the CPU: the canvas, masks included
    masks_left: tuple[int, ...]  # per row, positions still masked (always 0 under the uniform graph)


@dataclass(frozen=True)
class Durations:
    """How long a submission waited and ran, in seconds."""

    queued_s: float  # submission to admission
    run_s: float  # admission to the last step
    total_s: float  # submission to the last step


@dataclass(frozen=True)
class FinalOutput:
    """The finished canvas of one submission."""

    request_id: int
    tokens: torch.Tensor  # long (rows, length) on the CPU
    timing: Durations


Outcome = Literal["error", "shutdown", "cancelled"]


@dataclass(frozen=True)
class ErrorOutput:
    """Why a submission ended without a result: `error` (its pass failed), `shutdown` (the engine stopped
    first) or `cancelled` (its reader cancelled it)."""

    request_id: int
    message: str
    outcome: Outcome


@dataclass(frozen=True)
class WorkOutput:
    """A finished work item (e.g. scoring): its results are read off the device thread."""

    request_id: int
    work: ChunkedWork
    timing: Durations


EngineOutput = StepOutput | FinalOutput | ErrorOutput | WorkOutput


class ChunkedWork(Protocol):
    """Device work other than sampling, done a bounded chunk at a time between denoising steps
    (`sedd_core.evaluate.TextScores` is one)."""

    @property
    def done(self) -> bool: ...

    def step(self, model, graph, noise, max_rows: int) -> int:
        """Compute the next chunk of at most `max_rows` rows; returns how many."""


class EngineObserver(Protocol):
    def on_pass(self, rows: int, seconds: float, positions: int) -> None: ...

    def on_request_end(self, outcome: str, samples: int, tokens: int, seconds: float) -> None:
        """`tokens`: positions the request generated (its fixed positions excluded)."""


@dataclass(eq=False)  # a submission is an identity: field-wise == would compare token tensors
class Submission:
    """One job in the engine, as its reader sees it: records arrive on `outputs`, the last one final."""

    job: Job
    stream_every: int
    loop: asyncio.AbstractEventLoop
    id: int
    outputs: asyncio.Queue[EngineOutput] = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    cancelled: bool = False
    finished: bool = False

    def cancel(self) -> None:
        """Leave the batch (or the work queue) before the next step (safe from any thread)."""
        self.cancelled = True

    def durations(self) -> Durations:
        """Up to now, of a submission that has started."""
        now = time.perf_counter()
        return Durations(queued_s=self.started - self.submitted, run_s=now - self.started,
                         total_s=now - self.submitted)

    async def next_outputs(self) -> list[EngineOutput]:
        """Every record that has arrived, in order; waits for the first."""
        records = [await self.outputs.get()]
        while not self.outputs.empty():
            records.append(self.outputs.get_nowait())
        return records


@dataclass(eq=False)
class WorkSubmission(Submission):
    """A work item in the engine: `chunk_rows` rows of it run after each round of denoising passes; one
    `WorkOutput` or `ErrorOutput` arrives on `outputs`."""

    work: ChunkedWork | None = None
    chunk_rows: int = 1


class Engine:
    def __init__(self, lm: LoadedModel, *, max_rows: int = 32, max_queue: int = 64,
                 observer: EngineObserver | None = None):
        self.lm = lm
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.observer = observer
        self.fault_injector: Callable[[Sequence[Job]], None] | None = None  # tests raise from here
        self._waiting: deque[Submission] = deque()
        self._running: list[Submission] = []
        self._work: deque[WorkSubmission] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closing = False
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="sedd-engine", daemon=True)

    # ---- public API (event-loop side) -------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def queue_depth(self) -> int:
        """Requests not yet running: sampling waiting for rows, and work items (the one in progress too)."""
        return len(self._waiting) + len(self._work)

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

    def submit(self, job: Job, stream_every: int = 1) -> Submission:
        """Queue `job`; its reader gets a `StepOutput` every `stream_every` steps (none when that exceeds the
        job's steps), then one `FinalOutput` or `ErrorOutput`."""
        if job.rows > self.max_rows:
            raise ValueError(f"a request may have at most {self.max_rows} samples (rows per pass); got {job.rows}")
        loop = asyncio.get_running_loop()
        return self._enqueue(self._waiting, lambda: Submission(job=job, stream_every=max(1, stream_every), loop=loop,
                                                               id=next(self._ids)))

    def submit_work(self, work: ChunkedWork, chunk_rows: int) -> WorkSubmission:
        """Queue a work item; it runs on the worker thread `chunk_rows` rows at a time, one chunk after each
        round of denoising passes (so sampling keeps flowing), oldest item first. It shares the queue limit."""
        loop = asyncio.get_running_loop()
        return self._enqueue(self._work, lambda: WorkSubmission(job=None, stream_every=1, loop=loop, id=next(self._ids),
                                                                work=work, chunk_rows=max(1, int(chunk_rows))))

    def _enqueue(self, queue: deque, make: Callable[[], Submission]) -> Submission:
        """Refused while shutting down or at the queue limit; else the new submission joins `queue`."""
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down and accepts no new requests")
            if self.queue_depth >= self.max_queue:
                raise QueueFull(f"{self.queue_depth} requests are waiting (the limit); retry shortly")
            submission = make()
            queue.append(submission)
            self._cond.notify()
        return submission

    async def drain(self, timeout: float) -> None:
        """Stop admitting; let running and waiting requests finish for up to `timeout` s, then fail the rest."""
        with self._cond:
            self._closing = True
        deadline = time.monotonic() + timeout
        while (self._waiting or self._running or self._work) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.stop()

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        for submission in list(self._waiting) + self._running + list(self._work):
            self._fail(submission, "the server shut down before this request finished", "shutdown")
        self._waiting.clear()
        self._running.clear()
        self._work.clear()

    # ---- worker thread ------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopped and not self._waiting and not self._running and not self._work:
                    self._cond.wait()
                if self._stopped:
                    return
                self._retire_cancelled()
                self._admit()
            if self._running:
                self._step()
            if self._work:
                self._work_chunk()

    def _retire_cancelled(self) -> None:
        for queue in (self._running, self._waiting, self._work):
            for submission in [r for r in queue if r.cancelled]:
                queue.remove(submission)
                self._fail(submission, "the request was cancelled", "cancelled")

    def _admit(self) -> None:
        rows = self.running_rows
        while self._waiting and rows + self._waiting[0].job.rows <= self.max_rows:
            submission = self._waiting.popleft()
            submission.started = time.perf_counter()
            self._running.append(submission)
            rows += submission.job.rows

    def _step(self) -> None:
        by_length: dict[int, list[Submission]] = {}
        for submission in self._running:
            by_length.setdefault(submission.job.length, []).append(submission)
        for group in by_length.values():
            self._run_pass(group)
        for submission in list(self._running):
            if submission.finished:
                self._running.remove(submission)
            elif submission.job.done:
                self._running.remove(submission)
                self._finish(submission)
            elif submission.job.step_index % submission.stream_every == 0:
                self._emit_step(submission)

    def _run_pass(self, group: list[Submission]) -> None:
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
                for submission in group:
                    self._run_pass([submission])
            else:
                self._fail(group[0], "out of GPU memory for this request; ask for fewer samples or a shorter length",
                           "error")
            return
        except Exception as exc:  # contained: only this pass's requests fail
            log.exception("denoising pass failed")
            for submission in group:
                self._fail(submission, f"generation failed: {exc.__class__.__name__}: {exc}", "error")
            return
        if self.observer is not None:
            self.observer.on_pass(sum(j.rows for j in jobs), time.perf_counter() - start, positions)

    def _work_chunk(self) -> None:
        """One chunk of the oldest work item; it leaves the queue when done or failed."""
        submission = self._work[0]
        if submission.started is None:
            submission.started = time.perf_counter()
        try:
            submission.work.step(self.lm.runner, self.lm.graph, self.lm.noise, submission.chunk_rows)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            self._work.popleft()
            self._fail(submission, "out of GPU memory for this request; ask for fewer samples or shorter texts", "error")
            return
        except Exception as exc:  # contained: only this item fails
            log.exception("work item failed")
            self._work.popleft()
            self._fail(submission, f"the request failed: {exc.__class__.__name__}: {exc}", "error")
            return
        if submission.work.done:
            self._work.popleft()
            self._send(submission, WorkOutput(submission.id, submission.work, submission.durations()))
            self._end(submission, "ok")

    # ---- records ------------------------------------------------------------------------
    def _send(self, submission: Submission, record: EngineOutput) -> None:
        try:
            submission.loop.call_soon_threadsafe(submission.outputs.put_nowait, record)
        except RuntimeError:  # the reader's loop is gone
            submission.cancelled = True

    def _emit_step(self, submission: Submission) -> None:
        job = submission.job
        self._send(submission, StepOutput(submission.id, job.step_index, job.steps, job.current_t(), _on_cpu(job.x),
                                       tuple(job.masks_left.tolist())))

    def _finish(self, submission: Submission) -> None:
        self._send(submission, FinalOutput(submission.id, _on_cpu(submission.job.x), submission.durations()))
        self._end(submission, "ok")

    def _fail(self, submission: Submission, message: str, outcome: Outcome) -> None:
        if submission.finished:
            return
        self._send(submission, ErrorOutput(submission.id, message, outcome))
        self._end(submission, outcome)

    def _end(self, submission: Submission, outcome: str) -> None:
        submission.finished = True
        if self.observer is not None:
            seconds = time.perf_counter() - submission.submitted
            job = submission.job
            if job is None:  # a work item: no samples, no generated tokens
                self.observer.on_request_end(outcome, 0, 0, seconds)
                return
            fixed = int(job.fixed.sum()) if job.fixed is not None else 0
            self.observer.on_request_end(outcome, job.rows, job.rows * (job.length - fixed), seconds)


def _on_cpu(x: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the canvas that no later step writes to."""
    return x.to("cpu", copy=True)
