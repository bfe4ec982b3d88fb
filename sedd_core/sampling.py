"""Denoising steps for a batch of jobs, each row at its own diffusion time.

A `Job` is one request's rows: its tokens, the positions it holds fixed (prefix,
suffix, any given token), its time grid, predictor, sampling controls and random
generator. The authors' `pc_sampler` is `steps` predictor steps on
linspace(1, 1e-5, steps + 1) followed by one final denoise; `Job.next_action`
walks that grid one step at a time so that a scheduler can batch jobs that sit at
different points of it.

`denoising_step` runs ONE model pass for all the rows of the jobs it is given and
advances each job by one step. For the absorbing graph only masked positions get
the output layer and the vocabulary-wide maths; there all three updates have the
same shape (Lou et al. 2024, section 4.1; the authors' `analytic`/`euler`
predictors and final denoise), with s_y the score and S' = sum of s_y over the
real tokens:

    euler:    p_y = dt * dsigma/dt * s_y,   p_mask = 1 - (dt * dsigma/dt) * S'
    analytic: p_y = (e^ds - 1) * s_y,       p_mask = 1 - (e^ds - 1) * S'
    denoise:  p_y = (e^sigma - 1) * s_y,    p_mask = 0

so rows with different predictors and times share one pass. Written as
p_y = r * q_y with r = coef * S' (clamped to 1) and q_y = s_y / S', the step
reveals a position with probability r and gives it a token drawn from q, the
clean-token distribution p(x0 | xt): for the absorbing graph the score at a masked
position is p(x0 = y | xt) times a factor of the time alone (Ou et al. 2024,
"Your absorbing discrete diffusion secretly models the conditional distributions
of clean data", theorem 1). A job's `SamplingControls` (temperature, top_k, top_p,
min_p) reshape q, never r: the rate at which positions reveal follows the noise
schedule whatever the controls. Temperature 0 is greedy decoding (see
`SamplingControls`).

Exact draws: each position's draw is two uniforms in float64, one for "reveal or
stay masked" (u < r) and one for the token among the revealed outcomes (inverse
CDF over q's weights accumulated in float64), so every outcome whose probability
is above about 1e-16 can be drawn, at any step count. A Gumbel-max over float32
noise (the authors' `sample_categorical`, this module's earlier draw) cannot
pick an outcome below about 1e-7 of the most likely one, which at many steps is
most of the vocabulary (staying masked has probability close to 1).

The uniform graph uses the faithful vocabulary-wide formulas of `graph.py` and the
same two draws: "move or stay" and then the token among the moves; the controls
reshape the distribution of the token a position moves to.

Speed: a step waits for the device once for the count of masked positions (which
sizes the output) and, off the CPU, once more for the count of revealed ones. The
(positions x vocabulary) work is one max and one sum of exponentials per position,
in place on the output layer's result and on a CPU in buffers reused from step to
step; the token draw runs only at the positions that reveal. `denoising_step(...,
fused=True)` computes the max and the sum as one torch.compile'd pass instead
(`masked_stats`), which reads the output once; it is for GPUs.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch

from .controls import SamplingControls, draw_tokens, position_controls, token_weights
from .graph import Graph
from .noise import Noise

PREDICTORS = ("analytic", "euler")
FINAL_TIME = 1e-5  # the time grid's last point (the authors' sampling eps; the training loss has its own)
EULER, ANALYTIC, DENOISE = 0, 1, 2


def time_grid(steps: int, eps: float = FINAL_TIME) -> torch.Tensor:
    return torch.linspace(1.0, eps, steps + 1)


@dataclass
class Job:
    """One request's rows moving through the sampler. `x` is (n, L) on the model's device."""

    x: torch.Tensor
    steps: int
    predictor: str = "analytic"
    generator: torch.Generator | None = None
    fixed: torch.Tensor | None = None  # bool (L,)
    fixed_tokens: torch.Tensor | None = None  # long (L,)
    controls: SamplingControls = field(default_factory=SamplingControls)
    step_index: int = 0
    masks_left: torch.Tensor | None = None  # long (n,) on the device: positions still masked after the last step
    gaps: tuple[tuple[int, int], ...] = ()  # token positions [start, end) of each generated gap, for outputs
    grid: list[float] = field(init=False, repr=False)

    def __post_init__(self):
        if self.predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {self.predictor!r}; use one of {', '.join(PREDICTORS)}")
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        self.grid = time_grid(self.steps).tolist()
        self.restore_fixed()

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def length(self) -> int:
        return self.x.shape[1]

    @property
    def done(self) -> bool:
        return self.step_index > self.steps

    @cached_property
    def free_positions(self) -> int:
        """Positions per row that the job generates (not fixed)."""
        return self.length - (int(self.fixed.sum()) if self.fixed is not None else 0)

    def next_action(self) -> tuple[int, float, float]:
        """(kind, t, dt) of the next update: a predictor step, then the final denoise."""
        if self.step_index < self.steps:
            kind = ANALYTIC if self.predictor == "analytic" else EULER
            return kind, self.grid[self.step_index], (1 - FINAL_TIME) / self.steps
        return DENOISE, self.grid[-1], 0.0

    def restore_fixed(self) -> None:
        """Write the fixed tokens back into x (at creation and after every step, so x always holds them)."""
        if self.fixed is not None:
            self.x = torch.where(self.fixed, self.fixed_tokens, self.x)

    def current_t(self) -> float:
        return self.grid[min(self.step_index, self.steps)]


@dataclass
class StepBatch:
    """The rows of one pass: the jobs' rows stacked (they hold their fixed text), and per row the update
    to make: its kind (EULER, ANALYTIC or DENOISE), time t, step dt, sigma(t), dsigma/dt and the analytic
    step's ds = sigma(t) - sigma(t - dt). `x` is this step's own copy."""

    jobs: Sequence[Job]
    noise: Noise
    x: torch.Tensor  # long (B, L)
    kind: torch.Tensor  # (B,)
    t: torch.Tensor  # float32 (B,), likewise below
    dt: torch.Tensor
    sigma: torch.Tensor
    dsigma_rate: torch.Tensor
    ds: torch.Tensor

    @classmethod
    def of(cls, noise: Noise, jobs: Sequence[Job]) -> StepBatch:
        if len({job.length for job in jobs}) != 1:
            raise ValueError("jobs in one pass must share a length; group them first")
        x = torch.cat([job.x for job in jobs])
        kinds, ts, dts = [], [], []
        for job in jobs:
            kind, t, dt = job.next_action()
            kinds += [kind] * job.rows
            ts += [t] * job.rows
            dts += [dt] * job.rows
        kind = torch.tensor(kinds, device=x.device)
        t = torch.tensor(ts, device=x.device, dtype=torch.float32)
        dt = torch.tensor(dts, device=x.device, dtype=torch.float32)
        sigma, dsigma_rate = noise(t)
        ds = sigma - noise.total((t - dt).clamp_min(0))
        return cls(jobs, noise, x, kind, t, dt, sigma, dsigma_rate, ds)

    def absorbing_coefficient(self) -> torch.Tensor:
        """Per row, the factor of the score in p_y = coef * s_y: dt * dsigma/dt, e^ds - 1 or e^sigma - 1."""
        return torch.where(self.kind == EULER, self.dt * self.dsigma_rate,
                           torch.expm1(torch.where(self.kind == DENOISE, self.sigma, self.ds)))

    def job_spans(self, counts: Sequence[int]) -> list[JobSpan]:
        """Where each job's positions lie in a row-major list of positions with `counts` per row."""
        spans, start, row = [], 0, 0
        for job in self.jobs:
            n = sum(counts[row : row + job.rows])
            spans.append(JobSpan(job, row, start, start + n))
            start, row = start + n, row + job.rows
        return spans


