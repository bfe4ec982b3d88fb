"""Sampling controls: how a revealed position picks its token. Temperature, top_k, top_p and min_p (the
names and meanings of OpenAI's and vLLM's parameters) reshape the clean-token distribution q that
`sampling.py` derives from the score; they never change how fast positions reveal. Here: the per-request
record (`SamplingControls`) and its range checks, the same controls per position as tensors, and the
exact float64 draw of a token from the reshaped weights."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class ControlError(ValueError):
    """A sampling control out of its range: `field` names it (temperature, top_p, top_k or min_p),
    `requirement` says what it must be."""

    def __init__(self, field: str, requirement: str, value):
        super().__init__(f"{field} {requirement}, got {value!r}")
        self.field, self.requirement, self.value = field, requirement, value


CONTROL_REQUIREMENTS = {
    "temperature": "must be a number of at least 0 (0 = deterministic, default 1)",
    "top_p": "must be a number greater than 0 and at most 1 (default 1 = off)",
    "top_k": "must be an integer of at least 0 (default 0 = off)",
    "min_p": "must be a number between 0 and 1 (default 0 = off)",
}


def check_control(field: str, value) -> None:
    """Raise `ControlError` unless `value` lies in the range of the sampling control `field`."""
    integer = field == "top_k"
    kinds = (int,) if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kinds) and math.isfinite(value)
    if ok:
        ok = {"temperature": value >= 0, "top_p": 0 < value <= 1, "top_k": value >= 0,
              "min_p": 0 <= value <= 1}[field]
    if not ok:
        raise ControlError(field, CONTROL_REQUIREMENTS[field], value)


@dataclass(frozen=True)
class SamplingControls:
    """How a revealed position picks its token: a reshaping of the clean-token distribution q (the
    names and meanings of OpenAI's and vLLM's sampling parameters). Applied in this order:

    - `temperature` (>= 0, default 1): q_y^(1/temperature), renormalised; below 1 sharper, above 1 flatter.
      0 is greedy decoding: no randomness at all. Each predictor step reveals as many positions as the
      noise schedule unmasks on average (the masked share of the job's free positions follows
      1 - e^-sigma(t), rounded), choosing the positions whose most likely token is the most likely
      (MaskGIT's and LLaDA's low-confidence remasking; ties to the earlier position), each with its most
      likely token (ties to the lower id); the final denoise reveals the rest the same way. A job's rows
      are then one text: the first row's, copied to the others after every step. The other controls
      have no effect at 0 (the most likely token survives all of them).
    - `top_k` (integer >= 0, 0 = off): keep the k most likely tokens (and any tied with the k-th).
    - `top_p` (0 < top_p <= 1, 1 = off): keep the most likely tokens whose probabilities, after the
      steps above, add up to top_p (the token that crosses it included, and any tied with it).
    - `min_p` (0 <= min_p <= 1, 0 = off): keep the tokens at least min_p times as likely as the most
      likely one.

    At the defaults the draw is the model's own: a request that sends them is the request that leaves
    them out. Out of range: `ControlError`."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self):
        for name in CONTROL_REQUIREMENTS:
            check_control(name, getattr(self, name))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def reshapes(self) -> bool:
        """Whether a random draw differs from the model's own distribution (greedy jobs draw no token)."""
        return not self.greedy and (self.temperature != 1 or self.top_p < 1 or self.top_k > 0 or self.min_p > 0)


@dataclass
class PositionControls:
    """The controls of each position's job, as tensors; None where every job has the default."""

    temperature: torch.Tensor | None  # float64 (N,)
    top_k: torch.Tensor | None  # long (N,), 0 = off
    top_p: torch.Tensor | None  # float64 (N,)
    min_p: torch.Tensor | None  # float64 (N,)
    top_k_max: int

    def take(self, at: torch.Tensor) -> PositionControls:
        pick = [None if v is None else v[at] for v in (self.temperature, self.top_k, self.top_p, self.min_p)]
        return PositionControls(*pick, self.top_k_max)


def position_controls(spans: Sequence, device: torch.device) -> PositionControls | None:
    """Per position its job's controls, from `spans` (each job's positions as `.job`, `.start`, `.end`, in
    order); None when no job reshapes q."""
    if not any(span.job.controls.reshapes for span in spans):
        return None
    sizes = torch.tensor([span.end - span.start for span in spans])

    def per_position(name: str, off, dtype):
        values = [1.0 if span.job.controls.greedy and name == "temperature" else getattr(span.job.controls, name)
                  for span in spans]
        if all(v == off for v in values):
            return None
        return torch.tensor(values, dtype=dtype).repeat_interleave(sizes).to(device)

    return PositionControls(per_position("temperature", 1.0, torch.float64), per_position("top_k", 0, torch.long),
                             per_position("top_p", 1.0, torch.float64), per_position("min_p", 0.0, torch.float64),
                             max(span.job.controls.top_k for span in spans))


def token_weights(log_w: torch.Tensor, peak: torch.Tensor, controls: PositionControls | None) -> torch.Tensor:
    """The unnormalised distribution q' a revealed position draws its token from, (R, W) float64 with the
    most likely token at 1: exp((log w - peak) / temperature), then top_k, top_p and min_p keep the tokens
    `SamplingControls` says (their weights unchanged, the others 0)."""
    z = log_w.double() - peak.double()[:, None]
    if controls is not None and controls.temperature is not None:
        z = z.div_(controls.temperature[:, None])
    w = z.exp_()
    if controls is None:
        return w
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    if controls.top_k is not None:
        k, most = controls.top_k, min(controls.top_k_max, w.shape[1])
        kth = w.topk(most, dim=1).values.gather(1, (k.clamp(1, most) - 1)[:, None])
        w = torch.where((k[:, None] == 0) | (w >= kth), w, zero)
    if controls.top_p is not None:
        p = controls.top_p
        ordered = w.sort(dim=1, descending=True).values
        before = ordered.cumsum(dim=1).sub_(ordered)  # mass of the more likely tokens
        kept = (before < p[:, None] * ordered.sum(dim=1, keepdim=True)).sum(dim=1)  # >= 1: before[0] = 0
        cut = ordered.gather(1, (kept - 1)[:, None])
        w = torch.where((p[:, None] >= 1) | (w >= cut), w, zero)
    if controls.min_p is not None:
        w = torch.where(w >= controls.min_p[:, None], w, zero)
    return w


def draw_tokens(log_w: torch.Tensor, peak: torch.Tensor, u: torch.Tensor,
                 controls: PositionControls | None) -> torch.Tensor:
    """One token per row of log weights (R, W), drawn from `token_weights` by inverse CDF: the first
    index whose float64 running sum exceeds u * total. Every token whose weight is above about 1e-16 of
    the total can be drawn, with its probability to that precision; a token of weight 0 never is."""
    cum = token_weights(log_w, peak, controls).cumsum_(dim=1)
    chosen = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True).squeeze(1)
    # u * total rounds up to the total once in about 2^53 draws: then the most likely token
    return torch.where(chosen < cum.shape[1], chosen, log_w.argmax(dim=1))
