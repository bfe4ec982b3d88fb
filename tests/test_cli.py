"""The `sedd` command line, run as users run it (a subprocess of the installed console script)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SEDD = [sys.executable, "-m", "sedd_core.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SEDD, *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])


def test_infill_json_keeps_prefix_and_suffix(tiny_five):
    out = run("infill", "--model", str(tiny_five), "--prefix", "ma", "--suffix", "rs", "--steps", "16",
              "--num-samples", "3", "--seed", "4", "--json")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 3
    assert all(r["text"].startswith("ma") and r["text"].endswith("rs") and r["seed"] == 4 for r in lines)
    assert "denoising" in out.stderr  # the progress bar


def test_sample_with_intermediate_states_and_seed_reproduces(tiny_five):
    args = ("sample", "--model", str(tiny_five), "--steps", "8", "--seed", "9", "--json", "--show-intermediate")
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert "[step 1/9 sample 0]" in first.stderr and "\u2591" in first.stderr


def test_bad_input_exits_2_with_a_message(tiny_five):
    out = run("infill", "--model", str(tiny_five), "--prefix", "hello wo", "--suffix", "rld!!", "--json")
    assert out.returncode == 2
    assert "leave no room on a canvas of 12 tokens" in out.stderr
    out = run("sample", "--model", "/nonexistent")
    assert out.returncode == 2 and "neither a folder nor a known source" in out.stderr


def test_info_json(tiny_five):
    out = run("info", "--model", str(tiny_five), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["tokenizer"] == "char" and info["length"] == 12 and info["parameters"] == 805091
