"""What the `sedd` command reports as a user's mistake (exit status 2, one line on stderr), not a crash."""
from __future__ import annotations

import importlib
from types import ModuleType

# Optional dependencies: the module a command imports -> the extra that installs it.
EXTRAS = {"ray": "ray", "oxen": "oxen", "huggingface_hub": "hf", "datasets": "data", "flash_attn": "gpu",
          "tensorboard": "track", "wandb": "wandb", "aim": "aim"}


class UsageError(Exception):
    """Bad input that the command itself found: the message says what to fix."""


class MissingDependency(UsageError):
    """An optional package a command needs is not installed."""


def install_hint(module: str) -> str:
    top = module.split(".")[0]
    extra = EXTRAS.get(top)
    package = f"'sedd-serve[{extra}]'" if extra else top
    return f"the Python package {top!r} is not installed: pip install {package}"


def require(module: str, what: str) -> ModuleType:
    """Import an optional dependency, or say which package `what` (a command or flag) needs."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise MissingDependency(f"{what} needs {install_hint(exc.name or module)}") from None


def library_errors() -> tuple[type[Exception], ...]:
    """The library's input errors, whose messages already say what to fix. Imported when a command has
    failed, so that building the parser imports no torch."""
    from sedd_core.config import ConfigError
    from sedd_core.elbo import ScoreError
    from sedd_core.generation import GenerationError
    from sedd_core.hub import HubError
    from sedd_core.loading import CheckpointError
    from sedd_core.tokenizers import TokenizerError

    return GenerationError, CheckpointError, ConfigError, TokenizerError, HubError, ScoreError
