"""What the app holds between requests: settings, metrics, and once loaded, the model and its engine.

`start` loads the model in a daemon thread (a hub download can take minutes, and /health
must answer 503 "loading" meanwhile; a daemon thread does not hold up an early Ctrl-C),
warms it up, starts the engine and only then marks the state ready.

A failure that the server cannot recover from (the model does not load, the engine's worker
died) ends the process under a server that handles SIGTERM (uvicorn), so that a supervisor
(Docker's restart policy, systemd, Kubernetes) restarts it; /health says "failed" meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from fastapi import Depends, HTTPException, Request, status

from sedd_core import LoadedModel, load
from sedd_core.engine import Engine
from sedd_core.fast_model import FastSEDD
from sedd_core.generation import generate
from sedd_core.loading import resolve_device

from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("sedd.server")


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    status: str = "loading"  # loading -> ok -> draining; or failed
    error: str | None = None
    lm: LoadedModel | None = None
    engine: Engine | None = None
    drain_task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        if self.status == "ok" and not engine_alive(self.engine):
            self.fail("the engine's worker thread stopped")
        return self.status == "ok"

    def fail(self, error: str) -> None:
        """Unrecoverable: report it on /health and, under a server that handles SIGTERM, shut down."""
        self.status, self.error = "failed", error
        handler = signal.getsignal(signal.SIGTERM)
        if handler in (signal.SIG_DFL, signal.SIG_IGN, None):  # in-process use (tests): only report
            log.error("%s", error)
            return
        log.critical("%s; shutting down so that the supervisor restarts the server", error)
        signal.raise_signal(signal.SIGTERM)


def engine_alive(engine: Engine | None) -> bool:
    """Whether the engine's worker thread still runs (True while there is no engine yet)."""
    return engine is None or engine.alive


async def run_in_daemon_thread(fn: Callable[[], Any]) -> Any:
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def target() -> None:
        def settle(result: Any = None, error: BaseException | None = None) -> None:
            if future.done():  # the awaiting task was cancelled (shutdown during the load)
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed over whole to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=target, name="sedd-load", daemon=True).start()
    return await future


def torch_threads(settings: Settings) -> int | None:
    """Intra-op threads for torch: the setting, else on CPU every core this process may run on.

    With every core in torch's pool the event loop still keeps its heartbeats within 53 ms under 64 streaming
    clients, and what stalled passes (other processes preempting a spinning OpenMP team) is handled by
    the server's OpenMP wait policy (app/openmp.py: spin about 20 us, then sleep): docs/benchmarks.md,
    "CPU, round two" and "CPU, round three"."""
    if settings.torch_threads is not None:
        return settings.torch_threads
    if resolve_device(settings.device).type != "cpu":
        return None
    return usable_cores()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a container's cpuset narrows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _load_and_warm(settings: Settings) -> LoadedModel:
    threads = torch_threads(settings)
    if threads is not None:
        torch.set_num_threads(threads)  # before the engine thread makes its first parallel call
    start = time.perf_counter()
    lm = load(settings.model, device=settings.device, dtype=settings.dtype, **settings.load_options())
    log.info("loaded %s (%s, %.1fM parameters) on %s as %s in %.1f s; %d torch threads", lm.name, lm.source,
             lm.parameters / 1e6, lm.device, str(lm.dtype).removeprefix("torch."), time.perf_counter() - start,
             torch.get_num_threads())
    if settings.warmup:
        start = time.perf_counter()
        generate(lm, num_samples=1, steps=1, seed=0)  # one predictor step and the final denoise
        log.info("warm-up generation took %.2f s", time.perf_counter() - start)
        _compile_up_front(lm, settings)
    return lm