class JobSpan(NamedTuple):
    job: Job
    row: int  # the job's first row in the batch
    start: int  # its positions: [start, end) of the list
    end: int


@dataclass
class MaskedScores:
    """The network's log scores at the masked positions of a batch (absorbing graph), row-major."""

    log_score: torch.Tensor  # float32 (N, V): the real tokens, then the mask column
    coef: torch.Tensor  # (N,) the position's row's `StepBatch.absorbing_coefficient`
    may_stay: torch.Tensor  # bool (N,): False at a final denoise
    index: torch.Tensor  # (N,) flat positions in x
    counts: list[int]  # masked positions per row
    row_of: torch.Tensor  # (N,) row of each position

    @property
    def real(self) -> torch.Tensor:
        return self.log_score[:, :-1]


class _Workspace(threading.local):
    """Reused CPU buffers for a step's (positions x vocabulary) tensors, one set per thread.

    On a CPU a fresh tensor of tens of megabytes costs page faults every step (the allocator
    hands large blocks back to the kernel); reusing one buffer per role removes that. On a GPU
    the caching allocator already reuses memory, so this hands out plain new tensors there."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, width: int, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(rows, width, device=device)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < rows * width:
            buf = self.buffers[name] = torch.empty(rows * width)
        return buf[: rows * width].view(rows, width)


_workspace = _Workspace()


@torch.inference_mode()
def denoising_step(model, graph: Graph, noise: Noise, jobs: Sequence[Job], fused: bool = False) -> int:
    """Advance every job by one step with one model pass. All jobs must share a length.

    `fused` (absorbing graph): each position's max and sum of exponentials as one torch.compile'd pass
    (`masked_stats`; for GPUs, compiles on the first steps) instead of the in-place kernels.
    Returns the number of positions that got the vocabulary-wide maths."""
    if not jobs:
        return 0
    batch = StepBatch.of(noise, jobs)
    if graph.absorb:
        x, work, masks_left = _absorbing_step(model, graph, batch, fused)
    else:
        x, work = _uniform_step(model, graph, batch)
        masks_left = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # no mask state
    _advance(jobs, x, masks_left)
    return work


def _advance(jobs: Sequence[Job], x: torch.Tensor, masks_left: torch.Tensor) -> None:
    """Hand each job its rows of the step's result, fixed text written back (the uniform graph draws every
    position, so without it step records and the final answer could show kept text changed). A greedy
    job's rows become copies of its first row, the one its step decided."""
    start = 0
    for job in jobs:
        rows = slice(start, start + job.rows)
        if job.controls.greedy and job.rows > 1:
            job.x = x[start].expand(job.rows, -1).clone()
            job.masks_left = masks_left[start].expand(job.rows).clone()
        else:
            job.x, job.masks_left = x[rows], masks_left[rows]
        job.step_index += 1
        job.restore_fixed()
        start += job.rows


