"""`sedd train`: train a SEDD model from a YAML config into a run folder that `sedd_core.load` reads.

One device by default; under torchrun (`torchrun --nproc_per_node N --no-python sedd train ...`) every
process is one data-parallel rank (`distributed.py`). This module owns the signal handling: SIGINT and
SIGTERM ask the trainer to stop after the current step (it saves a checkpoint first), a second Ctrl-C stops
at once, and the exit status is then 128 + the signal number.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from app.settings import ModelSettings

EPILOG = """\
examples:
  sedd train --config default --data data/shakespeare --out runs/default
  sedd train --out runs/default --resume                     # continue a stopped run
  sedd train --out runs/default --resume --set training.n_iters=300000
  sedd train --config tiny --data notes.txt --out runs/tiny --set training.lr=1e-3 --set model.hidden_size=64
  sedd train --init hf:louaaron/sedd-small --data corpus-tokens --out runs/ft   # fine-tune a published model
  sedd data tokenize hf:openwebtext --streaming --out owt       # a token folder, read through a memory map
  torchrun --nproc_per_node 8 --no-python sedd train --config owt.yaml --data owt --out runs/owt --resume

The run folder holds checkpoint.pth + config.yaml (the EMA weights, loadable with
`sedd sample --model RUN_DIR`), checkpoints-meta/checkpoint.pth (the resumable state),
train_config.yaml, metrics.jsonl, samples/ and tensorboard/. Ctrl-C or SIGTERM stops after the
current step with a checkpoint; the exit status is then 128 + the signal number. A GPT-2-token run
reads the vocabulary from SEDD_GPT2_VOCAB when set (else tiktoken's download) and keeps a copy in
the run folder, so that the run serves offline. training.batch_size is the global batch: under
torchrun each rank takes batch_size / (ranks x training.accum) rows per micro-batch. See docs/training.md.
"""


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a SEDD model on text (resumable, data-parallel under torchrun, optional push to Oxen)",
        description="Train a SEDD model with the score-entropy objective.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML config file, or a packaged config: default, tiny (default: 'default'; with "
                        "--resume: the run's train_config.yaml)")
    p.add_argument("--data", action="extend", nargs="+", default=None, metavar="PATH",
                   help="training text: files, or folders (their train.txt, and valid.txt as held-out text; "
                        "else every *.txt); repeatable. Or one token folder written by `sedd data tokenize`")
    p.add_argument("--valid", action="extend", nargs="+", default=None, metavar="PATH",
                   help="held-out text (default: valid.txt beside train.txt, else the last "
                        "data.valid_fraction of the training text)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR (step, weights, optimizer, EMA, data order); starts a new "
                        "run when RUN_DIR holds none yet (so torchrun's --max-restarts resume too)")
    p.add_argument("--init", default=None, metavar="SOURCE",
                   help="start from this model's weights (fine-tuning): a folder in any layout, oxen:NS/REPO or "
                        "hf:REPO_ID, loaded with the SEDD_* load options; its network, graph, noise and "
                        "tokenizer are the run's, the optimizer starts fresh")
    p.add_argument("--track", action="append", default=None, metavar="NAME",
                   help="where metrics and samples go besides metrics.jsonl: tensorboard (the default), wandb, "
                        "aim, or none; repeatable (sets the config's `track`)")
    p.add_argument("--repo", default=None, metavar="NAMESPACE/NAME",
                   help="push config, checkpoint and samples to this Oxen repository after each checkpoint "
                        "(needs pip install 'sedd-serve[oxen]')")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: $SEDD_DEVICE, else auto); under "
                                                  "torchrun each rank takes cuda:LOCAL_RANK")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set training.lr=1e-3 --set model.hidden_size=128 "
                        "(values are YAML); repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (eval lines still print)")
    p.set_defaults(func=cmd_train)


# Keys a fine-tuning run takes from its checkpoint; the packaged default config's values for them do not count.
NETWORK_KEYS = ("model", "tokenizer", "tokens", "graph", "noise")


def build_config(args: argparse.Namespace, init=None):
    """The run's TrainConfig from --config (or the run's own, on --resume), --data, --valid, --track and --set;
    with `init` (a loaded --init model) the network is the checkpoint's."""
    from sedd_core.training.config import (
        TrainConfig,
        TrainConfigError,
        apply_overrides,
        config_for_init,
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
        if init is not None:
            base = {k: v for k, v in base.items() if k not in NETWORK_KEYS}
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
    if args.track:
        base["track"] = [name for value in args.track for name in value.split(",") if name]
    values = apply_overrides(base, args.overrides)
    if init is not None:
        return config_for_init(values, init.config, init.tokenizer.name, args.init)
    return TrainConfig.from_dict(values)


@contextlib.contextmanager
def stop_on_signals(trainer) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM ask `trainer` to stop after the current step (it saves a
    checkpoint first); a second Ctrl-C raises KeyboardInterrupt at once. The previous handlers come back after.
    Signal handlers can only be set from the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and trainer.stop_requested is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        trainer.request_stop(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _load_init(args: argparse.Namespace, settings: ModelSettings, ranks):
    """The --init model (float32 on the CPU, the plain network), loaded with the SEDD_* load options; rank 0
    first, so that a hub source downloads once into the cache."""
    from sedd_core.loading import load

    options = {**settings.load_options(), "compile": None}
    if not ranks.main:
        ranks.barrier()
    try:
        return load(args.init, device="cpu", dtype="float32", fast=False, **options)
    finally:
        if ranks.main:
            ranks.barrier()


def _check_trackers(config) -> None:
    """A tracker the user asked for must be installed; TensorBoard, the default, may be missing (a notice)."""
    from .errors import require

    for name in config.track:
        if name != "tensorboard":
            require(name, f"track: {name}")


def cmd_train(args: argparse.Namespace) -> int:
    from sedd_core.training.distributed import Ranks
    from sedd_core.training.oxen_push import OxenPushError
    from sedd_core.training.trainer import Trainer, TrainingError

    from .distributed import TorchrunSettings, start_ranks, stop_ranks
    from .errors import UsageError

    settings = ModelSettings(**({"device": args.device} if args.device else {}))
    launch = TorchrunSettings()
    ranks, device = (start_ranks(launch, settings.device) if launch.launched else (Ranks(), settings.device))
    try:
        resuming = args.resume and (Path(args.out) / "checkpoints-meta" / "checkpoint.pth").is_file()
        init = _load_init(args, settings, ranks) if args.init and not resuming else None
        config = build_config(args, init)
        _check_trackers(config)
        trainer = Trainer(config, args.out, resume=args.resume, repo=args.repo, device=device,
                          progress=not args.no_progress, gpt2_vocab=settings.gpt2_vocab, ranks=ranks, init=init)
        if args.init and resuming:
            trainer.log(f"note: --init {args.init} is left aside: the run resumes from its own checkpoint")
        with stop_on_signals(trainer):
            metrics = trainer.run()
    except (TrainingError, OxenPushError) as exc:
        raise UsageError(str(exc)) from None
    finally:
        stop_ranks(ranks)
    if ranks.main:
        print(json.dumps(metrics), flush=True)
    status = metrics.get("status", "finished")
    if status in ("SIGINT", "SIGTERM"):
        return 128 + int(getattr(signal, status))
    return 0
