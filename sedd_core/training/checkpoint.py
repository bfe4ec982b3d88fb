"""The run folder on disk: what a checkpoint writes and what a resume reads back.

    checkpoint.pth            EMA weights, a plain state dict (training.export_dtype)
    config.yaml               SEDDConfig.to_dict() + `tokenizer`
    tokenizer_config.json     the character vocabulary (char models); gpt2.tiktoken for GPT-2
    checkpoints-meta/checkpoint.pth   model, ema, optimizer, step, rng, train_config
    train_config.yaml         the resolved training config
    metrics.jsonl             one line per evaluation

Every file is written atomically (`sedd_core.files`), the resumable state first, so a run
killed at any moment leaves the last complete checkpoint readable.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_torch_save, atomic_write, atomic_write_text
from ..tokenizers import CharTokenizer, Tokenizer
from .config import TrainConfig, dump_yaml
from .errors import TrainingError

META_CHECKPOINT = Path("checkpoints-meta") / "checkpoint.pth"
METRICS = "metrics.jsonl"
CHECKPOINT_VERSION = 1
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Model fields that change the weights' shapes or meaning: fixed for the life of a run.
FROZEN_ON_RESUME = ("tokens", "graph", "noise", "model.hidden_size", "model.cond_dim", "model.n_blocks",
                    "model.n_heads", "model.scale_by_sigma")


def to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def _get(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def read_training_state(run_dir: Path, config: TrainConfig) -> dict:
    """The resumable state in RUN_DIR/checkpoints-meta/checkpoint.pth, checked against `config`."""
    meta = run_dir / META_CHECKPOINT
    try:
        state = torch.load(meta, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"could not read {meta} to resume ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(state, dict) or not {"model", "ema", "optimizer", "step"} <= set(state):
        raise TrainingError(f"{meta} is not a sedd training checkpoint")
    if isinstance(state.get("train_config"), dict):
        check_frozen_fields(TrainConfig.from_dict(state["train_config"]), config)
    return state


def check_frozen_fields(saved: TrainConfig, config: TrainConfig) -> None:
    """Refuse a resume whose config changes the model's shape or meaning (FROZEN_ON_RESUME, tokenizer)."""
    before, now = saved.sedd_config().to_dict(), config.sedd_config().to_dict()
    changed = [f"{key}: {_get(before, key)} -> {_get(now, key)}" for key in FROZEN_ON_RESUME
               if _get(before, key) != _get(now, key)]
    if saved.tokenizer != config.tokenizer:
        changed.append(f"tokenizer: {saved.tokenizer} -> {config.tokenizer}")
    if changed:
        raise TrainingError(
            "the config does not match the run being resumed (" + "; ".join(changed) + "). Resume with "
            "the run's own train_config.yaml (leave out --config), or start a new run in another --out")


def write_checkpoint(run_dir: Path, training_state: dict[str, Any], weights: dict[str, torch.Tensor],
                     config: TrainConfig, tokenizer: Tokenizer) -> None:
    """The resumable state first, then the loadable model folder; every file atomically."""
    atomic_torch_save(run_dir / META_CHECKPOINT, training_state)
    atomic_torch_save(run_dir / "checkpoint.pth", weights)
    model_config = config.sedd_config().to_dict()
    model_config["tokenizer"] = config.tokenizer
    atomic_write_text(run_dir / "config.yaml", dump_yaml(model_config))
    if isinstance(tokenizer, CharTokenizer):
        atomic_write_text(run_dir / "tokenizer_config.json", json.dumps(tokenizer.config_dict(), indent=2) + "\n")
    elif tokenizer.vocab_file is not None and not (run_dir / "gpt2.tiktoken").is_file():
        # the run folder carries its vocabulary, so that it loads and serves offline
        atomic_write(run_dir / "gpt2.tiktoken", lambda tmp: shutil.copyfile(tokenizer.vocab_file, tmp))
    write_train_config(run_dir, config)


def write_train_config(run_dir: Path, config: TrainConfig) -> None:
    atomic_write_text(run_dir / "train_config.yaml", dump_yaml(config.to_dict()))


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def trim_metrics(run_dir: Path, step: int) -> dict[str, Any]:
    """Drop metric lines past `step` (written after the last checkpoint of a killed run); returns
    the last line kept, or {}."""
    path = run_dir / METRICS
    if not path.is_file():
        return {}
    keep, last = [], {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            keep.append(line)
            last = record
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    return last
