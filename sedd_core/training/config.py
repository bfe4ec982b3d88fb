"""The training config: pydantic models read from YAML, with `section.key=value` overrides.

The layout follows the authors' `configs/config.yaml` (model, graph, noise, training,
data), flattened where they split the optimiser out: here `training.lr`,
`training.warmup` and friends sit beside `training.batch_size`. Packaged configs
(`default`, `tiny`) live in `sedd_core/configs/` and are named without `.yaml`.
Every failure is a `TrainConfigError` that names the key to fix.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..config import GRAPH_TYPES, NOISE_TYPES, ConfigError, SEDDConfig
from ..hub import OXEN_HOST
from ..tokenizers import DEFAULT_CHARS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TokenizerName = Literal["char", "gpt2"]
ExportDtype = Literal["float32", "float16", "bfloat16"]
TOKENIZERS = get_args(TokenizerName)
TRACKERS = ("tensorboard", "wandb", "aim")
EXPORT_DTYPES = get_args(ExportDtype)
CHAR_TOKENS = len(DEFAULT_CHARS) + 2  # 98: [PAD], [UNK] and Oxen's 96 characters
GPT2_TOKENS = 50257


class TrainConfigError(ConfigError):
    """A training config that cannot be used; the message names the field to fix."""


def _number(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would take true as 1
        raise ValueError(f"must be a number, got {value!r}")
    return value


def _yaml_int(value: Any) -> Any:
    """YAML 1.1 reads `2e5` as a string; an integral number written so is still an int."""
    value = _number(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else value
    return value


def _yaml_none(value: Any) -> Any:
    return None if isinstance(value, str) and value.lower() in ("null", "none", "~") else value


def _as_list(value: Any) -> Any:
    """`--set data.train=notes.txt` gives one path, not a list of them."""
    if value is None:
        return []
    return [value] if isinstance(value, (str, int, float)) else value


Int = Annotated[int, BeforeValidator(_yaml_int)]
Float = Annotated[float, BeforeValidator(_number)]
Count = Annotated[int, BeforeValidator(_yaml_int), Field(ge=1)]
Every = Annotated[int, BeforeValidator(_yaml_int), Field(ge=0)]  # 0 turns it off
Paths = Annotated[list[str], BeforeValidator(_as_list)]
OptionalStr = Annotated[str | None, BeforeValidator(_yaml_none)]


class Section(BaseModel):
    # extra="forbid": a typo is an error, not a silently ignored key
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class ModelSection(Section):
    hidden_size: Count = 256
    cond_dim: Count = 64
    n_blocks: Count = 6
    n_heads: Count = 4
    length: Count = 128
    dropout: Float = Field(0.1, ge=0, lt=1)
    scale_by_sigma: bool = True
    name: str = "sedd-char"


def _one_of(choices: tuple[str, ...]):
    """A validator that accepts only `choices`, naming them when it refuses."""
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value
    return check


class GraphSection(Section):
    type: str = "absorb"

    _known = field_validator("type")(_one_of(GRAPH_TYPES))


class NoiseSection(Section):
    type: str = "loglinear"
    sigma_min: Float = 1e-4
    sigma_max: Float = 20.0

    _known = field_validator("type")(_one_of(NOISE_TYPES))


class TrainingSection(Section):
    batch_size: Count = 64         # the global batch of one optimiser step, over every rank and micro-batch
    accum: Count = 1               # micro-batches per rank per step (each rank's share of the batch, split)
    n_iters: Every = 200_000       # total optimiser steps; raise it with --set on --resume to train longer
    lr: Float = Field(3e-4, gt=0)
    beta1: Float = 0.9
    beta2: Float = 0.999
    eps: Float = 1e-8
    warmup: Every = 1000           # steps of linear warm-up from lr/warmup to lr, then constant
    weight_decay: Float = 0.0
    grad_clip: Float = Field(1.0, ge=0)  # max global gradient norm; 0 turns clipping off
    ema: Float = Field(0.999, ge=0, lt=1)  # EMA decay of the weights (the authors use 0.9999 for long runs)
    eval_every: Every = 500
    eval_batches: Count = 4        # fixed held-out batches per evaluation
    eval_batch_size: Every = 0     # 0: batch_size
    snapshot_every: Every = 2000   # sample snapshots into RUN_DIR/samples/
    snapshot_samples: Every = 4    # unconditional samples per snapshot (plus one infill)
    snapshot_steps: Count = 64     # denoising steps per snapshot sample
    checkpoint_every: Every = 500
    export_dtype: ExportDtype = "float32"  # dtype of the exported EMA weights in RUN_DIR/checkpoint.pth
    seed: Int = 0


class DataSection(Section):
    train: Paths = Field(default_factory=list)            # text files, or folders (train.txt, else every *.txt)
    valid: Paths = Field(default_factory=list)            # held-out text; empty: the last valid_fraction of train
    valid_fraction: Float = Field(0.05, gt=0, lt=1)
    hf_dataset: OptionalStr = None  # a Hugging Face dataset name instead of files
    hf_train_split: str = "train"
    hf_valid_split: OptionalStr = None  # None: held out from the train split
    hf_column: str = "text"


class PushSection(Section):
    """Where `--repo` pushes to (an Oxen hub) and what goes there."""

    host: str = OXEN_HOST
    scheme: str = "https"
    branch: str = "main"
    training_state: bool = False   # also push checkpoints-meta/checkpoint.pth (weights + optimizer: ~4x)
    background: bool = True        # push from a thread so a slow network never stalls training


def _trackers(value: Any) -> Any:
    value = _as_list(value)
    if isinstance(value, list):
        if value in (["none"], ["off"]):
            return []
        unknown = [v for v in value if v not in TRACKERS]
        if unknown:
            raise ValueError(f"must list some of {', '.join(TRACKERS)} (or none), got {', '.join(map(str, unknown))}")
    return value


class TrainConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    tokenizer: TokenizerName = "char"  # char: Oxen's 98-token character vocabulary; gpt2: GPT-2 BPE (50257)
    tokens: Annotated[Int | None, BeforeValidator(_yaml_none)] = None  # derived from the tokenizer when left out
    graph: GraphSection = Field(default_factory=GraphSection)
    noise: NoiseSection = Field(default_factory=NoiseSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    data: DataSection = Field(default_factory=DataSection)
    push: PushSection = Field(default_factory=PushSection)
    # where metrics and samples go besides metrics.jsonl and samples/: tensorboard (RUN_DIR/tensorboard),
    # wandb, aim; [] for none
    track: Annotated[list[str], BeforeValidator(_trackers)] = Field(default_factory=lambda: ["tensorboard"])
    init: OptionalStr = None  # the model the run started from (sedd train --init); None: the authors' random init

    @field_validator("model", "graph", "noise", "training", "data", "push", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return {} if value is None else value  # `model:` with nothing under it

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        expected = CHAR_TOKENS if self.tokenizer == "char" else GPT2_TOKENS
        if self.tokens is not None and self.tokens != expected and self.init is None:  # a checkpoint's own vocabulary
            raise TrainConfigError(
                f"tokens is {self.tokens} but the {self.tokenizer} tokenizer has {expected}; leave `tokens` out")
        if self.model.scale_by_sigma and self.graph.type != "absorb":
            raise TrainConfigError("model.scale_by_sigma only applies to the absorbing graph; set it to false")
        m = self.model
        if m.hidden_size % m.n_heads or (m.hidden_size // m.n_heads) % 2:
            raise TrainConfigError(
                f"model.hidden_size {m.hidden_size} must split into n_heads {m.n_heads} heads of even width")
        return self

    # ---- derived -----------------------------------------------------------------------------

    @property
    def vocab_tokens(self) -> int:
        return self.tokens if self.tokens is not None else (CHAR_TOKENS if self.tokenizer == "char"
                                                            else GPT2_TOKENS)

    def sedd_config(self) -> SEDDConfig:
        """The model config our loader reads back from RUN_DIR/config.yaml."""
        return SEDDConfig.from_dict({
            "tokens": self.vocab_tokens,
            "graph": {"type": self.graph.type},
            "noise": self.noise.model_dump(),
            "model": self.model.model_dump(),
            "tokenizer": self.tokenizer,
        })

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrainConfig:
        if data is not None and not isinstance(data, Mapping):
            raise TrainConfigError(f"the config must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            raise _config_error(exc) from None


# ---- pydantic's errors as one message that names the key ----------------------------------------

_TYPE_NAMES = {"int": "int", "float": "float", "bool": "bool", "string": "str", "list": "a list",
               "model": "a mapping", "dict": "a mapping"}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}


def _model_at(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = TrainConfig
    for part in loc:
        annotation = model.model_fields[part].annotation if isinstance(part, str) else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return model


def _describe(error: dict) -> str:
    loc = error["loc"]
    where = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "extra_forbidden":
        section = _model_at(loc[:-1])
        return (f"unknown key {where}; {'.'.join(map(str, loc[:-1])) or 'the top level'} takes: "
                f"{', '.join(section.model_fields)}")
    if isinstance(ctx.get("error"), TrainConfigError):
        return str(ctx["error"])
    if kind in _BOUNDS:
        limit = next(iter(ctx.values()))
        return f"{where} must be {_BOUNDS[kind]} {limit}, got {value!r}"
    if kind == "literal_error":
        return f"{where} must be one of {ctx.get('expected')}, got {value!r}"
    if kind == "value_error":
        return f"{where} {ctx.get('error')}"
    expected = _TYPE_NAMES.get(kind.split("_")[0])
    if expected and kind.endswith(("_type", "_parsing", "_from_float")):
        return f"{where} must be {expected}, got {value!r}"
    return f"{where or 'the config'}: {error['msg']}"


def _config_error(exc: ValidationError) -> TrainConfigError:
    errors = exc.errors()
    for error in errors:  # a cross-field check raises the finished message itself
        if isinstance((error.get("ctx") or {}).get("error"), TrainConfigError):
            return error["ctx"]["error"]
    return TrainConfigError("; ".join(_describe(e) for e in errors))


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


# ---- fine-tuning: the network comes from a checkpoint -------------------------------------------


# What a checkpoint fixes for a run that starts from it (sedd train --init): its weights' shapes and meaning.
FROM_CHECKPOINT = ("tokenizer", "tokens", "graph.type", "noise.type", "noise.sigma_min", "noise.sigma_max",
                   "model.hidden_size", "model.cond_dim", "model.n_blocks", "model.n_heads", "model.scale_by_sigma")
# What it gives unless the config says otherwise (no weight depends on them).
DEFAULT_FROM_CHECKPOINT = ("model.length", "model.dropout", "model.name")


def _dotted(data: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, Mapping) else None
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[last] = value


def _same(given: Any, value: Any) -> bool:
    if isinstance(value, bool) or isinstance(given, bool):
        return given is value
    if isinstance(value, (int, float)):
        try:
            return float(given) == float(value)
        except (TypeError, ValueError):
            return False
    return str(given).lower() == str(value).lower()


def config_for_init(data: Mapping[str, Any] | None, checkpoint: SEDDConfig, tokenizer: str,
                    source: str) -> TrainConfig:
    """The config of a run that starts from the checkpoint `source` (its config and tokenizer name): the
    network, graph, noise and tokenizer are the checkpoint's; a value of `data` that contradicts them is
    refused, naming each; length, dropout and name default to the checkpoint's."""
    data = apply_overrides(dict(data or {}), None)
    m = checkpoint.model
    fixed = {"tokenizer": tokenizer, "tokens": checkpoint.tokens, "graph.type": checkpoint.graph,
             "noise.type": checkpoint.noise, "noise.sigma_min": checkpoint.sigma_min,
             "noise.sigma_max": checkpoint.sigma_max, "model.hidden_size": m.hidden_size, "model.cond_dim": m.cond_dim,
             "model.n_blocks": m.n_blocks, "model.n_heads": m.n_heads, "model.scale_by_sigma": m.scale_by_sigma}
    if checkpoint.noise == "loglinear":  # the log-linear schedule has no sigma_min / sigma_max to contradict
        fixed = {k: v for k, v in fixed.items() if not k.startswith("noise.sigma")}
    conflicts = [f"{key}={given!r} where {source} has {value!r}" for key, value in fixed.items()
                 if (given := _dotted(data, key)) is not None and not _same(given, value)]
    if conflicts:
        raise TrainConfigError(
            f"--init {source}: the config contradicts the checkpoint ({'; '.join(conflicts)}). A run that starts "
            "from a checkpoint takes its network, graph, noise and tokenizer from it: leave these keys out of the "
            "config and --set")
    defaults = {"model.length": m.length, "model.dropout": m.dropout, "model.name": m.name or Path(source).name}
    for key, value in {**fixed, **{k: v for k, v in defaults.items() if _dotted(data, k) is None}}.items():
        _set_dotted(data, key, value)
    data["init"] = source
    return TrainConfig.from_dict(data)


def dump_yaml(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False)
