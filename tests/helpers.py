"""Plain functions the test modules share (fixtures live in conftest.py). A test module imports them,
`from helpers import post, stream`; no test imports another test module.

HTTP against a real server (base URL + path)
    post(base, path, body, **kwargs) -> httpx.Response
    stream(base, path, body, headers=None) -> [(event, data)] of a 200 SSE answer, data parsed as JSON
Prometheus text (GET /metrics)
    parse_metrics(text) -> {(name, sorted label pairs): value};  scrape(base, headers=None) -> the same, read
    metric(values, name, **labels) -> value;  multi_row_passes(values)
Answers
    without_id_and_timing(answer) -> the answer less what differs between two identical requests
Processes and tools
    free_port() -> a loopback port free right now;  sedd(*args) -> the `sedd` command run to completion
    find_tool(*names) -> an executable beside this interpreter, else on PATH, else None
    compose_command() -> how to run docker compose here, or None
    compose_config(compose, tmp_path, *args, env=None) -> `compose config` of docker-compose.yml, as JSON
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from httpx_sse import EventSource
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = httpx.Timeout(60.0)
MASK = "\u2591"  # how the server draws a masked position


# ---- HTTP ------------------------------------------------------------------------------------------
def post(base: str, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=TIMEOUT, **kwargs)


def stream(base: str, path: str, body: dict, headers: dict | None = None) -> list[tuple[str, dict]]:
    """(event, data) of every SSE event until the stream ends (no Accept header unless `headers` has one)."""
    with httpx.Client(timeout=TIMEOUT) as client, \
            client.stream("POST", base + path, json=body, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [(event.event, json.loads(event.data)) for event in EventSource(response).iter_sse()]


def without_id_and_timing(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("id", "timing")}


# ---- metrics ---------------------------------------------------------------------------------------
def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(base: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    return parse_metrics(httpx.get(base + "/metrics", headers=headers, timeout=TIMEOUT).text)


def metric(values: dict, name: str, **labels: str) -> float:
    return values[(name, tuple(sorted(labels.items())))]


def multi_row_passes(values: dict) -> float:
    """Passes that held more than one row, from the sedd_rows_per_pass histogram."""
    return metric(values, "sedd_rows_per_pass_count") - metric(values, "sedd_rows_per_pass_bucket", le="1.0")


# ---- processes and tools -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sedd(*args: str) -> subprocess.CompletedProcess:
    """`sedd ARGS` as users run it, from the repository root."""
    return subprocess.run([sys.executable, "-m", "sedd_cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)


def find_tool(*names: str) -> str | None:
    """An executable beside sys.executable (the venv's bin), else on PATH."""
    bin_dir = Path(sys.executable).parent
    for name in names:
        candidate = bin_dir / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def compose_command() -> list[str] | None:
    binary = find_tool("docker-compose")
    if binary:
        return [binary]
    docker = find_tool("docker")
    if docker and subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def compose_config(compose: list[str], tmp_path: Path, *extra_args: str, env: dict[str, str] | None = None) -> dict:
    """`compose config --format json` of docker-compose.yml with this process's SEDD_* settings and any .env
    left out (`env` added)."""
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SEDD_", "COMPOSE_", "INSTALL_FLASH_ATTN", "HF_TOKEN"))}
    clean.update(env or {})
    cmd = [*compose, "--project-directory", str(REPO_ROOT), "-f", str(REPO_ROOT / "docker-compose.yml"),
           "--env-file", str(empty_env_file), *extra_args, "config", "--format", "json"]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, env=clean, timeout=60)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"
    return json.loads(result.stdout)
