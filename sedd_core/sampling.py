"""Denoising steps for a batch of jobs, each row at its own diffusion time.

A `Job` is one request's rows: its tokens, the positions it holds fixed (prefix,
suffix, any given token), its time grid, predictor and random generator. The
authors' `pc_sampler` is `steps` predictor steps on linspace(1, 1e-5, steps + 1)
followed by one final denoise; `Job.next_action` walks that grid one step at a
time so that a scheduler can batch jobs that sit at different points of it.

`denoising_step` runs ONE model pass for all the rows of the jobs it is given and
advances each job by one step. For the absorbing graph only masked positions get
the output layer and the vocabulary-wide maths; there all three updates have the
same shape (SPEC section 4, with S' the sum of the ratios to real tokens):

    euler:    p_y = dt * dsigma/dt * s_y,   p_mask = 1 - (dt * dsigma/dt) * S'
    analytic: p_y = (e^ds - 1) * s_y,       p_mask = 1 - (e^ds - 1) * S'
    denoise:  p_y = (e^sigma - 1) * s_y,    p_mask = 0

so rows with different predictors and times share one pass and one kernel.
The uniform graph uses the faithful vocabulary-wide formulas of `graph.py`.

Speed: a step waits for the device once (the count of masked positions, which
sizes the output); the (positions x vocabulary) maths run in place on the
output layer's result, and on a CPU into buffers reused from step to step.
`denoising_step(..., fused=True)` runs those maths and the Gumbel-max draw as one
torch.compile'd pass instead (`gumbel_max_choice`), which reads the output once;
it is for GPUs, where the unfused maths are a chain of memory-bound kernels. The
in-place path stays the reference and the default.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

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
    step_index: int = 0
    masks_left: torch.Tensor | None = None  # long (n,) on the device: positions still masked after the last step
    gaps: tuple[tuple[int, int], ...] = ()  # token positions [start, end) of each generated gap, for outputs
    grid: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if self.predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {self.predictor!r}; use one of {', '.join(PREDICTORS)}")
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        self.grid = time_grid(self.steps).tolist()
        self.project()

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def length(self) -> int:
        return self.x.shape[1]

    @property
    def done(self) -> bool:
        return self.step_index > self.steps

    def next_action(self) -> tuple[int, float, float]:
        """(kind, t, dt) of the next update: a predictor step, then the final denoise."""
        if self.step_index < self.steps:
            kind = ANALYTIC if self.predictor == "analytic" else EULER
            return kind, self.grid[self.step_index], (1 - FINAL_TIME) / self.steps
        return DENOISE, self.grid[-1], 0.0

    def project(self) -> None:
        """Write the fixed positions back into x (at creation and after every step, so x always holds them)."""
        if self.fixed is not None:
            self.x = torch.where(self.fixed, self.fixed_tokens, self.x)

    def current_t(self) -> float:
        return self.grid[min(self.step_index, self.steps)]


def _row_coefficients(noise: Noise, jobs: Sequence[Job], device) -> tuple[torch.Tensor, ...]:
    """Per row: kind, sigma at which the score is taken, and the update's ds / dt * dsigma/dt."""
    kinds, ts, dts = [], [], []
    for job in jobs:
        kind, t, dt = job.next_action()
        kinds += [kind] * job.rows
        ts += [t] * job.rows
        dts += [dt] * job.rows
    kind = torch.tensor(kinds, device=device)
    t = torch.tensor(ts, device=device, dtype=torch.float32)
    dt = torch.tensor(dts, device=device, dtype=torch.float32)
    sigma, dsigma_rate = noise(t)
    return kind, t, dt, sigma, dsigma_rate


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


def _gumbel_draws(shape_rows: Sequence[int], width: int, generators: Sequence[torch.Generator | None],
                  device) -> torch.Tensor:
    """The random draws behind the Gumbel noise, each group of rows from its own generator:
    uniforms on a CPU (exponential_ is slow there), exponentials on a GPU (one kernel)."""
    device = torch.device(device)
    out = _workspace.get("noise", sum(shape_rows), width, device)
    start = 0
    for n, gen in zip(shape_rows, generators):
        if n:
            if device.type == "cpu":
                torch.rand((n, width), generator=gen, device=device, out=out[start : start + n])
            else:
                out[start : start + n].exponential_(generator=gen)
        start += n
    return out


