"""Shared fixtures: the repository root, ../shared (skipped when absent), and a session-wide server."""
from __future__ import annotations

from pathlib import Path

import pytest
from support import REPO_ROOT, SHARED_DIR, TINY_FIVE, running_server

# The limits of `tiny_server`, for tests that probe them.
TINY_LIMITS = {"max_rows": 16, "max_samples": 4, "max_steps": 1024, "max_queue": 32}


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent: the reference models and vocabulary live there")
    return SHARED_DIR


@pytest.fixture(scope="session")
def tiny_five(shared_dir: Path) -> Path:
    if not (TINY_FIVE / "checkpoint.pth").is_file():
        pytest.skip(f"{TINY_FIVE} is absent: the trained 12-character test model lives there")
    return TINY_FIVE


@pytest.fixture(scope="session")
def tiny_server(tiny_five: Path):
    """Base URL of a real server (uvicorn subprocess) on tiny-five with small limits (TINY_LIMITS)."""
    with running_server(str(tiny_five), **TINY_LIMITS) as base_url:
        yield base_url
