"""`sedd train`: train a SEDD model from a YAML config into a run folder that `sedd_core.load` reads."""
from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

from app.settings import ModelSettings

EPILOG = """\
examples:
  sedd train --config default --data data/shakespeare --out runs/default
  sedd train --out runs/default --resume                     # continue a stopped run
  sedd train --out runs/default --resume --set training.n_iters=300000
  sedd train --config tiny --data notes.txt --out runs/tiny --set training.lr=1e-3 --set model.hidden_size=64

The run folder holds checkpoint.pth + config.yaml (the EMA weights, loadable with
`sedd sample --model RUN_DIR`), checkpoints-meta/checkpoint.pth (the resumable state),
train_config.yaml, metrics.jsonl and samples/. Ctrl-C or SIGTERM stops after the current
step with a checkpoint; the exit status is then 128 + the signal number. A GPT-2-token run
reads the vocabulary from SEDD_GPT2_VOCAB when set (else tiktoken's download) and keeps a copy
in the run folder, so that the run serves offline.
"""


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a SEDD model on text (resumable, optional push to Oxen)",
        description="Train a SEDD model with the score-entropy objective.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML config file, or a packaged config: default, tiny (default: 'default'; with "
                        "--resume: the run's train_config.yaml)")
    p.add_argument("--data", action="extend", nargs="+", default=None, metavar="PATH",
                   help="training text: files, or folders (their train.txt, and valid.txt as held-out text; "
                        "else every *.txt); repeatable")
    p.add_argument("--valid", action="extend", nargs="+", default=None, metavar="PATH",
                   help="held-out text (default: valid.txt beside train.txt, else the last "
                        "data.valid_fraction of the training text)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR (step, weights, optimizer, EMA, data order); starts a new "
                        "run when RUN_DIR holds none yet")
    p.add_argument("--repo", default=None, metavar="NAMESPACE/NAME",
                   help="push config, checkpoint and samples to this Oxen repository after each checkpoint "
                        "(needs pip install 'sedd-serve[oxen]')")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: $SEDD_DEVICE, else auto)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set training.lr=1e-3 --set model.hidden_size=128 "
                        "(values are YAML); repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (eval lines still print)")
    p.set_defaults(func=cmd_train)


def build_config(args: argparse.Namespace):
    from sedd_core.training.config import (
        TrainConfig,
        TrainConfigError,
        apply_overrides,
        read_yaml,
        resolve_config_path,
    )

    run_dir = Path(args.out)
    saved = run_dir / "train_config.yaml"
    if args.config:
        base = read_yaml(resolve_config_path(args.config))
    elif args.resume and saved.is_file():
        base = read_yaml(saved)
    elif args.resume and (run_dir / "checkpoints-meta" / "checkpoint.pth").is_file():
        raise TrainConfigError(f"{saved} is missing; give the run's config with --config")
    else:
        base = read_yaml(resolve_config_path("default"))
    data = dict(base.get("data") or {})
    if args.resume and args.config and not args.data and saved.is_file() and not (data.get("train")
                                                                                  or data.get("hf_dataset")):
        data = dict(read_yaml(saved).get("data") or {})  # a new config for the same run and text
    if args.data:
        data["train"] = list(args.data)
        data["hf_dataset"] = None
        data["valid"] = list(args.valid or [])  # a held-out set named for the old data does not carry over
    elif args.valid:
        data["valid"] = list(args.valid)
    base["data"] = data
    return TrainConfig.from_dict(apply_overrides(base, args.overrides))


def cmd_train(args: argparse.Namespace) -> int:
    from sedd_core.training.oxen_push import OxenPushError
    from sedd_core.training.trainer import TrainingError, train

    from .errors import UsageError

    settings = ModelSettings(**({"device": args.device} if args.device else {}))
    try:
        config = build_config(args)
        metrics = train(config, args.out, resume=args.resume, repo=args.repo, device=settings.device,
                        progress=not args.no_progress, gpt2_vocab=settings.gpt2_vocab)
    except (TrainingError, OxenPushError) as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(metrics), flush=True)
    status = metrics.get("status", "finished")
    if status in ("SIGINT", "SIGTERM"):
        return 128 + int(getattr(signal, status))
    return 0
