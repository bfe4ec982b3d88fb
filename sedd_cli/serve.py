"""`sedd serve`: the HTTP server (app/) under uvicorn, or as Ray Serve replicas with --ray."""
from __future__ import annotations

from .errors import UsageError, require
from .options import add_model_args, flags_given


def wait_briefly_then_sleep() -> None:
    """The server's OpenMP wait policy (app/openmp.py: spin about 20 us, then sleep) unless the user set one.
    The runtime reads it when torch loads: `sedd` imports no torch before a command runs, and this is the
    first thing `sedd serve` does."""
    from app.openmp import openmp_wait_defaults

    openmp_wait_defaults()


def cmd_serve(args) -> int:
    wait_briefly_then_sleep()
    if args.ray:
        return serve_with_ray(args)
    if args.replicas is not None:
        raise UsageError("--replicas needs --ray (one server process serves one device; docs/scale-out.md)")

    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    settings = Settings(**flags_given(args))  # the flags over SEDD_* variables
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0


def serve_with_ray(args) -> int:
    """`sedd serve --ray --replicas N`: Ray Serve replicas on a local Ray instance (app/ray_serve.py)."""
    replicas = 1 if args.replicas is None else args.replicas
    if replicas < 1:
        raise UsageError(f"--replicas must be at least 1, got {replicas}")
    require("ray.serve", "sedd serve --ray")
    from app.ray_serve import serve_local

    overrides = flags_given(args) | {"log_level": args.log_level}
    return serve_local(overrides, replicas=replicas, host=args.host, port=args.port)


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="start the HTTP server (uvicorn)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument("--graceful-timeout", type=int, default=30, help="seconds to finish streams on shutdown")
    p.add_argument("--ray", action="store_true", help="serve through Ray Serve replicas on a local Ray instance "
                                                      "(needs 'sedd-serve[ray]'; docs/scale-out.md)")
    p.add_argument("--replicas", type=int, default=None, help="with --ray: replicas, each with its own model, engine "
                                                           "and device (default 1)")
    p.set_defaults(func=cmd_serve)
