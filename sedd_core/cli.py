"""The `sedd` command: sample, infill, info, serve, train, data, bench.

With app/settings.py, the only reader of SEDD_* environment variables: it turns them into arguments of
the library (`load_options`) or into the server's `Settings`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tqdm import tqdm

from .fast_model import compile_mode
from .sampling import PREDICTORS


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="folder, 'default', oxen:NAMESPACE/REPO or hf:REPO_ID "
                                                  "(default: $SEDD_MODEL or the shipped character model)")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: auto)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on CUDA, fp32 on CPU)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--steps", type=int, default=128, help="denoising steps (default 128)")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw (default 1)")
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default: the model's length)")
    p.add_argument("--predictor", choices=PREDICTORS, default="analytic")
    p.add_argument("--seed", type=int, default=None, help="seed for a reproducible result")
    p.add_argument("--show-intermediate", action="store_true", help="print the text after every step (stderr)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample per line on stdout")


def _model_source(args) -> str:
    return args.model or os.environ.get("SEDD_MODEL") or "default"


def _switch(value: str | None) -> bool | str:
    """SEDD_ALLOW_PICKLE: 1/true/yes on, unset/0/false/no off, any other text as given."""
    lowered = (value or "").strip().lower()
    if lowered in ("", "0", "false", "no", "off"):
        return False
    return True if lowered in ("1", "true", "yes", "on") else value.strip()


def load_options() -> dict:
    """Keyword arguments of `sedd_core.load` from SEDD_ALLOW_PICKLE, SEDD_CACHE, SEDD_GPT2_VOCAB,
    SEDD_OXEN_HOST and SEDD_COMPILE (what the server reads through its Settings)."""
    env = os.environ
    return {"allow_pickle": _switch(env.get("SEDD_ALLOW_PICKLE")) is True, "cache_dir": env.get("SEDD_CACHE") or None,
            "gpt2_vocab": env.get("SEDD_GPT2_VOCAB") or None, "oxen_host": env.get("SEDD_OXEN_HOST") or None,
            "compile": compile_mode(env.get("SEDD_COMPILE"))}


def load_model(args):
    """The model named by --model (or SEDD_MODEL), on --device as --dtype, with the SEDD_* load options."""
    from .loading import load

    return load(_model_source(args), device=args.device, dtype=args.dtype, **load_options())


def _run_generation(args, prefix: str = "", suffix: str = "", segments: list | None = None) -> int:
    from . import generation as gen

    lm = load_model(args)
    seed = gen.new_seed() if args.seed is None else args.seed
    job = gen.make_job(lm, num_samples=args.num_samples, steps=args.steps, length=args.length,
                       predictor=args.predictor, seed=seed, prefix=prefix, suffix=suffix, segments=segments)
    start = time.perf_counter()
    with tqdm(total=args.steps + 1, desc="denoising", unit="step", file=sys.stderr) as bar:
        for state in gen.iterate(lm, job):
            bar.update(1)
            if args.show_intermediate:
                for i, text in enumerate(gen.decode_rows(lm, state.x, placeholder=True)):
                    bar.write(f"[step {state.step_index}/{args.steps + 1} sample {i}] {text!r}", file=sys.stderr)
    elapsed = time.perf_counter() - start
    texts = gen.decode_rows(lm, job.x)
    for i, text in enumerate(texts):
        if args.json:
            print(json.dumps({"index": i, "text": text, "seed": seed, "steps": args.steps,
                              "predictor": args.predictor, "model": lm.name}), flush=True)
        else:
            print(f"--- sample {i} (seed {seed}) ---\n{text}", flush=True)
    print(f"{len(texts)} sample(s) in {elapsed:.2f} s on {lm.device}", file=sys.stderr)
    return 0


def cmd_sample(args) -> int:
    return _run_generation(args)


def cmd_infill(args) -> int:
    segments = None
    if args.segments is not None:
        from .generation import GenerationError

        try:
            segments = json.loads(args.segments)
        except json.JSONDecodeError as exc:
            raise GenerationError(f"--segments is not valid JSON ({exc.msg} at character {exc.pos}); write a "
                                  "list such as '[\"ROMEO. \", 40, \".\\n\"]'") from None
        if not isinstance(segments, list):
            raise GenerationError(f"--segments must be a JSON list of strings and integers, got "
                                  f"{type(segments).__name__}")
    return _run_generation(args, prefix=args.prefix, suffix=args.suffix, segments=segments)


def cmd_info(args) -> int:
    lm = load_model(args)
    info = {
        "source": lm.source, "folder": str(lm.path.resolve()), "layout": lm.layout, "name": lm.name,
        "config": lm.config.to_dict(), "tokenizer": lm.tokenizer.name, "vocab_size": lm.config.vocab_size,
        "length": lm.length, "parameters": lm.parameters, "device": str(lm.device), "dtype": str(lm.dtype),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>11}: {value}")
    return 0


def cmd_serve(args) -> int:
    if args.ray:
        return _serve_with_ray(args)
    if args.replicas is not None:
        print("sedd: error: --replicas needs --ray (one server process serves one device; docs/scale-out.md)",
              file=sys.stderr)
        return 2

    import uvicorn
    from pydantic import ValidationError

    # `app` is the server package beside sedd_core; only this command imports it, the library never does.
    from app.main import create_app
    from app.settings import Settings

    flags = {name: getattr(args, name) for name in ("model", "device", "dtype") if getattr(args, name)}
    try:
        settings = Settings(**flags)  # the flags over SEDD_* variables
    except ValidationError as exc:
        print(f"sedd: error: invalid server settings (SEDD_* variables): {exc}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0


def _serve_with_ray(args) -> int:
    """`sedd serve --ray --replicas N`: Ray Serve replicas on a local Ray instance (app/ray_serve.py)."""
    import importlib.util

    replicas = 1 if args.replicas is None else args.replicas
    if replicas < 1:
        print(f"sedd: error: --replicas must be at least 1, got {replicas}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        print("sedd: error: --ray needs Ray Serve, which is not installed: pip install 'sedd-serve[ray]'",
              file=sys.stderr)
        return 2
    from app.ray_serve import serve_local  # the server package; the library never imports it at import time

    overrides = {flag: getattr(args, flag) for flag in ("model", "device", "dtype") if getattr(args, flag)}
    overrides["log_level"] = args.log_level
    return serve_local(overrides, replicas=replicas, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sedd", description="SEDD text diffusion: sample, infill, serve, train")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="draw unconditional samples")
    _add_generation_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("infill", help="fill the middle between a fixed prefix and suffix, or the gaps of --segments")
    _add_generation_args(p)
    p.add_argument("--prefix", default="", help="text fixed at the start")
    p.add_argument("--suffix", default="", help="text fixed at the end")
    p.add_argument("--segments", default=None, help="the whole canvas as a JSON list: strings are kept exactly, "
                                                    "integers are gaps of that many tokens, e.g. "
                                                    "'[\"ROMEO. \", 40, \".\\n\"]' (not with --prefix/--suffix/--length)")
    p.set_defaults(func=cmd_infill)

    p = sub.add_parser("info", help="show the resolved model folder, config, tokenizer and size")
    _add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="start the HTTP server (uvicorn)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument("--graceful-timeout", type=int, default=30, help="seconds to finish streams on shutdown")
    p.add_argument("--ray", action="store_true", help="serve through Ray Serve replicas on a local Ray instance "
                                                      "(needs 'sedd-serve[ray]'; docs/scale-out.md)")
    p.add_argument("--replicas", type=int, default=None, help="with --ray: replicas, each with its own model, engine "
                                                           "and device (default 1)")
    p.set_defaults(func=cmd_serve)

    for module in ("training.cli", "data", "evaluate"):
        try:
            mod = __import__(f"sedd_core.{module}", fromlist=["add_cli"])
        except ModuleNotFoundError:
            continue
        mod.add_cli(sub)
    _add_bench(sub)
    return parser


def _add_bench(sub) -> None:
    """`sedd bench` lives in the `benchmarks` package beside the library (installed with it); it is
    imported only here, when the command line is built, so that the library never depends on it."""
    try:
        from benchmarks.sedd_bench import add_cli
    except ModuleNotFoundError as exc:
        if exc.name != "benchmarks":
            raise
        return
    add_cli(sub)


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .generation import GenerationError
    from .hub import HubError
    from .loading import CheckpointError
    from .tokenizers import TokenizerError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (GenerationError, CheckpointError, ConfigError, TokenizerError, HubError) as exc:
        print(f"sedd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
