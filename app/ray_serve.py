"""The FastAPI app as a Ray Serve deployment: replicas, routing by queue length, autoscaling, restarts.

    sedd serve --ray --replicas 2 --model default        # a local Ray instance, stopped again on SIGTERM
    serve run deploy/ray/serve.yaml                       # an existing cluster (import_path: app.ray_serve:build_app)

Each replica builds the whole app with `create_app` (every endpoint, the web page, SSE and the API key
work unchanged through Ray's HTTP proxy), loads the model once, owns one device (`num_gpus: 1` on a GPU
host, a CPU slot otherwise) and runs its own batching engine. A replica takes traffic only once its
model is loaded and warmed up, and Ray's health check asks the model's readiness, so a replica whose
engine died is replaced. Needs the optional extra: `pip install 'sedd-serve[ray]'`.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from .main import create_app
from .settings import Settings

log = logging.getLogger("sedd.ray")

APP_NAME = "sedd"
DEPLOYMENT_NAME = "SEDD"
# Requests that need no rows (GET /health, /v1/model, /metrics, the web page) a full replica still answers.
CONTROL_REQUESTS = 8
QUEUE_FULL_RETRY_AFTER_S = 1  # as the replica's own 503 when its engine queue is full


def deployment_options(settings: Settings, *, replicas: int | None = None, min_replicas: int = 1,
                       max_replicas: int = 4, gpus: float = 0, cpus: float = 1) -> dict[str, Any]:
    """Ray Serve options derived from the server's limits.

    A replica admits `max_rows` running rows and `max_queue` waiting requests and answers 503 with
    Retry-After past that; `max_ongoing_requests` lets that many reach it (every request takes a row or
    waits), plus a few that take no rows (health, info), so Ray never holds back a request that the replica
    would have taken. When every replica is full, Ray's proxy holds `max_queue` more and then answers 503 with
    Retry-After itself. Autoscaling aims at `max_rows` ongoing requests per replica: one full model pass each.
    `replicas` fixes the count instead.
    """
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": settings.max_rows + settings.max_queue + CONTROL_REQUESTS,
        "max_queued_requests": max(1, settings.max_queue),
        "backpressure_config": {"status_code": 503, "retry_after_s": QUEUE_FULL_RETRY_AFTER_S},
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        # The replica drains (SEDD_DRAIN_TIMEOUT_S) before Ray stops it.
        "graceful_shutdown_timeout_s": settings.drain_timeout_s + 10,
    }
    if replicas is not None:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": settings.max_rows}
    return options


@serve.ingress()
class SEDDReplica:
    """One replica: one model, one engine, the whole FastAPI app. `settings` are Settings fields (e.g.
    {"model": "default", "max_rows": 16}) over the SEDD_* variables of the replica's environment."""

    def __init__(self, settings: dict[str, Any] | None = None):
        self.overrides = dict(settings or {})

    def __serve_build_asgi_app__(self) -> FastAPI:
        replica = serve.get_replica_context().replica_id.unique_id
        settings = Settings(**{"replica_id": replica, **self.overrides})
        app = create_app(settings)
        _serve_once_loaded(app)
        return app  # Ray's wrapper keeps it as `self.app`

    async def check_health(self) -> None:
        """Ray's health check: the model's readiness (a failed load or a dead engine worker fails it, and Ray
        replaces the replica). A draining replica is being stopped by Ray and is left alone."""
        state = self.app.state.sedd
        if not state.ready and state.status != "draining":
            raise RuntimeError(f"replica not ready: {state.status}: {state.error}")


SEDD = serve.deployment(name=DEPLOYMENT_NAME)(SEDDReplica)


def _serve_once_loaded(app: FastAPI) -> None:
    """Hold the app's lifespan startup (which Ray awaits before it routes to the replica) until the model is
    loaded and warmed up; a model that fails to load fails the replica's start, which Ray reports and retries."""
    lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def until_loaded(app: FastAPI):
        async with lifespan(app) as value:
            state = app.state.sedd
            while state.status == "loading":
                await asyncio.sleep(0.1)
            if state.status == "failed":
                raise RuntimeError(f"the replica cannot serve: {state.error}")
            yield value

    app.router.lifespan_context = until_loaded


def application(overrides: dict[str, Any] | None = None, **options: Any) -> Application:
    """The Serve application: SEDD with `deployment_options(Settings(**overrides), **options)`. The settings
    are validated here, so a bad value fails before any replica starts."""
    overrides = dict(overrides or {})
    settings = Settings(**overrides)
    return SEDD.options(**deployment_options(settings, **options)).bind(overrides)


def build_app(args: dict[str, Any]) -> Application:
    """Builder for `serve run` / `serve deploy` (`import_path: app.ray_serve:build_app`): `args` are Settings
    fields; a GPU per replica when `device` names CUDA. The config file's `deployments:` entry overrides the
    options derived from them."""
    gpus = 1 if str(args.get("device", "")).startswith("cuda") else 0
    return application(args, gpus=gpus)


# ---- a local Ray instance for `sedd serve --ray` -------------------------------------------------------
def replica_resources(settings: Settings, replicas: int, cores: int) -> tuple[float, float]:
    """(num_gpus, num_cpus) of one replica: a GPU each where the model runs on CUDA, else an equal share of
    the CPU cores (fractions allowed: two replicas on one core share it)."""
    from sedd_core.loading import resolve_device

    if resolve_device(settings.device).type == "cuda":
        return 1, 1
    return 0, cores / replicas


def start_local(overrides: dict[str, Any], *, replicas: int, host: str, port: int,
                num_cpus: int | None = None) -> None:
    """Start Ray on this machine (no dashboard, no usage report), Serve's proxy on host:port, and `replicas`
    replicas; returns once every replica has loaded its model."""
    init_local_ray(num_cpus)
    deploy_local(overrides, replicas=replicas, host=host, port=port)


def init_local_ray(num_cpus: int | None = None) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=num_cpus or _cores(), include_dashboard=False, configure_logging=False)


def deploy_local(overrides: dict[str, Any], *, replicas: int, host: str, port: int) -> None:
    import ray

    settings = Settings(**overrides)
    gpus, cpus = replica_resources(settings, replicas, int(ray.cluster_resources().get("CPU", 1)))
    if gpus == 0 and settings.torch_threads is None:  # the replicas split the cores instead of each taking all
        overrides = {**overrides, "torch_threads": max(1, math.floor(cpus))}
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(overrides, replicas=replicas, gpus=gpus, cpus=cpus), name=APP_NAME, route_prefix="/")


def stop_local() -> None:
    import ray

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def serve_local(overrides: dict[str, Any], *, replicas: int, host: str, port: int) -> int:
    """`sedd serve --ray`: run until SIGTERM or SIGINT, then stop the replicas (they drain) and Ray."""
    stop = threading.Event()
    serving = False

    def on_signal(signum, frame) -> None:
        stop.set()
        if not serving:  # still starting: interrupt the deployment
            raise KeyboardInterrupt

    try:
        init_local_ray()
        # After ray.init, which installs its own handlers (they abort the process).
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        deploy_local(overrides, replicas=replicas, host=host, port=port)
        serving = True
        print(f"sedd: serving on http://{host}:{port} with {replicas} Ray Serve replica(s); SIGTERM or Ctrl-C "
              "stops them", flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        log.info("stopping the replicas and Ray")
        stop_local()
    return 0
