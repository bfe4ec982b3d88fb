"""The training objective: diffusion-weighted score entropy (the authors' `get_loss_fn` in `losses.py`)."""
from __future__ import annotations

import torch

from .graph import Graph
from .noise import Noise

SAMPLING_EPS = 1e-3  # t ~ U(1e-3, 1)


def draw_times(batch: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Diffusion times of `batch` sequences, t ~ U(1e-3, 1)."""
    return (1 - SAMPLING_EPS) * torch.rand(batch, device=device, generator=generator) + SAMPLING_EPS


def score_entropy_loss(
    model,
    graph: Graph,
    noise: Noise,
    x0: torch.Tensor,
    t: torch.Tensor | None = None,
    perturbed: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Loss per sequence (B,): sum over positions of dsigma/dt(t) * score entropy at x_t ~ forward(x0, sigma(t))."""
    if t is None:
        t = draw_times(x0.shape[0], x0.device, generator)
    sigma, dsigma = noise(t)
    if perturbed is None:
        perturbed = graph.sample_transition(x0, sigma[:, None], generator=generator)
    log_score = model(perturbed, sigma).float()
    entropy = graph.score_entropy(log_score, sigma[:, None], perturbed, x0)
    return (dsigma[:, None] * entropy).sum(dim=-1)