@torch.inference_mode()
def masked_log_probs(model, graph: Graph, noise: Noise, jobs: Sequence[Job]) -> torch.Tensor:
    """What the jobs' next step would draw from, without drawing or advancing them (absorbing graph).

    The log probabilities (N, V) at the rows' masked positions, row-major: log(coef S' q'_y) for the real
    tokens (q' the clean-token distribution after the job's controls) and log(1 - coef S') for staying
    masked, -inf where a probability is not positive. With the default controls these are the euler /
    analytic / denoise probabilities of the module docstring, unnormalised as the authors' are where
    coef S' > 1 (the draw then reveals for certain). Greedy jobs (temperature 0) draw nothing: refused."""
    if not graph.absorb:
        raise ValueError("masked_log_probs is for the absorbing graph")
    if any(job.controls.greedy for job in jobs):
        raise ValueError("a job at temperature 0 is deterministic: it has no distribution to show")
    batch = StepBatch.of(noise, jobs)
    scores = _masked_log_scores(model, graph, batch)
    if scores is None:
        return torch.empty(0, graph.dim, device=batch.x.device)
    peak, mass = masked_stats(scores.log_score)
    reveal = scores.coef.double() * mass.double() * peak.double().exp()  # coef * S'
    weights = token_weights(scores.real, peak, position_controls(batch.job_spans(scores.counts), batch.x.device))
    log_q = weights.log() - weights.sum(dim=1, keepdim=True).log()
    stay = torch.where(scores.may_stay & (reveal < 1), torch.log1p(-reveal.clamp_max(1)), -torch.inf)
    return torch.cat([log_q + reveal.log()[:, None], stay[:, None]], dim=1).float()


def _masked_log_scores(model, graph: Graph, batch: StepBatch) -> MaskedScores | None:
    """The network's log scores at the batch's masked positions, or None when no position is masked."""
    x = batch.x
    masked = (x == graph.mask).reshape(-1)
    counts = masked.view(x.shape).sum(dim=1).tolist()  # the step's one host sync: it sizes the output
    total = sum(counts)
    if total == 0:
        return None
    index = _nonzero(masked, total)  # flat masked positions, row-major
    row_of = torch.div(index, x.shape[1], rounding_mode="floor")
    out = _workspace.get("scores", total, graph.dim, x.device) if x.device.type == "cpu" else None
    log_score = model.log_score_at_index(x, batch.sigma, index, out=out, row_of=row_of)
    return MaskedScores(log_score, batch.absorbing_coefficient()[row_of], (batch.kind != DENOISE)[row_of],
                        index, counts, row_of)


