"""Diffusion graphs (absorbing, uniform): forward process, reverse rates and the score-entropy loss.

These are the faithful, vocabulary-wide formulas of the authors' `graph_lib.py`, used for the
uniform graph, for training and as the reference the fast sampling path is
tested against. `score` is the ratio estimate (exp of the network's log score)
unless a name says `log_score`. `sigma` and step sizes broadcast as (B, 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import SEDDConfig


def _expm1_stable(sigma: torch.Tensor) -> torch.Tensor:
    return torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1)


class Graph:
    dim: int
    absorb: bool

    def transp_rate(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reverse_rate(self, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Transposed rate times score, with the diagonal set so that each row sums to zero."""
        rate = self.transp_rate(x) * score
        rate = rate.scatter(-1, x[..., None], torch.zeros_like(rate[..., :1]))
        return rate.scatter(-1, x[..., None], -rate.sum(dim=-1, keepdim=True))

    def euler_probs(self, x, score, dt, dsigma_rate):
        """Unnormalised probs of one Euler step; dt and dsigma_rate are (B, 1)."""
        rate = (dt * dsigma_rate)[..., None] * self.reverse_rate(x, score)
        return F.one_hot(x, self.dim).to(rate) + rate

    def analytic_probs(self, x, score, dsigma):
        """Unnormalised probs of one Tweedie tau-leaping step; dsigma is (B, 1)."""
        return self.staggered_score(score, dsigma) * self.transp_transition(x, dsigma)

    def denoise_probs(self, x, score, sigma):
        probs = self.analytic_probs(x, score, sigma)
        return probs[..., :-1] if self.absorb else probs


class Absorbing(Graph):
    absorb = True

    def __init__(self, tokens: int):
        self.dim = tokens + 1
        self.mask = tokens

    def transp_rate(self, x):
        edge = -F.one_hot(x, self.dim).float()
        return edge + (x == self.mask)[..., None].float()

    def transp_transition(self, x, sigma):
        sigma = sigma[..., None]
        edge = (-sigma).exp() * F.one_hot(x, self.dim)
        return edge + torch.where(x[..., None] == self.mask, 1 - (-sigma).exp(), 0.0)

    def staggered_score(self, score, dsigma):
        extra = (1 - dsigma.exp()) * score.sum(dim=-1)
        score = score * dsigma.exp()[..., None]
        return torch.cat([score[..., :-1], (score[..., -1] + extra)[..., None]], dim=-1)

    def sample_limit(self, *shape: int, device=None, generator=None) -> torch.Tensor:
        return torch.full(shape, self.mask, dtype=torch.long, device=device)

    def sample_transition(self, x, sigma, generator=None):
        move = torch.rand(x.shape, device=x.device, generator=generator) < 1 - (-sigma).exp()
        return torch.where(move, self.mask, x)

    def score_entropy(self, log_score, sigma, x, x0):
        """Per-token score entropy (B, L); zero where x is not masked."""
        masked = x == self.mask
        ratio = 1 / _expm1_stable(sigma).expand_as(x)
        neg = ratio * torch.gather(log_score, -1, x0[..., None]).squeeze(-1)
        pos = log_score[..., :-1].exp().sum(dim=-1)
        const = ratio * (ratio.log() - 1)
        return torch.where(masked, pos - neg + const, torch.zeros_like(pos))


class Uniform(Graph):
    absorb = False

    def __init__(self, tokens: int):
        self.dim = tokens

    def rate(self, x):
        edge = torch.ones(*x.shape, self.dim, device=x.device) / self.dim
        return edge.scatter(-1, x[..., None], -(self.dim - 1) / self.dim)

    def transp_rate(self, x):
        return self.rate(x)

    def transition(self, x, sigma):
        trans = torch.ones(*x.shape, self.dim, device=x.device) * (1 - (-sigma[..., None]).exp()) / self.dim
        trans = trans.scatter(-1, x[..., None], torch.zeros_like(trans[..., :1]))
        return trans.scatter(-1, x[..., None], 1 - trans.sum(dim=-1, keepdim=True))

    def transp_transition(self, x, sigma):
        return self.transition(x, sigma)

    def staggered_score(self, score, dsigma):
        epow = (-dsigma).exp()[..., None]
        return ((epow - 1) / (self.dim * epow)) * score.sum(dim=-1, keepdim=True) + score / epow

    def sample_limit(self, *shape: int, device=None, generator=None) -> torch.Tensor:
        return torch.randint(0, self.dim, shape, device=device, generator=generator)

    def sample_transition(self, x, sigma, generator=None):
        move = torch.rand(x.shape, device=x.device, generator=generator) < 1 - (-sigma).exp()
        jump = torch.randint(0, self.dim, x.shape, device=x.device, generator=generator)
        return torch.where(move, jump, x)

    def score_entropy(self, log_score, sigma, x, x0):
        esigm1 = _expm1_stable(sigma)
        ratio = 1 - self.dim / (esigm1 + self.dim)
        at_x = torch.gather(log_score, -1, x[..., None]).squeeze(-1)
        neg = log_score.mean(dim=-1) - at_x / self.dim
        neg = torch.where(
            x == x0, ratio * neg, torch.gather(log_score, -1, x0[..., None]).squeeze(-1) / esigm1 + neg
        )
        sexp = log_score.exp()
        pos = sexp.mean(dim=-1) - torch.gather(sexp, -1, x[..., None]).squeeze(-1) / self.dim
        const = torch.where(
            x == x0,
            (self.dim - 1) / self.dim * ratio * (ratio.log() - 1),
            ((-ratio.log() - 1) / ratio - (self.dim - 2)) / self.dim,
        )
        return pos - neg + const


def graph_from_config(config: SEDDConfig) -> Graph:
    return Absorbing(config.tokens) if config.absorb else Uniform(config.tokens)
