"""The `sedd` command: sample, infill, info, score, eval, serve, train, data, bench."""
from __future__ import annotations

import argparse
import sys

from . import bench, data, evaluate, generate, serve, train
from .errors import UsageError, install_hint, library_errors

COMMAND_MODULES = (generate, evaluate, serve, train, data, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sedd", description="SEDD text diffusion: sample, infill, serve, train")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def fail(message: str) -> int:
    print(f"sedd: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        return fail(str(exc))
    except ValidationError as exc:
        return fail(f"invalid settings (SEDD_* variables or flags): {exc}")
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] in ("sedd_core", "app", "benchmarks", "sedd_cli"):
            raise
        return fail(f"sedd {args.command} needs {install_hint(exc.name)}")
    except Exception as exc:
        if isinstance(exc, library_errors()):
            return fail(str(exc))
        raise


if __name__ == "__main__":
    sys.exit(main())
