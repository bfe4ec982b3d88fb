"""Small builders shared by the core tests (the server tests have their own in support.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from sedd_core.config import SEDDConfig
from sedd_core.model import SEDD

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def tiny_config(tokens: int = 50257, graph: str = "absorb", length: int = 24, **model) -> SEDDConfig:
    return SEDDConfig.from_dict({
        "tokens": tokens, "graph": {"type": graph}, "noise": {"type": "loglinear"},
        "model": {"hidden_size": 32, "cond_dim": 16, "length": length, "n_blocks": 1, "n_heads": 2,
                  "scale_by_sigma": graph == "absorb", "dropout": 0.0, "name": "tiny-test", **model},
    })


def write_oxen_folder(folder: Path, config: SEDDConfig, seed: int = 0, vocab_file: Path | None = None) -> Path:
    """A random model saved in the Oxen layout (checkpoint.pth + config.yaml)."""
    torch.manual_seed(seed)
    model = SEDD(config)
    with torch.no_grad():  # the authors zero-init the output layer; random weights make samples vary
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "checkpoint.pth")
    (folder / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    if vocab_file is not None:
        shutil.copy(vocab_file, folder / "gpt2.tiktoken")
    return folder
