"""Push a training run to an Oxen repository (`sedd train --repo NAMESPACE/NAME`).

Each push stages the run's files in a remote workspace and commits them:
`oxen.RemoteRepo(repo).add(file, dst_dir)` for each file, then `.commit(message)`;
no local clone is needed. A repository that does not exist yet is created (private)
with a README. The files are copied to a staging folder first, so the trainer may go
on replacing them while an upload runs, and by default the upload runs in a thread
so a slow network never stalls training.

A failed push is a warning: training goes on and the next checkpoint pushes again,
with every snapshot not yet pushed.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from ..hub import OXEN_HOST

INSTALL_HINT = "pip install 'sedd-serve[oxen]'"
AUTH_HINT = ("check the network, that the repository name is right and that you may write to it "
             "(oxen config --name NAME --email EMAIL; oxen config --auth HOST API_KEY)")


# The model folder a push sends every time; the vocabulary and snapshots go once.
MODEL_FILES = ("config.yaml", "checkpoint.pth", "train_config.yaml", "metrics.jsonl")


def run_files(run_dir: Path, training_state: bool = False) -> tuple[list[str], set[str]]:
    """(the files of a run folder a push sends, those of them sent once): the model folder, its vocabulary
    (tokenizer_config.json every time, gpt2.tiktoken once), the resumable state when `training_state`, and
    every sample snapshot (once each). Paths are relative to `run_dir`; only files that exist."""
    run_dir = Path(run_dir)
    files, once = list(MODEL_FILES), set()
    if (run_dir / "tokenizer_config.json").is_file():
        files.append("tokenizer_config.json")
    if (run_dir / "gpt2.tiktoken").is_file():
        files.append("gpt2.tiktoken")
        once.add("gpt2.tiktoken")
    if training_state:
        files.append("checkpoints-meta/checkpoint.pth")
    samples = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "samples").glob("*.txt"))
    files += samples
    once.update(samples)
    return [f for f in files if (run_dir / f).is_file()], once


class OxenPushError(RuntimeError):
    """A push that could not be made; the message says why and what to do."""


def import_oxen():
    try:
        import oxen
    except ImportError as exc:
        raise OxenPushError(f"--repo needs the `oxenai` package: {INSTALL_HINT}") from exc
    return oxen


def check_repo_name(repo: str) -> str:
    parts = repo.strip().strip("/").split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise OxenPushError(f"--repo {repo!r} is not of the form NAMESPACE/NAME")
    return "/".join(parts)


def readme(repo: str) -> str:
    return (f"# {repo.split('/')[-1]}\n\nA SEDD (Score Entropy Discrete Diffusion) text model trained with "
            "sedd-serve (`sedd train`).\n\n- `checkpoint.pth`, `config.yaml` (+ `tokenizer_config.json`): the EMA "
            "weights in the Oxen layout; sample with `sedd sample --model oxen:" + repo + "`\n"
            "- `samples/`: sample snapshots during training\n- `metrics.jsonl`: held-out loss and bits per "
            "character at each evaluation\n- `train_config.yaml`: the full training config\n")


class OxenPusher:
    """Commits a set of run files to NAMESPACE/NAME on an Oxen hub, one commit per push."""

    def __init__(self, repo: str, host: str = OXEN_HOST, scheme: str = "https", branch: str = "main",
                 background: bool = True, log: Callable[[str], None] | None = None):
        self.repo = check_repo_name(repo)
        self.host = host
        self.scheme = scheme
        self.branch = branch
        self.background = background
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.oxen = import_oxen()  # fail at start, not at the first checkpoint
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._ensured = False
        self.pushed: set[str] = set()   # run-relative paths of write-once files (snapshots) already pushed
        self.commits: list[str] = []    # messages of the pushes that succeeded
        self.failures: list[str] = []   # messages of the pushes that failed

    # ---- the network side (everything the oxen package does) ----------------------------------

    def _remote(self):
        return self.oxen.RemoteRepo(self.repo, host=self.host, revision=self.branch, scheme=self.scheme)

    def _ensure_repo(self) -> None:
        if self._ensured:
            return
        if not self._remote().exists():
            self.log(f"oxen: creating {self.repo} on {self.host}")
            from oxen.remote_repo import create_repo

            create_repo(self.repo, description="SEDD text diffusion model (sedd-serve)", is_public=False,
                        host=self.host, scheme=self.scheme, files=[("README.md", readme(self.repo))])
        self._ensured = True

    def _upload(self, staging: Path, files: list[str], message: str) -> None:
        self._ensure_repo()
        remote = self._remote()
        by_dir: dict[str, list[str]] = {}
        for rel in files:
            parent = Path(rel).parent.as_posix()
            by_dir.setdefault("" if parent == "." else parent, []).append(str(staging / rel))
        try:
            for dst_dir, paths in by_dir.items():  # one workspace, one upload per destination folder
                remote.add(paths, dst_dir)
            remote.commit(message)
        except BaseException:
            with contextlib.suppress(Exception):  # leave no half-filled workspace; report the first error
                remote.delete_workspace()
            raise

    # ---- scheduling ----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def push(self, run_dir: Path, files: list[str], message: str, once: set[str] | frozenset = frozenset(),
             wait: bool = False) -> bool:
        """Push `files` (paths relative to `run_dir`) in one commit. Files in `once` (snapshots) are
        skipped when an earlier push sent them. While a push is still running this one is skipped
        (its files go with the next) unless `wait`. Returns whether a push was started."""
        if self.busy:
            if not wait:
                self.log("oxen: the previous push is still running; this checkpoint goes with the next one")
                return False
            self._thread.join()
        run_dir = Path(run_dir)
        todo = [f for f in files if (run_dir / f).is_file() and not (f in once and f in self.pushed)]
        if not todo:
            return False
        staging = Path(tempfile.mkdtemp(prefix="sedd-oxen-push-"))
        try:
            for rel in todo:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(run_dir / rel, staging / rel)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        job = (staging, todo, message, {f for f in todo if f in once})
        if self.background:
            self._thread = threading.Thread(target=self._run, args=job, name="sedd-oxen-push", daemon=True)
            self._thread.start()
        else:
            self._run(*job)
        return True

    def _run(self, staging: Path, files: list[str], message: str, once: set[str]) -> None:
        try:
            self._upload(staging, files, message)
        except Exception as exc:  # noqa: BLE001 - a push failure must never stop training
            text = f"{exc.__class__.__name__}: {exc}".strip()
            with self._lock:
                self.failures.append(message)
            self.log(f"warning: oxen push of {len(files)} file(s) to {self.repo} on {self.host} failed "
                     f"({text}); training goes on and the next checkpoint pushes again. {AUTH_HINT}")
            if not isinstance(exc, (ValueError, OSError, RuntimeError)):
                self.log(traceback.format_exc())
        else:
            with self._lock:
                self.pushed.update(once)
                self.commits.append(message)
            self.log(f"oxen: pushed {len(files)} file(s) to {self.repo} ({message})")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def close(self, timeout: float | None = None) -> None:
        """Wait for a push in flight (at most `timeout` seconds)."""
        if self.busy:
            self.log(f"oxen: waiting for the push to {self.repo} to finish ...")
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.log("warning: the oxen push is still running; leaving it unfinished")
