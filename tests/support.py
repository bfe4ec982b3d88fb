"""Run the real server (uvicorn in a subprocess, on a loopback socket) for tests.

    from support import running_server      # tests/ is on sys.path under pytest

    with running_server("../shared/reference/tiny-five", max_rows=8, SEDD_API_KEY="k") as base_url:
        httpx.get(base_url + "/health")

Keyword arguments become environment variables: `max_rows=8` is SEDD_MAX_ROWS=8, names already in
upper case (SEDD_API_KEY, OMP_NUM_THREADS) pass as given. The server runs from the repository root
on CPU; the context manager waits for GET /health to answer 200, yields the base URL, and at the
end sends SIGTERM (then SIGKILL after a grace period).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"
TINY_FIVE = SHARED_DIR / "reference" / "tiny-five"


GPT2_VOCAB = SHARED_DIR / "vocab" / "gpt2.tiktoken"


def write_tiny_gpt2_model(folder: Path, vocab_file: Path = GPT2_VOCAB, length: int = 24, seed: int = 0) -> Path:
    """A random GPT-2-vocabulary model in the Oxen layout (checkpoint.pth + config.yaml + gpt2.tiktoken)."""
    import shutil

    import torch
    import yaml

    from sedd_core.config import SEDDConfig
    from sedd_core.model import SEDD

    config = SEDDConfig.from_dict({
        "tokens": 50257, "graph": {"type": "absorb"}, "noise": {"type": "loglinear"},
        "model": {"name": "tiny-gpt2", "hidden_size": 32, "cond_dim": 16, "length": length, "n_blocks": 1,
                  "n_heads": 2, "scale_by_sigma": True, "dropout": 0.0},
    })
    torch.manual_seed(seed)
    model = SEDD(config)
    with torch.no_grad():  # the output layer starts at zero; random weights make the samples vary
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "checkpoint.pth")
    (folder / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    shutil.copy(vocab_file, folder / "gpt2.tiktoken")
    return folder


class ServerFailed(RuntimeError):
    """The server exited or did not become ready; the message holds the end of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(model: str, **env: object) -> dict[str, str]:
    out = dict(os.environ)
    out.update({"SEDD_MODEL": str(model), "SEDD_DEVICE": "cpu", "SEDD_LOG_LEVEL": "warning",
                "PYTHONUNBUFFERED": "1"})
    for name, value in env.items():
        key = name if name.isupper() else f"SEDD_{name.upper()}"
        out[key] = str(value)
    return out


@contextlib.contextmanager
def running_server(model: str, startup_timeout: float = 90.0, **env: object) -> Iterator[str]:
    """Start `uvicorn app.main:create_app --factory` on a free port; yield its base URL when ready."""
    environ = server_env(model, **env)
    with tempfile.TemporaryFile(mode="w+b") as log:
        for attempt in range(3):  # another process may take the port between free_port() and bind
            port = free_port()
            cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
                   "--port", str(port), "--log-level", "warning", "--timeout-graceful-shutdown", "5"]
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT)
            base_url = f"http://127.0.0.1:{port}"
            try:
                _wait_ready(proc, base_url, startup_timeout, log)
            except ServerFailed as exc:
                _terminate(proc)
                if "address already in use" in str(exc).lower() and attempt < 2:
                    continue
                raise
            break
        try:
            yield base_url
        finally:
            _terminate(proc)


def _tail(log, limit: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode("utf-8", "replace")[-limit:]


def _wait_ready(proc: subprocess.Popen, base_url: str, timeout: float, log) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"the server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            response = httpx.get(base_url + "/health", timeout=2.0)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        if response.status_code == 200:
            return
        if response.json().get("status") == "failed":
            raise ServerFailed(f"the model failed to load: {response.json().get('error')}\n{_tail(log)}")
        time.sleep(0.1)
    raise ServerFailed(f"/health did not answer 200 within {timeout:g} s:\n{_tail(log)}")


def _terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