def _compile_up_front(lm: LoadedModel, settings: Settings) -> None:
    """SEDD_COMPILE's graphs, compiled before /health answers 200. With `auto` a compilation that fails (a
    compiler without the Python headers, say) leaves the server running eagerly, with a warning; a
    compilation asked for by name fails the start."""
    try:
        timings = lm.runner.warm(settings.max_rows, lm.length)
    except Exception as exc:  # noqa: BLE001 - whatever Inductor or the C++ compiler raised
        if settings.compile != "auto":
            raise
        log.warning("SEDD_COMPILE=auto: compiling the network failed (%s: %s); running it eagerly",
                    exc.__class__.__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        lm.runner = FastSEDD(lm.model)
        return
    for rows, seconds in timings:
        what = ("one row" if rows == 1 else "two rows or more") if lm.runner.dynamic_rows else f"{rows} rows"
        log.info("compiled the network for %s x %d positions (%.1f s)", what, lm.length, seconds)


async def start(state: ServerState) -> None:
    settings = state.settings
    try:
        lm = await run_in_daemon_thread(lambda: _load_and_warm(settings))
    except Exception as exc:  # noqa: BLE001 - any load failure (bad folder, download, CUDA) is reported
        state.fail(f"the model {settings.model!r} could not be loaded: {exc.__class__.__name__}: {exc}")
        return
    state.lm = lm
    state.engine = Engine(lm, max_rows=settings.max_rows, max_queue=settings.max_queue,
                          observer=state.metrics).start()
    state.metrics.bind(state.engine)
    state.status = "ok"
    log.info("ready: max_rows %d, max_queue %d, max_steps %d, max_samples %d", settings.max_rows,
             settings.max_queue, settings.max_steps, settings.max_samples)


def begin_drain(state: ServerState) -> None:
    """Stop admitting now and give running and waiting requests SEDD_DRAIN_TIMEOUT_S; then the engine fails
    what is left: streams end with an `error` event, JSON requests get a 503. Called on the event loop when
    the server is told to stop (SIGTERM, SIGINT: see `drain_on_signals`), and by `stop`. Idempotent."""
    if state.engine is None or state.drain_task is not None:
        return
    if state.status == "ok":
        state.status = "draining"
    log.info("draining: waiting up to %g s for %d running rows and %d waiting requests",
             state.settings.drain_timeout_s, state.engine.running_rows, state.engine.queue_depth)
    state.drain_task = asyncio.get_running_loop().create_task(state.engine.drain(state.settings.drain_timeout_s))


def drain_on_signals(state: ServerState) -> None:
    """Start draining the moment SIGTERM or SIGINT arrives, then let the server's own handler run.

    uvicorn reaches the lifespan shutdown only after every open connection has closed (or its graceful
    timeout, 30 s under `sedd serve`, unbounded under plain uvicorn, has passed); draining from there
    would let streams run on past SEDD_DRAIN_TIMEOUT_S and then cut them without an `error` event.
    Chaining the server's handler keeps its behaviour (close the socket, wait for connections); it restores
    its own handlers when it exits. Only in the main thread, and only over a handler that is a function
    (in-process use, e.g. a TestClient, installs nothing)."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if not callable(previous) or previous is signal.default_int_handler:
            continue

        def handler(number, frame, previous=previous):
            loop.call_soon_threadsafe(begin_drain, state)
            previous(number, frame)

        signal.signal(signum, handler)


async def stop(state: ServerState) -> None:
    if state.engine is None:
        return
    begin_drain(state)
    await state.drain_task


# ---- dependencies (async: FastAPI would run plain functions in its thread pool) ----------------
async def get_state(request: Request) -> ServerState:
    return request.app.state.sedd


async def ready_state(request: Request) -> ServerState:
    """The state, or 503 while the model loads (or after it failed, or while shutting down)."""
    state: ServerState = request.app.state.sedd
    if state.ready:
        return state
    if state.status == "loading":
        detail, retry = "the model is still loading; retry when GET /health answers 200", "5"
    elif state.status == "draining":
        detail, retry = "the server is shutting down and accepts no new requests", "5"
    else:
        detail, retry = f"the server cannot serve: {state.error}", "60"
    raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=detail, headers={"Retry-After": retry})


AppState = Annotated[ServerState, Depends(get_state)]
ReadyState = Annotated[ServerState, Depends(ready_state)]
