"""The bundled character model: loads offline, samples from the vocabulary, is what `sedd sample` uses."""
from __future__ import annotations

import subprocess
import sys

import sedd_core
from sedd_core.loading import DEFAULT_MODEL_DIR
from sedd_core.tokenizers import DEFAULT_CHARS


def test_default_model_loads_offline_and_samples_vocabulary_characters(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SEDD_CACHE", "/nonexistent-cache")  # no download may be needed
    lm = sedd_core.load("default", device="cpu")
    assert lm.path == DEFAULT_MODEL_DIR and lm.tokenizer.name == "char" and lm.length == 128
    assert (DEFAULT_MODEL_DIR / "checkpoint.pth").stat().st_size < 20_000_000
    texts = sedd_core.generate(lm, num_samples=2, steps=16, seed=0, prefix="ROMEO.\n", suffix=" night.")
    for text in texts:
        assert set(text) <= set(DEFAULT_CHARS)
        assert text.startswith("ROMEO.\n") and text.endswith(" night.")
        assert len(text) <= 128


def test_sedd_sample_with_no_arguments_prints_text(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SEDD_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "sedd_cli", "sample", "--steps", "8"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    body = out.stdout.split("\n", 1)[1]
    assert out.stdout.startswith("--- sample 0 (seed ") and len(body.strip()) > 20
