"""The dtype that `auto` picks on a CPU (bfloat16 only with native bf16 instructions), as the server and the
command line report it; the CPU capability probe is swapped where a test needs the other kind of CPU.
The bf16 network itself is tested in test_model_fast_paths.py."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sedd_core
from sedd_core import loading

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.anyio
async def test_v1_model_reports_the_auto_dtype_and_why(app_client, tiny_five, monkeypatch):
    monkeypatch.setattr(loading, "cpu_bf16_support", lambda: "amx_bf16")
    async with app_client(tiny_five) as client:
        info = (await client.get("/v1/model")).json()
    assert info["dtype"] == "bfloat16" and info["cpu_bf16"] == "amx_bf16" and info["compiled"] is False
    assert info["dtype_choice"] == "auto: this CPU has amx_bf16 (native bfloat16 matmuls)"

    async with app_client(tiny_five, dtype="float32") as client:  # SEDD_DTYPE still chooses by hand
        info = (await client.get("/v1/model")).json()
    assert (info["dtype"], info["dtype_choice"], info["cpu_bf16"]) == ("float32", "asked", "amx_bf16")


@pytest.mark.anyio
async def test_a_cpu_without_native_bf16_serves_float32_as_before(app_client, tiny_five, monkeypatch):
    monkeypatch.setattr(loading, "cpu_bf16_support", lambda: None)
    body = {"num_samples": 2, "steps": 8, "seed": 11}
    async with app_client(tiny_five) as client:
        info = (await client.get("/v1/model")).json()
        samples = (await client.post("/sample", json=body)).json()["samples"]
    assert info["dtype"] == "float32" and info["cpu_bf16"] is None
    assert info["dtype_choice"] == "auto: this CPU has no native bfloat16 instructions"
    lm = sedd_core.load(tiny_five, device="cpu", dtype="float32")
    assert [s["text"] for s in samples] == sedd_core.generate(lm, num_samples=2, steps=8, seed=11)


def info(*args: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "sedd_cli", "info", "--json", *args], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_sedd_info_reports_this_cpus_bf16_and_the_choice(tiny_five):
    found = loading.cpu_bf16_support()
    auto = info("--model", str(tiny_five), SEDD_DTYPE="")
    assert auto["cpu_bf16"] == found
    assert auto["dtype"] == str(torch.bfloat16 if found else torch.float32)
    assert auto["dtype_choice"].startswith("auto: ")
    asked = info("--model", str(tiny_five), SEDD_DTYPE="float32")
    assert (asked["dtype"], asked["dtype_choice"]) == ("torch.float32", "asked")
    assert info("--model", str(tiny_five), "--dtype", "bfloat16")["dtype"] == "torch.bfloat16"


@pytest.mark.anyio
async def test_compile_auto_falls_back_to_eager_when_compiling_fails(app_client, tiny_five, monkeypatch):
    """SEDD_COMPILE=auto where compiling fails (a compiler without Python headers, say): the server starts and
    serves eagerly, and says why; compiling asked for by name still fails the start."""
    from sedd_core.fast_model import FastSEDD

    monkeypatch.setattr(loading, "cpp_compiler", lambda: "/usr/bin/g++")

    def broken_warm(self, max_rows, length):
        if self.compiled:
            raise RuntimeError("CppCompileError: Python.h: No such file or directory")
        return []

    monkeypatch.setattr(FastSEDD, "warm", broken_warm)
    body = {"num_samples": 2, "steps": 8, "seed": 11}
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("sedd.server").addHandler(handler)
    try:
        async with app_client(tiny_five, compile="auto") as client:
            info = (await client.get("/v1/model")).json()
            answer = await client.post("/sample", json=body)
    finally:
        logging.getLogger("sedd.server").removeHandler(handler)
    assert info["compiled"] is False and answer.status_code == 200
    assert any(m.startswith("SEDD_COMPILE=auto: compiling the network failed (RuntimeError: CppCompileError: "
                            "Python.h") for m in warnings), warnings
    with pytest.raises(Exception, match="could not be loaded|Python.h"):
        async with app_client(tiny_five, compile="1", startup_timeout=30) as client:
            pass
