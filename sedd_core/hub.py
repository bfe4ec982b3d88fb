"""Model sources on hubs: `oxen:NAMESPACE/REPO` and `hf:REPO_ID`, downloaded once into a cache folder.

A download goes to a temporary folder beside its destination and is renamed into
place only when complete, so a failed download never leaves a folder that a later
start would mistake for a model. The cache folder and the Oxen host are arguments
(the server and the CLI take them from SEDD_CACHE and SEDD_OXEN_HOST).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .files import atomic_folder

OXEN_HOST = "hub.oxen.ai"


class HubError(RuntimeError):
    """A hub source could not be fetched; the message says why and what to do."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "sedd"


def _split_repo(spec: str, scheme: str) -> tuple[str, str]:
    parts = spec.strip("/").split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise HubError(f"{scheme}:{spec} is not of the form {scheme}:NAMESPACE/NAME")
    return parts[0], parts[1]


def fetch_oxen(spec: str, host: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Clone an Oxen repository (e.g. models/SEDD-large) into `cache_dir`/oxen, once."""
    namespace, name = _split_repo(spec, "oxen")
    host = host or OXEN_HOST
    dest = Path(cache_dir or default_cache_dir()) / "oxen" / namespace / name
    if dest.is_dir():
        return dest
    try:
        import oxen
    except ImportError as exc:
        raise HubError("oxen: sources need the `oxenai` package: pip install 'sedd-serve[oxen]'") from exc

    def clone(tmp: Path) -> None:
        print(f"sedd: cloning https://{host}/{namespace}/{name} into {dest} ...", file=sys.stderr, flush=True)
        target = tmp / "repo"
        try:
            oxen.clone(f"{namespace}/{name}", path=str(target), host=host)
        except Exception as exc:
            raise HubError(
                f"could not clone oxen:{namespace}/{name} from {host} ({exc.__class__.__name__}: {exc}). "
                "Check the network and the repository name, or clone it yourself "
                f"(oxen clone https://{host}/{namespace}/{name}) and pass the folder instead"
            ) from exc
        for item in target.iterdir():
            os.replace(item, tmp / item.name)
        target.rmdir()
        print(f"sedd: cloned oxen:{namespace}/{name}", file=sys.stderr, flush=True)

    return atomic_folder(dest, clone)


def fetch_hf(repo_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download a Hugging Face model repository (e.g. louaaron/sedd-medium) with huggingface_hub."""
    namespace, name = _split_repo(repo_id, "hf")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise HubError("hf: sources need `huggingface_hub`: pip install 'sedd-serve[hf]'") from exc
    try:
        return Path(
            snapshot_download(
                f"{namespace}/{name}",
                cache_dir=str(Path(cache_dir or default_cache_dir()) / "hf"),
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.yaml", "*.tiktoken"],
            )
        )
    except Exception as exc:
        raise HubError(
            f"could not download hf:{namespace}/{name} ({exc.__class__.__name__}: {exc}). "
            "Check the network and the repository id, or download it yourself and pass the folder"
        ) from exc
