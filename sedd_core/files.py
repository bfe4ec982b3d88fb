"""Atomic writes: a file or a folder appears complete under its name, or not at all.

Everything is first written beside its destination (same file system, so the final
rename is atomic) and renamed into place only when complete; a failure or an interrupt
leaves no temporary file behind. Used for training checkpoints, prepared corpora and
hub downloads alike.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch  # only the callers that save tensors pay for the import

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_folder(dest: str | os.PathLike, fill: Callable[[Path], None], *, merge: bool = False,
                  last: str | None = None) -> Path:
    """fill(tmp) a temporary folder beside `dest`, then rename it to `dest`; returns `dest`.

    When `dest` already exists: with `merge`, the entries fill made are moved into it one by
    one, `last` last, so that the presence of `last` marks a complete set; without, the
    existing folder stands (another process, such as a second replica on the same volume,
    finished first) and what fill made is dropped."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    tmp = scratch / dest.name
    tmp.mkdir()  # the usual permissions, where mkdtemp's own folder is private
    try:
        fill(tmp)
        if not dest.exists():
            try:
                os.replace(tmp, dest)
                return dest
            except OSError:
                if not dest.is_dir():
                    raise
        if merge:
            for entry in sorted(tmp.iterdir(), key=lambda p: (p.name == last, p.name)):
                os.replace(entry, dest / entry.name)
        return dest
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
