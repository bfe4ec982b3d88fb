"""The published SEDD-small / SEDD-medium (Oxen SEDD-large) state dicts load with strict=True."""
from __future__ import annotations

import json

import pytest
import torch

from sedd_core.config import SEDDConfig
from sedd_core.loading import CheckpointError, check_state_dict
from sedd_core.model import SEDD

PUBLISHED = ["sedd-small", "sedd-medium (Oxen SEDD-large)"]  # the entries of tests/data/reference/checkpoint-keys.json


@pytest.fixture(scope="module")
def published(checkpoint_keys) -> dict:
    return json.loads(checkpoint_keys.read_text())


def test_the_key_file_lists_both_published_models(published):
    assert sorted(published) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", PUBLISHED)
def test_strict_load_on_meta(name, published, checkpoint_keys):
    entry = published[name]
    config = SEDDConfig.from_dict(entry["config"])
    with torch.device("meta"):
        model = SEDD(config)
        state = {k: torch.empty(shape) for k, shape in entry["state_dict"].items()}
    assert list(model.state_dict()) == list(entry["state_dict"])  # same keys, same order
    check_state_dict(model, state, checkpoint_keys)
    model.load_state_dict(state, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == entry["parameters"]


def test_mismatch_names_keys_and_shapes(published, checkpoint_keys):
    entry = published["sedd-small"]
    config = SEDDConfig.from_dict({**entry["config"], "model": {**entry["config"]["model"], "n_blocks": 11}})
    with torch.device("meta"):
        model = SEDD(config)
        state = {k: torch.empty(shape) for k, shape in entry["state_dict"].items()}
        state["vocab_embed.embedding"] = torch.empty(50257, 768)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(model, state, checkpoint_keys)
    message = str(err.value)
    assert "unexpected keys" in message and "blocks.11.attn_qkv.weight" in message
    assert "vocab_embed.embedding: checkpoint (50257, 768) vs config (50258, 768)" in message
