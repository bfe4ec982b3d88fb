"""Noise schedules: total noise sigma(t) and its rate dsigma/dt, for t in [0, 1] (the authors'
`noise_lib.py`)."""
from __future__ import annotations

import math

import torch

from .config import SEDDConfig


class LogLinearNoise:
    """sigma(t) = -log(1 - (1 - eps) t): the mask probability 1 - e^-sigma grows linearly in t."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(-(1 - self.eps) * t)

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.total(t), self.rate(t)


class GeometricNoise:
    """sigma(t) = sigma_min^(1-t) sigma_max^t."""

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self._log_ratio = math.log(sigma_max) - math.log(sigma_min)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min ** (1 - t) * self.sigma_max**t

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        return self.total(t) * self._log_ratio

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.total(t), self.rate(t)


Noise = LogLinearNoise | GeometricNoise


def noise_from_config(config: SEDDConfig) -> Noise:
    if config.noise == "loglinear":
        return LogLinearNoise()
    return GeometricNoise(config.sigma_min, config.sigma_max)
