"""Experiment tracking beside metrics.jsonl: TensorBoard event files (the default), Weights & Biases, Aim.

Each tracker gets, at every evaluation, the record metrics.jsonl gets (training loss, held-out loss and
bits per token or character, learning rate, gradient norm, tokens/s) and, at every snapshot, the sample
texts. Only rank 0 tracks. A resumed run continues the same TensorBoard log (events past the resumed step
are dropped), W&B run and Aim run: their ids are kept in RUN_DIR/tracking.json.

TensorBoard comes with `pip install 'sedd-serve[track]'`; without it the default is skipped with a one-line
notice. W&B and Aim are used only when asked for (`--track wandb`, `track: [aim]`) and refuse to start
without their package.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from .errors import TrainingError

IDS_FILE = "tracking.json"
INSTALL = {"tensorboard": "pip install 'sedd-serve[track]'", "wandb": "pip install 'sedd-serve[wandb]'",
           "aim": "pip install 'sedd-serve[aim]'"}


class Tracker:
    """What the trainer calls; the base class records nothing."""

    name = "none"

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def text(self, step: int, tag: str, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, folder: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops what a killed session logged past its last checkpoint
        self.writer = SummaryWriter(str(folder), purge_step=start_step or None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        # TensorBoard renders markdown: four spaces keep the samples' line breaks and spacing
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, ids: dict[str, str]):
        import wandb

        self.run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config,
                              id=ids.get("wandb"), resume="allow")
        ids["wandb"] = self.run.id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        import wandb

        self.run.log({tag: wandb.Html("<pre>" + _escape(text) + "</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


class AimTracker(Tracker):
    name = "aim"

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, ids: dict[str, str]):
        import aim

        self.aim = aim
        self.run = aim.Run(run_hash=ids.get("aim"), repo=str(run_dir), experiment=project)
        self.run["hparams"] = config
        ids["aim"] = self.run.hash

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.run.track(value, name=tag, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.track(self.aim.Text(text), name=tag, step=step)

    def close(self) -> None:
        self.run.close()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Trackers(Tracker):
    """The trackers of a run, called together."""

    def __init__(self, trackers: Iterable[Tracker] = ()):
        self.trackers = list(trackers)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def scalars(self, step: int, values: dict[str, float]) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None}
        for tracker in self.trackers:
            tracker.scalars(step, values)

    def text(self, step: int, tag: str, text: str) -> None:
        for tracker in self.trackers:
            tracker.text(step, tag, text)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_trackers(names: Iterable[str], run_dir: Path, config: dict[str, Any], project: str, start_step: int,
                  log: Callable[[str], None]) -> Trackers:
    """The trackers `names` for the run in `run_dir`. A missing TensorBoard is a notice; a missing W&B or Aim,
    which a user asked for, is a TrainingError that names the package."""
    ids_file = run_dir / IDS_FILE
    ids: dict[str, str] = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
    trackers: list[Tracker] = []
    for name in names:
        try:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir / "tensorboard", start_step))
            elif name == "wandb":
                trackers.append(WandbTracker(run_dir, config, project, ids))
            elif name == "aim":
                trackers.append(AimTracker(run_dir, config, project, ids))
            else:
                raise TrainingError(f"unknown tracker {name!r}; use tensorboard, wandb or aim")
        except ImportError as exc:
            if name != "tensorboard":
                raise TrainingError(f"track: {name} needs the `{name}` package ({exc}): {INSTALL[name]}") from exc
            log(f"note: no TensorBoard log: the `tensorboard` package is not installed ({INSTALL[name]}); "
                "metrics.jsonl is written as always")
    if ids:
        atomic_write_text(ids_file, json.dumps(ids) + "\n")
    return Trackers(trackers)
