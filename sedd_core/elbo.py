"""The diffusion ELBO of token windows: the estimator's maths, its draws, and the one loop that runs it.

What is estimated. For a window x0 of the model's length L, the bound of Lou, Meng and Ermon, *Discrete
Diffusion Modeling by Estimating the Ratios of the Data Distribution* (ICML 2024; eq. 17 / Thm. 3.6) is

    -log p(x0) <= int_0^1 dsigma/dt(t) E_{x_t ~ p_t|0(. | x0)} [ sum_i score entropy_i(x_t, x0) ] dt,

with sigma the noise schedule. One draw is what the authors' `get_loss_fn(noise, graph, train=False)`
(`losses.py` of louaaron/Score-Entropy-Discrete-Diffusion) computes for one row: t ~ U(eps, 1) with
eps = 1e-3, x_t from the forward process at sigma(t), and the integrand at (t, x_t). The estimate is
the mean over `samples` independent draws; its standard error is the draws' standard deviation /
sqrt(samples). Two details are the authors' and are kept so the numbers compare with theirs
(tests/data/reference/tiny-five-score): the integral over [0, eps) is replaced by reading [eps, 1]
with density 1 / (1 - eps) (a 0.1% stretch), and the paper's prior term KL(p_1|0(. | x0) || p_base)
is left out (with the log-linear schedule a token is still unmasked at t = 1 with probability eps, so
the term is small but not zero).

Randomness. Every draw comes from its own CPU generator, seeded from (seed, the window's tokens, how
many identical windows of its group precede it, the draw's index). A result therefore depends on the
seed, the windows and `samples` only (up to float rounding, which differs between devices and batch
shapes): not on the chunk size or the other windows computed beside it. Single draws are heavy-tailed
(most near zero, rare large ones when t is near 1 and most of a window is masked), so with few samples
the standard error is itself unreliable: use 100 or more.

Pieces: `elbo_rows` (one chunk of rows, the maths), `ElboDraws` (windows x draws, computed a bounded
chunk at a time: `run` to the end, or `step` by `step` on the server's engine thread), and
`elbo_draws` (windows in, draws out, in one call). Texts and text files: `evaluate.py`.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch

from .graph import Graph
from .losses import SAMPLING_EPS
from .noise import Noise

Progress = Callable[[int], object]  # called with the number of rows just computed
LOG_SCORE_BYTES = 1 << 30  # default chunk: at most ~1 GiB of float32 log scores


class ScoreError(ValueError):
    """Bad scoring input; the message says what to fix."""


def elbo_rows(model, graph: Graph, noise: Noise, x0: torch.Tensor, t: torch.Tensor,
              x_t: torch.Tensor) -> torch.Tensor:
    """One draw of the bound per row: sum over positions of dsigma/dt(t) * score entropy at x_t, in
    nats, as float64 on the CPU. x0 and x_t (R, L) long and t (R,) on the model's device.

    The same per-row value as `losses.score_entropy_loss` (the authors' loss) given the same t and
    x_t, except at positions where x0 itself holds the mask token (absorbing graph): those are held
    masked and count nothing. So a window of n < L real tokens padded with masks is scored as follows:
    the forward process never moves a mask, the network sees the padding masked at every t, and only
    the n real positions have loss. The result is the ELBO of the reverse process that fills those n
    positions while the rest of the canvas stays masked, which is how the sampler fills part of a
    canvas. Masked positions say nothing about the tokens under them in the absorbing process, so for
    an exact score network this bounds -log p(x_1..n), p the model's probability that a sequence of
    L tokens has these n tokens there (for padding at the end: begins with them); it is not the
    probability of a document that ends after them.

    With the absorbing graph the log score is asked for only at the positions that count (masked in
    x_t, real in x0): a `FastSEDD` runner computes the vocabulary-wide output layer only there."""
    sigma, dsigma = noise(t)
    if not graph.absorb:
        log_score = model(x_t, sigma).float()
        entropy = graph.score_entropy(log_score, sigma[:, None], x_t, x0)
        return (dsigma[:, None] * entropy).sum(dim=-1).double().cpu()
    counted = (x_t == graph.mask) & (x0 != graph.mask)
    index = counted.reshape(-1).nonzero().squeeze(1)
    loss = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    if index.numel():
        row_of = torch.div(index, x0.shape[1], rounding_mode="floor")
        log_score = model.log_score_at_index(x_t, sigma, index, row_of=row_of)  # (N, V)
        entropy = graph.score_entropy(log_score, sigma[row_of], x_t.reshape(-1)[index], x0.reshape(-1)[index])
        loss.index_add_(0, row_of, (dsigma[row_of] * entropy).double())
    return loss.cpu()


def _window_keys(windows: torch.Tensor, seed: int, groups: Sequence[int] | None) -> list[bytes]:
    """A key per window: the seed, its tokens, and how many identical windows of its group precede it."""
    seen: dict[tuple[int, bytes], int] = {}
    keys = []
    for i, row in enumerate(windows):
        content = row.numpy().astype("<i8").tobytes()
        group = 0 if groups is None else groups[i]
        repeat = seen.get((group, content), 0)
        seen[(group, content)] = repeat + 1
        keys.append(hashlib.blake2b(content, digest_size=16, key=f"{seed}/{repeat}".encode()).digest())
    return keys


def _draw(graph: Graph, noise: Noise, x0: torch.Tensor, key: bytes, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, x_t) of one row on the CPU: t ~ U(eps, 1) as the authors draw it, x_t ~ forward(x0, sigma(t))."""
    seed = int.from_bytes(hashlib.blake2b(draw.to_bytes(8, "little"), digest_size=8, key=key).digest(), "little")
    generator = torch.Generator().manual_seed(seed)
    t = (1 - SAMPLING_EPS) * torch.rand(1, generator=generator) + SAMPLING_EPS
    x_t = graph.sample_transition(x0[None], noise.total(t)[:, None], generator=generator)
    return t, x_t[0]


def check_windows(windows: torch.Tensor, graph: Graph) -> None:
    if windows.dim() != 2 or windows.dtype != torch.long:
        raise ScoreError(f"token windows must be a (windows, length) long tensor, got {tuple(windows.shape)} "
                         f"{windows.dtype}")
    if windows.numel() and not 0 <= int(windows.min()) <= int(windows.max()) < graph.dim:
        raise ScoreError(f"token ids must lie in [0, {graph.dim}); got {int(windows.min())}..{int(windows.max())}")


def check_samples(samples) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ScoreError(f"samples must be a whole number of at least 1, got {samples!r}")
    return samples


def default_rows(length: int, vocab: int) -> int:
    """Rows per chunk so that the worst case (every position counted) holds ~1 GiB of log scores."""
    return max(1, min(256, LOG_SCORE_BYTES // (4 * length * vocab)))


class ElboDraws:
    """`samples` draws of the bound for each of a set of windows (W, L), as rows (window, draw) that
    `step` computes a bounded chunk at a time; `draws` (W, samples) holds the results in nats.

    `groups` (one int per window) scopes the repeat count in the draws' seeds: identical windows of one
    group get different draws (they are independent), identical windows of different groups the same."""

    def __init__(self, windows: torch.Tensor, samples: int, seed: int = 0, groups: Sequence[int] | None = None):
        self.windows = windows.detach().to("cpu", torch.long)
        self.samples = check_samples(samples)
        self.draws = torch.zeros(len(self.windows), self.samples, dtype=torch.float64)
        self.rows_done = 0
        self._keys = _window_keys(self.windows, int(seed), groups)

    @property
    def total_rows(self) -> int:
        return self.draws.numel()

    @property
    def done(self) -> bool:
        return self.rows_done >= self.total_rows

    @torch.inference_mode()
    def step(self, model, graph: Graph, noise: Noise, max_rows: int) -> int:
        """Compute the next `max_rows` rows (fewer at the end); returns how many. `model`: a `SEDD` or a
        `FastSEDD` runner over one; the network runs in eval mode (dropout off, as the authors'
        train=False) and is put back in its mode afterwards."""
        rows = range(self.rows_done, min(self.total_rows, self.rows_done + max(1, int(max_rows))))
        if not rows:
            return 0
        drawn = [_draw(graph, noise, self.windows[r // self.samples], self._keys[r // self.samples],
                       r % self.samples) for r in rows]
        network = model if isinstance(model, torch.nn.Module) else model.model  # FastSEDD wraps a SEDD
        device = next(network.parameters()).device
        x0 = self.windows[[r // self.samples for r in rows]].to(device)
        t = torch.cat([d[0] for d in drawn]).to(device)
        x_t = torch.stack([d[1] for d in drawn]).to(device)
        training = network.training
        network.eval()
        try:
            loss = elbo_rows(model, graph, noise, x0, t, x_t)
        finally:
            network.train(training)
        self.draws.view(-1)[rows.start:rows.stop] = loss
        self.rows_done = rows.stop
        return len(rows)

    def run(self, model, graph: Graph, noise: Noise, max_rows: int, progress: Progress | None = None) -> None:
        """Every remaining row, `max_rows` a chunk: the loop of every caller but the server's engine, which
        interleaves the same chunks with denoising steps."""
        while not self.done:
            done = self.step(model, graph, noise, max_rows)
            if progress is not None:
                progress(done)

    def estimates(self) -> list[tuple[float, float]]:
        """(mean in nats, variance of that mean) per window; the variance is nan with one draw."""
        mean = self.draws.mean(dim=1)
        var = self.draws.var(dim=1) / self.samples if self.samples > 1 else torch.full_like(mean, math.nan)
        return list(zip(mean.tolist(), var.tolist()))


def elbo_draws(model, graph: Graph, noise: Noise, windows: torch.Tensor, samples: int, seed: int = 0,
               batch_size: int = 64, progress: Progress | None = None) -> torch.Tensor:
    """(W, samples) draws of the bound, in nats, for `windows` (W, L) of the model's length L; their mean
    over dim 1 is each window's estimate. Mask tokens in a window (absorbing graph) are held masked and
    not counted (see `elbo_rows`). `model`: a plain `SEDD` (a model in training, EMA weights put in place
    by the caller if wanted) or a `FastSEDD` runner (`lm.runner`: faster, it computes the output layer
    only where the loss counts)."""
    check_windows(windows, graph)
    work = ElboDraws(windows, samples, seed)
    work.run(model, graph, noise, batch_size, progress)
    return work.draws