def masked_stats(log_score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(peak, mass) of each row of (N, V) log scores over its real tokens (all columns but the last):
    the largest log score, and the sum of exp(log score - peak), both float32. S' = mass * e^peak.
    The fused step's maths (`compiled_masked_stats`); `_masked_stats_in_place` computes the same."""
    real = log_score[:, :-1].float()
    peak = real.amax(dim=-1)
    safe = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return peak, (real - safe[:, None]).exp().sum(dim=-1)


_compiled_stats = None


def compiled_masked_stats(log_score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`masked_stats` through torch.compile: generated kernels read the log scores once and write only
    the (N,) results. Compiled on first use, once: the masked count N is marked dynamic (the vocabulary
    stays static), and a single position is padded to two so that N = 1 does not get a graph of its own
    in the middle of a run."""
    global _compiled_stats
    if _compiled_stats is None:
        _compiled_stats = torch.compile(masked_stats)
    n = log_score.shape[0]
    if n == 1:
        log_score = torch.cat([log_score, log_score])
    torch._dynamo.mark_dynamic(log_score, 0)
    peak, mass = _compiled_stats(log_score)
    return peak[:n], mass[:n]


def _masked_stats_in_place(scores: MaskedScores, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`masked_stats` with the exponentials in a reused scratch buffer instead of new memory."""
    real = scores.real
    scratch = _workspace.get("scratch", real.shape[0], real.shape[1], device)
    peak = real.amax(dim=-1)
    safe = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    torch.sub(real, safe[:, None], out=scratch).exp_()
    return peak, scratch.sum(dim=-1)


def _reveal_probability(scores: MaskedScores, peak: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """r = coef * S' per position in float64, 1 where the position may not stay masked (a final denoise,
    or coef * S' >= 1: p_mask would not be positive)."""
    r = scores.coef.double() * mass.double() * peak.double().exp()
    return torch.where(scores.may_stay & (r < 1), r, torch.ones_like(r))


def _absorbing_step(model, graph: Graph, batch: StepBatch, fused: bool):
    """(x after the step, positions that got the vocabulary-wide maths, masks left per row)."""
    x = batch.x
    scores = _masked_log_scores(model, graph, batch)
    if scores is None:
        return x, 0, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    peak, mass = compiled_masked_stats(scores.log_score) if fused else _masked_stats_in_place(scores, x.device)
    choice = _absorbing_choice(graph, batch, scores, peak, mass)
    x.view(-1).index_copy_(0, scores.index, choice)  # x is this step's own copy (torch.cat)
    left = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return x, len(scores.index), left.index_add_(0, scores.row_of, (choice == graph.mask).long())


def _absorbing_choice(graph: Graph, batch: StepBatch, scores: MaskedScores, peak: torch.Tensor,
                      mass: torch.Tensor) -> torch.Tensor:
    """The token (or the mask, to stay) at each masked position: random jobs reveal where u < r and draw
    the token from q' with a second uniform; greedy jobs reveal by the schedule and confidence."""
    device = batch.x.device
    n = len(scores.index)
    spans = batch.job_spans(scores.counts)
    uniforms = _uniforms(spans, n, device)  # greedy jobs' positions get 2: never revealed by a draw
    choice = torch.full((n,), graph.mask, dtype=torch.long, device=device)
    at = _nonzero(uniforms[:, 0] < _reveal_probability(scores, peak, mass))
    if len(at):
        controls = position_controls(batch.job_spans(scores.counts), batch.x.device)
        choice[at] = draw_tokens(scores.real[at], peak[at], uniforms[at, 1],
                                  None if controls is None else controls.take(at))
    for span in spans:
        if span.job.controls.greedy and span.end > span.start:
            found = _greedy_reveals(span, batch.noise, scores, mass)
            if found is not None:
                choice[found[0]] = found[1]
    return choice


def _uniforms(spans: Sequence[JobSpan], n: int, device) -> torch.Tensor:
    """(n, 2) float64 uniforms, each job's positions from its own generator: column 0 decides reveal (or
    move), column 1 the token. Greedy jobs draw none (their rows get 2, which no probability exceeds)."""
    out = torch.full((n, 2), 2.0, dtype=torch.float64, device=device)
    for job, _, start, end in spans:
        if end > start and not job.controls.greedy:
            torch.rand((end - start, 2), generator=job.generator, dtype=torch.float64, device=device,
                       out=out[start:end])
    return out


def _schedule_masked_share(noise: Noise, t: float) -> float:
    """The share of positions the forward process has masked at time t: 1 - e^-sigma(t)."""
    return float(-torch.expm1(-noise.total(torch.tensor(max(t, 0.0), dtype=torch.float64))))


def _greedy_reveals(span: JobSpan, noise: Noise, scores: MaskedScores,
                    mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A greedy job's step, decided on its first row: (positions to reveal, their tokens), or None.

    After a predictor step from t to s = t - dt, round(free * share(s) / share(1)) positions stay masked,
    share(t) = 1 - e^-sigma(t) being the schedule's masked share (whichever predictor); the final denoise
    reveals every one left. The revealed ones are those whose most likely token is the most likely (the
    smallest mass: the top probability is 1 / mass), ties to the earlier position; each takes its most
    likely token (ties to the lower id)."""
    job, masked = span.job, scores.counts[span.row]
    kind, t, dt = job.next_action()
    if kind == DENOISE:
        reveal = masked
    else:
        share = _schedule_masked_share(noise, t - dt) / _schedule_masked_share(noise, job.grid[0])
        reveal = masked - math.floor(job.free_positions * share + 0.5)
    if reveal <= 0:
        return None
    at = span.start + torch.sort(mass[span.start : span.start + masked], stable=True).indices[:reveal]
    return at, scores.real[at].argmax(dim=1)


def _uniform_step(model, graph: Graph, batch: StepBatch) -> tuple[torch.Tensor, int]:
    """The uniform graph's step: the vocabulary-wide probs at every position, then "move or stay" with
    one uniform and the token among the moves (reshaped by the controls) with another."""
    if any(job.controls.greedy for job in batch.jobs):
        raise ValueError("temperature 0 needs an absorbing-graph model: the uniform graph starts from random "
                         "tokens, so no request on it is deterministic")
    x, kind = batch.x, batch.kind
    score = model(x, batch.sigma).float().exp()
    probs = torch.empty(*x.shape, graph.dim, device=x.device)
    for k in kind.unique().tolist():
        rows = kind == k
        if k == EULER:
            probs[rows] = graph.euler_probs(x[rows], score[rows], batch.dt[rows, None], batch.dsigma_rate[rows, None])
        elif k == ANALYTIC:
            probs[rows] = graph.analytic_probs(x[rows], score[rows], batch.ds[rows, None])
        else:
            probs[rows] = graph.denoise_probs(x[rows], score[rows], batch.sigma[rows, None])
    weights = probs.view(-1, graph.dim).clamp_min_(0)  # the authors' draw gives no weight to p <= 0 too
    current = x.reshape(-1)
    total = weights.sum(dim=1, dtype=torch.float64)
    stay = weights.gather(1, current[:, None]).squeeze(1).double()
    move = torch.where(total > 0, (total - stay) / total, torch.zeros_like(total))
    weights.scatter_(1, current[:, None], 0.0)  # what remains: the moves
    counts = [x.shape[1]] * x.shape[0]
    uniforms = _uniforms(batch.job_spans(counts), len(current), x.device)
    at = _nonzero(uniforms[:, 0] < move)
    choice = current.clone()
    if len(at):
        log_w = weights[at].log()
        controls = position_controls(batch.job_spans(counts), batch.x.device)
        choice[at] = draw_tokens(log_w, log_w.amax(dim=1), uniforms[at, 1],
                                  None if controls is None else controls.take(at))
    return choice.view_as(x), choice.numel()


def _nonzero(flags: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Indices of the set entries of a 1-D bool tensor; with their count known, no second sync on a GPU."""
    if count is not None and flags.device.type != "cpu" and hasattr(torch, "nonzero_static"):
        try:
            return torch.nonzero_static(flags, size=count).squeeze(1)
        except (NotImplementedError, RuntimeError):  # not on this device in this PyTorch version
            pass
    return flags.nonzero().squeeze(1)
