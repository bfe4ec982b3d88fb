"""The nested SEDD config (YAML or JSON), parsed into small frozen dataclasses.

Missing `tokens`, `graph` or `noise` sections take the defaults of the published
GPT-2 checkpoints (the Oxen SEDD-large config only carries `model`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GRAPH_TYPES = ("absorb", "uniform")
NOISE_TYPES = ("loglinear", "geometric")


class ConfigError(ValueError):
    """A config that cannot describe a SEDD model; the message says which field to fix."""


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    cond_dim: int
    length: int
    n_blocks: int
    n_heads: int
    scale_by_sigma: bool = True
    dropout: float = 0.1
    name: str | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


@dataclass(frozen=True)
class SEDDConfig:
    model: ModelConfig
    tokens: int = 50257
    graph: str = "absorb"
    noise: str = "loglinear"
    sigma_min: float = 1e-4
    sigma_max: float = 20.0
    tokenizer: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def absorb(self) -> bool:
        return self.graph == "absorb"

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding and columns of the output: the mask is one extra state for absorb."""
        return self.tokens + 1 if self.absorb else self.tokens

    @property
    def mask_id(self) -> int | None:
        return self.tokens if self.absorb else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SEDDConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a SEDD config must be a mapping, got {type(data).__name__}")
        model = data.get("model")
        if not isinstance(model, Mapping):
            raise ConfigError("the config has no `model` section (hidden_size, cond_dim, length, n_blocks, n_heads)")
        missing = [k for k in ("hidden_size", "cond_dim", "length", "n_blocks", "n_heads") if k not in model]
        if missing:
            raise ConfigError(f"the config's `model` section lacks {', '.join(missing)}")
        model_cfg = ModelConfig(
            hidden_size=int(model["hidden_size"]),
            cond_dim=int(model["cond_dim"]),
            length=int(model["length"]),
            n_blocks=int(model["n_blocks"]),
            n_heads=int(model["n_heads"]),
            scale_by_sigma=bool(model.get("scale_by_sigma", True)),
            dropout=float(model.get("dropout", 0.1)),
            name=model.get("name"),
        )
        if model_cfg.hidden_size % model_cfg.n_heads:
            raise ConfigError(
                f"hidden_size {model_cfg.hidden_size} is not divisible by n_heads {model_cfg.n_heads}"
            )
        graph = _section_type(data, "graph", "absorb", GRAPH_TYPES)
        noise_section = data.get("noise") or {}
        noise = _section_type(data, "noise", "loglinear", NOISE_TYPES)
        tokenizer = data.get("tokenizer")
        if isinstance(tokenizer, Mapping):
            tokenizer = tokenizer.get("type") or tokenizer.get("name")
        return cls(
            model=model_cfg,
            tokens=int(data.get("tokens", 50257)),
            graph=graph,
            noise=noise,
            sigma_min=float(noise_section.get("sigma_min", 1e-4)),
            sigma_max=float(noise_section.get("sigma_max", 20.0)),
            tokenizer=tokenizer,
            raw=dict(data),
        )

    def to_dict(self) -> dict[str, Any]:
        """The authors' nested form, as our trainer writes it to `config.yaml`."""
        m = self.model
        out: dict[str, Any] = {
            "tokens": self.tokens,
            "graph": {"type": self.graph},
            "noise": {"type": self.noise, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max},
            "model": {
                "name": m.name or "sedd",
                "type": "ddit",
                "hidden_size": m.hidden_size,
                "cond_dim": m.cond_dim,
                "length": m.length,
                "n_blocks": m.n_blocks,
                "n_heads": m.n_heads,
                "scale_by_sigma": m.scale_by_sigma,
                "dropout": m.dropout,
            },
        }
        if self.tokenizer:
            out["tokenizer"] = self.tokenizer
        return out


def _section_type(data: Mapping[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    section = data.get(key)
    if section is None:
        return default
    value = section.get("type", default) if isinstance(section, Mapping) else section
    if value not in allowed:
        raise ConfigError(f"unknown {key} type {value!r}; expected one of {', '.join(allowed)}")
    return value
