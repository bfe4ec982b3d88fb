"""`sedd eval`: the held-out ELBO separates text a model knows from text it does not."""
from __future__ import annotations

import random

import pytest

import sedd_core
from sedd_core.evaluate import evenly_spaced_windows, held_out_bits


def test_known_text_costs_fewer_bits_than_noise(tiny_five):
    lm = sedd_core.load(tiny_five, device="cpu")
    known = "hello world!" * 40  # windows of 12 at evenly spaced offsets: mostly rotations of the string
    aligned = held_out_bits(lm, "hello world!" * 16, windows=16, batch_size=16, repeats=2)
    rng = random.Random(0)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz !") for _ in range(480))
    random_bits = held_out_bits(lm, noise, windows=16, batch_size=16, repeats=2)
    assert aligned["bits_per_token"] < 1.0 < random_bits["bits_per_token"]
    assert held_out_bits(lm, known, windows=8, batch_size=8)["sequences"] == 8


def test_windows_are_evenly_spaced_and_checked():
    import torch

    ids = torch.arange(100)
    windows = evenly_spaced_windows(ids, 10, 4)
    assert windows[:, 0].tolist() == [0, 30, 60, 90] and windows.shape == (4, 10)
    with pytest.raises(ValueError, match="fewer than the model's length"):
        evenly_spaced_windows(ids[:5], 10, 1)