def _gumbel(shape_rows: Sequence[int], width: int, generators: Sequence[torch.Generator | None], device):
    """Log of exponential noise for each group of rows, in place on the draws.

    On a CPU: log(1e-10 - log(u + 1e-10)) from uniforms, the authors' formula. On a GPU: log(E) with
    E from exponential_, which saves four passes over (positions x vocabulary) memory. Same
    distribution; a seed's stream differs between the two."""
    out = _gumbel_draws(shape_rows, width, generators, device)
    if out.device.type == "cpu":
        return out.add_(1e-10).log_().neg_().add_(1e-10).log_()
    return out.log_()


def _advance(jobs: Sequence[Job], x: torch.Tensor, masks_left: torch.Tensor) -> None:
    """Hand each job its rows of the step's result, fixed text written back (the uniform graph draws every
    position, so without it step records and the final answer could show kept text changed)."""
    start = 0
    for job in jobs:
        job.x = x[start : start + job.rows]
        job.masks_left = masks_left[start : start + job.rows]
        job.step_index += 1
        job.project()
        start += job.rows


def _batch(noise: Noise, jobs: Sequence[Job]) -> tuple[torch.Tensor, ...]:
    """The jobs' rows (which hold their fixed text), stacked, with their per-row coefficients:
    (x, kind, t, dt, sigma, rate)."""
    if len({job.length for job in jobs}) != 1:
        raise ValueError("jobs in one pass must share a length; group them first")
    x = torch.cat([job.x for job in jobs])
    return (x, *_row_coefficients(noise, jobs, x.device))


@torch.inference_mode()
def denoising_step(model, graph: Graph, noise: Noise, jobs: Sequence[Job], fused: bool = False) -> int:
    """Advance every job by one step with one model pass. All jobs must share a length.

    `fused` (absorbing graph): the step maths and the draw as one torch.compile'd pass
    (`gumbel_max_choice`; for GPUs, compiles on the first steps) instead of the in-place kernels.
    Returns the number of positions that got the vocabulary-wide maths."""
    if not jobs:
        return 0
    x, kind, t, dt, sigma, dsigma_rate = _batch(noise, jobs)
    if graph.absorb:
        step = _fused_absorbing_step if fused else _absorbing_step
        x, work, masks_left = step(model, graph, noise, jobs, x, kind, t, dt, sigma, dsigma_rate)
    else:
        x, work = _general_step(model, graph, noise, jobs, x, kind, t, dt, sigma, dsigma_rate)
        masks_left = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # no mask state
    _advance(jobs, x, masks_left)
    return work


@torch.inference_mode()
def masked_log_probs(model, graph: Graph, noise: Noise, jobs: Sequence[Job]) -> torch.Tensor:
    """What the jobs' next step would draw from, without drawing or advancing them (absorbing graph).

    The unnormalised log probabilities (N, V) at the rows' masked positions, row-major: the fast path's
    log of the SPEC's euler / analytic / denoise probabilities (-inf where a probability is not positive)."""
    if not graph.absorb:
        raise ValueError("masked_log_probs is for the absorbing graph")
    x, kind, t, dt, sigma, dsigma_rate = _batch(noise, jobs)
    found = _absorbing_log_probs(model, graph, noise, x, kind, t, dt, sigma, dsigma_rate)
    return found[0].clone() if found else torch.empty(0, graph.dim, device=x.device)


def _absorbing_log_probs(model, graph, noise, x, kind, t, dt, sigma, dsigma_rate):
    """(log probs (N, V) at the masked positions, their flat index, masked count per row, row of each
    position), or None when no position is masked. On a CPU the log probs live in a workspace buffer that
    the next step reuses."""
    found = _masked_log_scores(model, graph, noise, x, kind, t, dt, sigma, dsigma_rate)
    if found is None:
        return None
    log_score, coef, mask_allowed, index, counts, row_of = found
    scratch = _workspace.get("noise", len(index), graph.dim, x.device)
    return _log_probs_in_place(log_score, coef, mask_allowed, scratch), index, counts, row_of


