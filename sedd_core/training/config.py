"""The training config: a tree of dataclasses read from YAML, with `section.key=value` overrides.

The layout follows the authors' `configs/config.yaml` (model, graph, noise, training,
data), flattened where they split the optimiser out: here `training.lr`,
`training.warmup` and friends sit beside `training.batch_size`. Packaged configs
(`default`, `tiny`) live in `sedd_core/configs/` and are named without `.yaml`.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import GRAPH_TYPES, NOISE_TYPES, ConfigError, SEDDConfig
from ..hub import OXEN_HOST
from ..tokenizers import DEFAULT_CHARS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TOKENIZERS = ("char", "gpt2")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")
CHAR_TOKENS = len(DEFAULT_CHARS) + 2  # 98: [PAD], [UNK] and Oxen's 96 characters
GPT2_TOKENS = 50257


class TrainConfigError(ConfigError):
    """A training config that cannot be used; the message names the field to fix."""


@dataclass
class ModelSection:
    hidden_size: int = 256
    cond_dim: int = 64
    n_blocks: int = 6
    n_heads: int = 4
    length: int = 128
    dropout: float = 0.1
    scale_by_sigma: bool = True
    name: str = "sedd-char"


@dataclass
class GraphSection:
    type: str = "absorb"


@dataclass
class NoiseSection:
    type: str = "loglinear"
    sigma_min: float = 1e-4
    sigma_max: float = 20.0


@dataclass
class TrainingSection:
    batch_size: int = 64
    accum: int = 1                 # micro-batches per optimiser step (the batch is batch_size * accum)
    n_iters: int = 200_000         # total optimiser steps; raise it with --set on --resume to train longer
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup: int = 1000             # steps of linear warm-up from lr/warmup to lr, then constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0         # max global gradient norm; 0 turns clipping off
    ema: float = 0.999             # EMA decay of the weights (the authors use 0.9999 for long runs)
    eval_every: int = 500
    eval_batches: int = 4          # fixed held-out batches per evaluation
    eval_batch_size: int = 0       # 0: batch_size
    snapshot_every: int = 2000     # sample snapshots into RUN_DIR/samples/
    snapshot_samples: int = 4      # unconditional samples per snapshot (plus one infill)
    snapshot_steps: int = 64       # denoising steps per snapshot sample
    checkpoint_every: int = 500
    export_dtype: str = "float32"  # dtype of the exported EMA weights in RUN_DIR/checkpoint.pth
    seed: int = 0


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)   # text files, or folders (train.txt, else every *.txt)
    valid: list[str] = field(default_factory=list)   # held-out text; empty: the last valid_fraction of train
    valid_fraction: float = 0.05
    hf_dataset: str | None = None                    # a Hugging Face dataset name instead of files
    hf_train_split: str = "train"
    hf_valid_split: str | None = None                # None: held out from the train split
    hf_column: str = "text"


@dataclass
class PushSection:
    """Where `--repo` pushes to (an Oxen hub) and what goes there."""

    host: str = OXEN_HOST
    scheme: str = "https"
    branch: str = "main"
    training_state: bool = False   # also push checkpoints-meta/checkpoint.pth (weights + optimizer: ~4x)
    background: bool = True        # push from a thread so a slow network never stalls training


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: str = "char"        # char: Oxen's 98-token character vocabulary; gpt2: GPT-2 BPE (50257)
    tokens: int | None = None      # derived from the tokenizer when left out
    graph: GraphSection = field(default_factory=GraphSection)
    noise: NoiseSection = field(default_factory=NoiseSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    data: DataSection = field(default_factory=DataSection)
    push: PushSection = field(default_factory=PushSection)

    # ---- derived -----------------------------------------------------------------------------

    @property
    def vocab_tokens(self) -> int:
        return int(self.tokens) if self.tokens is not None else (CHAR_TOKENS if self.tokenizer == "char"
                                                                else GPT2_TOKENS)

    def sedd_config(self) -> SEDDConfig:
        """The model config our loader reads back from RUN_DIR/config.yaml."""
        m = self.model
        return SEDDConfig.from_dict({
            "tokens": self.vocab_tokens,
            "graph": {"type": self.graph.type},
            "noise": {"type": self.noise.type, "sigma_min": self.noise.sigma_min, "sigma_max": self.noise.sigma_max},
            "model": {"name": m.name, "hidden_size": m.hidden_size, "cond_dim": m.cond_dim, "length": m.length,
                      "n_blocks": m.n_blocks, "n_heads": m.n_heads, "scale_by_sigma": m.scale_by_sigma,
                      "dropout": m.dropout},
            "tokenizer": self.tokenizer,
        })

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrainConfig:
        config = _build(cls, data or {}, "")
        config.validate()
        return config

    def validate(self) -> None:
        m, t = self.model, self.training
        if self.tokenizer not in TOKENIZERS:
            raise TrainConfigError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        expected = CHAR_TOKENS if self.tokenizer == "char" else GPT2_TOKENS
        if self.tokens is not None and int(self.tokens) != expected:
            raise TrainConfigError(
                f"tokens is {self.tokens} but the {self.tokenizer} tokenizer has {expected}; leave `tokens` out")
        if self.graph.type not in GRAPH_TYPES:
            raise TrainConfigError(f"graph.type must be one of {', '.join(GRAPH_TYPES)}, got {self.graph.type!r}")
        if self.noise.type not in NOISE_TYPES:
            raise TrainConfigError(f"noise.type must be one of {', '.join(NOISE_TYPES)}, got {self.noise.type!r}")
        if m.scale_by_sigma and self.graph.type != "absorb":
            raise TrainConfigError("model.scale_by_sigma only applies to the absorbing graph; set it to false")
        for name in ("hidden_size", "cond_dim", "n_blocks", "n_heads", "length"):
            if getattr(m, name) < 1:
                raise TrainConfigError(f"model.{name} must be positive, got {getattr(m, name)}")
        if m.hidden_size % m.n_heads or (m.hidden_size // m.n_heads) % 2:
            raise TrainConfigError(
                f"model.hidden_size {m.hidden_size} must split into n_heads {m.n_heads} heads of even width")
        if not 0 <= m.dropout < 1:
            raise TrainConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
        for name in ("batch_size", "accum", "eval_batches", "snapshot_steps"):
            if getattr(t, name) < 1:
                raise TrainConfigError(f"training.{name} must be at least 1, got {getattr(t, name)}")
        for name in ("n_iters", "warmup", "eval_every", "snapshot_every", "checkpoint_every", "eval_batch_size",
                     "snapshot_samples"):
            if getattr(t, name) < 0:
                raise TrainConfigError(f"training.{name} must not be negative, got {getattr(t, name)}")
        if t.lr <= 0:
            raise TrainConfigError(f"training.lr must be positive, got {t.lr}")
        if not 0 <= t.ema < 1:
            raise TrainConfigError(f"training.ema must be in [0, 1), got {t.ema}")
        if t.grad_clip < 0:
            raise TrainConfigError(f"training.grad_clip must not be negative (0 turns it off), got {t.grad_clip}")
        if t.export_dtype not in EXPORT_DTYPES:
            raise TrainConfigError(
                f"training.export_dtype must be one of {', '.join(EXPORT_DTYPES)}, got {t.export_dtype!r}")
        if not 0 < self.data.valid_fraction < 1:
            raise TrainConfigError(f"data.valid_fraction must be in (0, 1), got {self.data.valid_fraction}")


# ---- building dataclasses from plain data ------------------------------------------------------


def _build(cls, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
        raise TrainConfigError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TrainConfigError(
            f"unknown key(s) {', '.join(where + k for k in unknown)}; "
            f"{where.rstrip('.') or 'the top level'} takes: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, where + name)
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    """`value` as type `hint`: YAML gives 1e-3 as a string and ints where floats are meant."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, where + ".")
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if type(None) in args:  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, where)
    if origin is list:
        if value is None:
            return []
        items = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(items, (list, tuple)):
            raise TrainConfigError(f"{where} must be a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(items)]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, (str, float)) else int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise TrainConfigError(f"{where} must be {hint.__name__}, got {value!r}") from None
    return value


# ---- files and overrides -----------------------------------------------------------------------


def packaged_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML file, or the name of a packaged config (`default`, `tiny`)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if "/" not in str(name_or_path) and packaged.is_file():
        return packaged
    raise TrainConfigError(
        f"no config file {name_or_path!r}; give a YAML path or a packaged config: {', '.join(packaged_configs())}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise TrainConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path} must hold a mapping at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.lr=1e-3` -> (["training", "lr"], 0.001-ish); the value is parsed with yaml.safe_load."""
    if "=" not in text:
        raise TrainConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise TrainConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise TrainConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """A deep copy of `data` with each `a.b.c=value` set."""
    data = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for text in overrides or []:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise TrainConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_train_config(source: str | Path | Mapping[str, Any] | None = "default",
                      overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML path, a packaged config name or a mapping, with `a.b=value` overrides.

    Keys the file leaves out take the dataclass defaults (those of the default character model).
    """
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data = read_yaml(resolve_config_path(source))
    return TrainConfig.from_dict(apply_overrides(data, overrides))


def dump_yaml(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False)
