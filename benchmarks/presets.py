"""Synthetic models for benchmarks: the shapes of real SEDD models with random weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sedd_core.config import SEDDConfig
from sedd_core.graph import graph_from_config
from sedd_core.loading import LoadedModel, to_precision
from sedd_core.model import SEDD
from sedd_core.noise import noise_from_config
from sedd_core.tokenizers import CharTokenizer

CHAR_TOKENS, GPT2_TOKENS = 98, 50257
PRESETS: dict[str, dict[str, Any]] = {
    # the shape of the shipped default character model (sedd_core/configs/default.yaml)
    "char-default": dict(tokens=CHAR_TOKENS, hidden_size=256, cond_dim=64, n_blocks=6, n_heads=4, length=128),
    # a ~6M-parameter character model at length 256
    "char-6m-256": dict(tokens=CHAR_TOKENS, hidden_size=256, cond_dim=128, n_blocks=6, n_heads=4, length=256),
    # a 12-position character model (the shape of reference/tiny-five, wider)
    "short12": dict(tokens=CHAR_TOKENS, hidden_size=128, cond_dim=64, n_blocks=3, n_heads=4, length=12),
    # GPT-2 vocabulary on a small trunk: the vocabulary-wide maths dominate
    "gpt2-small-trunk": dict(tokens=GPT2_TOKENS, hidden_size=256, cond_dim=64, n_blocks=4, n_heads=4, length=256),
    # the shape of SEDD-medium (424M parameters); random weights. Very slow on a CPU: use a GPU
    "sedd-medium": dict(tokens=GPT2_TOKENS, hidden_size=1024, cond_dim=128, n_blocks=24, n_heads=16, length=1024),
}


class _IdTokenizer:
    """Stands in for a tokenizer on synthetic GPT-2-vocabulary models: the benchmark never decodes."""

    name = "ids"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def unknown_characters(self, text: str) -> list[str]:
        return []

    def encode(self, text: str) -> list[int]:
        if text:
            raise ValueError("synthetic benchmark models take no prompt")
        return []

    def decode(self, tokens, mask_id=None, placeholder=None) -> str:
        return " ".join(str(t) for t in tokens)


def preset_config(name: str, length: int | None = None) -> SEDDConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    p = dict(PRESETS[name])
    tokens = p.pop("tokens")
    if length is not None:
        p["length"] = max(int(length), 1)
    return SEDDConfig.from_dict({
        "tokens": tokens, "graph": {"type": "absorb"}, "noise": {"type": "loglinear"},
        "model": {**p, "scale_by_sigma": True, "dropout": 0.0, "name": f"bench-{name}"},
    })


def synthetic_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                    length: int | None = None) -> LoadedModel:
    """A model of a preset's shape with random weights (PyTorch's default init), made on `device`."""
    config = preset_config(name, length)
    torch.manual_seed(seed)
    with torch.device(device):
        model = SEDD(config)
    to_precision(model, device, dtype).eval()  # stored as loading stores a checkpoint's weights
    tokenizer = CharTokenizer() if config.tokens == CHAR_TOKENS else _IdTokenizer(config.tokens)
    return LoadedModel(model=model, graph=graph_from_config(config), noise=noise_from_config(config),
                       tokenizer=tokenizer, config=config, device=device, dtype=dtype, path=Path(f"<{name}>"),
                       source=f"preset:{name}", layout="synthetic")