def _masked_log_scores(model, graph, noise, x, kind, t, dt, sigma, dsigma_rate):
    """What the step maths start from, or None when no position is masked: (log score (N, V) float32 at
    the masked positions, each position's coefficient and whether it may stay masked, both (N,),
    the positions' flat index, masked count per row, row of each position)."""
    masked = (x == graph.mask).reshape(-1)
    counts = masked.view(x.shape).sum(dim=1).tolist()  # the step's one host sync: it sizes the output
    total = sum(counts)
    if total == 0:
        return None
    index = _nonzero(masked, total)  # flat masked positions, row-major
    row_of = torch.div(index, x.shape[1], rounding_mode="floor")
    vocab = graph.dim
    out = _workspace.get("scores", total, vocab, x.device) if x.device.type == "cpu" else None
    log_score = model.log_score_at_index(x, sigma, index, out=out, row_of=row_of)

    ds = sigma - noise.total((t - dt).clamp_min(0))
    coef = torch.where(kind == EULER, dt * dsigma_rate, torch.expm1(torch.where(kind == DENOISE, sigma, ds)))
    return log_score, coef[row_of], (kind != DENOISE)[row_of], index, counts, row_of


def _log_probs_in_place(log_score: torch.Tensor, coef: torch.Tensor, mask_allowed: torch.Tensor,
                        scratch: torch.Tensor) -> torch.Tensor:
    """The step's log probs (N, V), written over `log_score`; `scratch` (N, V) holds temporaries.

    p_y = coef * s_y for the real tokens and p_mask = 1 - coef * S' (S' = sum of the s_y), or 0 where
    the mask may not stay (denoise). The reference for `step_log_probs`."""
    real = log_score[:, :-1]
    others = _log_sum_exp(real, scratch[:, :-1]).exp()  # S'
    p_mask = 1 - coef * others
    log_p_mask = torch.where(mask_allowed & (p_mask > 0), torch.log(p_mask.clamp_min(1e-38)), -torch.inf)
    real.add_(torch.log(coef)[:, None])
    log_score[:, -1] = log_p_mask
    return log_score


def _absorbing_step(model, graph, noise, jobs, x, kind, t, dt, sigma, dsigma_rate):
    found = _absorbing_log_probs(model, graph, noise, x, kind, t, dt, sigma, dsigma_rate)
    if found is None:
        return x, 0, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    logits, index, counts, row_of = found
    noise_log = _gumbel(_per_job(jobs, counts), graph.dim, [job.generator for job in jobs], x.device)
    choice = torch.argmax(logits.sub_(noise_log), dim=-1)  # Gumbel-max: argmax(logits - log E)
    x.view(-1).index_copy_(0, index, choice)  # x is this step's own copy (torch.cat)
    return x, len(index), _masks_left(x, row_of, choice, graph.mask)


def _fused_parts(log_score: torch.Tensor, coef: torch.Tensor, mask_allowed: torch.Tensor):
    """(log scores of the real tokens, log coef, log p_mask), float32. S' is the plain sum of exp(log score),
    as the authors take it (their sampler exponentiates the network's output), so that one loop over a
    row gives S' and the noisy maximum together."""
    real = log_score[:, :-1].float()
    p_mask = 1 - coef * real.exp().sum(dim=-1)
    log_p_mask = torch.where(mask_allowed & (p_mask > 0), torch.log(p_mask.clamp_min(1e-38)), -torch.inf)
    return real, torch.log(coef), log_p_mask


def step_log_probs(log_score: torch.Tensor, coef: torch.Tensor, mask_allowed: torch.Tensor) -> torch.Tensor:
    """The fused path's log probs (N, V) as a new tensor: what `gumbel_max_choice` draws from, and
    `_log_probs_in_place`'s maths up to float32 rounding."""
    real, log_coef, log_p_mask = _fused_parts(log_score, coef, mask_allowed)
    return torch.cat([real + log_coef[:, None], log_p_mask[:, None]], dim=1)


def gumbel_max_choice(log_score: torch.Tensor, coef: torch.Tensor, mask_allowed: torch.Tensor,
                      draws: torch.Tensor, uniform: bool) -> torch.Tensor:
    """The step's token choice at each masked position (N,): argmax(log p - log noise), the Gumbel-max
    draw from `step_log_probs`, without materialising the log probs. `draws` (N, V) are `_gumbel_draws`:
    uniforms (`uniform`, turned into exponentials by the authors' -log(u)) or exponentials.

    log coef is the same for a row's real tokens, so their best is argmax(log s - log noise); the mask
    column wins only where its own noisy value is higher. Every reduction reads the row once, in one
    loop when compiled (`compiled_gumbel_max_choice`)."""
    if uniform:
        noise_log = torch.log(torch.log(draws + 1e-10).neg() + 1e-10)
    else:
        noise_log = torch.log(draws)
    real, log_coef, log_p_mask = _fused_parts(log_score, coef, mask_allowed)
    best_value, best = (real - noise_log[:, :-1]).max(dim=-1)
    stay = log_p_mask - noise_log[:, -1] > best_value + log_coef  # ties go to the lower index, as argmax
    return torch.where(stay, real.shape[1], best)


