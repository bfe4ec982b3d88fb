"""Loss and throughput of a training run, for the eval lines and the progress bar."""
from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Meter:
    """Summed loss and gradient norm, steps and tokens since the last reset, and the training time they
    took: the time spent evaluating, sampling and saving is excluded. The sums stay on the device so that
    adding to them never waits for the GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        self.steps = self.tokens = 0
        self.start = time.perf_counter()
        self.excluded = 0.0

    def add(self, loss: torch.Tensor, tokens: int, grad_norm: torch.Tensor | None = None) -> None:
        self.loss += loss
        if grad_norm is not None:
            self.grad_norm += grad_norm
        self.steps += 1
        self.tokens += tokens

    def exclude_since(self, since: float) -> None:
        """Time from `since` (or from the last reset, if later) to now was not spent training."""
        self.excluded += time.perf_counter() - max(since, self.start)

    def mean_loss(self, length: int) -> float | None:
        """The mean loss per token, or None before the first step."""
        return float(self.loss) / self.steps / length if self.steps else None

    def tokens_per_s(self) -> float:
        seconds = time.perf_counter() - self.start - self.excluded
        return self.tokens / seconds if self.tokens and seconds > 0 else 0.0


class ProgressBar:
    """A tqdm bar over the steps with the recent loss and tokens/s (refreshed every second on a
    terminal, every 30 s into a log file)."""

    def __init__(self, total: int, initial: int, length: int, device: torch.device, enabled: bool):
        tty = sys.stderr.isatty()
        self.every = 1.0 if tty else 30.0
        self.length = length
        self.enabled = enabled
        self.meter = Meter(device)
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                        disable=not enabled, dynamic_ncols=True, mininterval=0.5 if tty else 30)

    def update(self, loss: torch.Tensor, tokens: int) -> None:
        self.meter.add(loss, tokens)
        self.bar.update(1)
        if self.enabled and time.perf_counter() - self.meter.start - self.meter.excluded >= self.every:
            self.bar.set_postfix(loss=f"{self.meter.mean_loss(self.length):.4f}",
                                 tok_s=f"{self.meter.tokens_per_s():,.0f}", refresh=False)
            self.meter.reset()

    def exclude_since(self, since: float) -> None:
        self.meter.exclude_since(since)

    def close(self) -> None:
        self.bar.close()