_compiled_choice = None


def compiled_gumbel_max_choice(log_score: torch.Tensor, coef: torch.Tensor, mask_allowed: torch.Tensor,
                               draws: torch.Tensor, uniform: bool) -> torch.Tensor:
    """`gumbel_max_choice` through torch.compile: generated kernels read the log scores and draws once
    and write only the (N,) choices. Compiled on first use, once: the masked count N is marked dynamic
    (the vocabulary stays static), and a single position is padded to two so that N = 1 does not get a
    graph of its own in the middle of a run."""
    global _compiled_choice
    if _compiled_choice is None:
        _compiled_choice = torch.compile(gumbel_max_choice)
    n = log_score.shape[0]
    if n == 1:
        log_score, coef, mask_allowed, draws = (torch.cat([v, v]) for v in (log_score, coef, mask_allowed, draws))
    for value in (log_score, coef, mask_allowed, draws):
        torch._dynamo.mark_dynamic(value, 0)
    return _compiled_choice(log_score, coef, mask_allowed, draws, uniform)[:n]


def _fused_absorbing_step(model, graph, noise, jobs, x, kind, t, dt, sigma, dsigma_rate):
    found = _masked_log_scores(model, graph, noise, x, kind, t, dt, sigma, dsigma_rate)
    if found is None:
        return x, 0, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    log_score, coef, mask_allowed, index, counts, row_of = found
    draws = _gumbel_draws(_per_job(jobs, counts), graph.dim, [job.generator for job in jobs], x.device)
    choice = compiled_gumbel_max_choice(log_score, coef, mask_allowed, draws, x.device.type == "cpu")
    x.view(-1).index_copy_(0, index, choice)
    return x, len(index), _masks_left(x, row_of, choice, graph.mask)


def _masks_left(x: torch.Tensor, row_of: torch.Tensor, choice: torch.Tensor, mask: int) -> torch.Tensor:
    """Masked count per row after the step: this step's masked positions that drew the mask again
    (no count over x, no host sync)."""
    left = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return left.index_add_(0, row_of, (choice == mask).long())


def _per_job(jobs: Sequence[Job], counts: list[int]) -> list[int]:
    """Per-row counts summed over each job's rows."""
    sums, start = [], 0
    for job in jobs:
        sums.append(sum(counts[start : start + job.rows]))
        start += job.rows
    return sums


def _nonzero(flags: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the set entries of a 1-D bool tensor whose count is known (no second sync on a GPU)."""
    if flags.device.type != "cpu" and hasattr(torch, "nonzero_static"):
        try:
            return torch.nonzero_static(flags, size=count).squeeze(1)
        except (NotImplementedError, RuntimeError):  # not on this device in this PyTorch version
            pass
    return flags.nonzero().squeeze(1)


def _log_sum_exp(values: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of (N, W) `values`, using `scratch` (N, W) instead of new memory."""
    peak = values.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    torch.sub(values, peak, out=scratch).exp_()
    return scratch.sum(dim=-1).log_().add_(peak.squeeze(-1))


def _general_step(model, graph, noise, jobs, x, kind, t, dt, sigma, dsigma_rate):
    score = model(x, sigma).float().exp()
    probs = torch.empty(*x.shape, graph.dim, device=x.device)
    ds = sigma - noise.total((t - dt).clamp_min(0))
    for k in kind.unique().tolist():
        rows = kind == k
        if k == EULER:
            probs[rows] = graph.euler_probs(x[rows], score[rows], dt[rows, None], dsigma_rate[rows, None])
        elif k == ANALYTIC:
            probs[rows] = graph.analytic_probs(x[rows], score[rows], ds[rows, None])
        else:
            probs[rows] = graph.denoise_probs(x[rows], score[rows], sigma[rows, None])
    logits = torch.where(probs > 0, torch.log(probs.clamp_min(1e-38)), -torch.inf).flatten(0, 1)
    noise_log = _gumbel([job.rows * job.length for job in jobs], graph.dim, [j.generator for j in jobs], x.device)
    choice = torch.argmax(logits.sub_(noise_log), dim=-1)
    return choice.view_as(x), choice.numel()
