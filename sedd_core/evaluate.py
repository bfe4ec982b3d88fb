"""The diffusion ELBO of token sequences: one estimator for `sedd score`, `sedd eval`, the trainer's
held-out loss and the server's `/v1/score`.

What is estimated. For a window x0 of the model's length L, the paper's bound (Lou et al. 2024,
eq. 17 / Thm. 3.6) is

    -log p(x0) <= int_0^1 dsigma/dt(t) E_{x_t ~ p_t|0(. | x0)} [ sum_i score entropy_i(x_t, x0) ] dt,

with sigma the noise schedule. One draw is what the authors' `get_loss_fn(noise, graph,
train=False)` computes for one row: t ~ U(eps, 1) with eps = 1e-3, x_t from the forward process at
sigma(t), and the integrand at (t, x_t). The estimate is the mean over `samples` independent draws;
its standard error is the draws' standard deviation / sqrt(samples). Two details are the authors'
and are kept so the numbers compare with theirs (tests/data/reference/tiny-five-score): the integral
over [0, eps) is replaced by reading [eps, 1] with density 1 / (1 - eps) (a 0.1% stretch), and the
paper's prior term KL(p_1|0(. | x0) || p_base) is left out (with the log-linear schedule a token is
still unmasked at t = 1 with probability eps, so the term is small but not zero).

Windows. A text longer than L tokens is cut into consecutive windows of L; each is scored on its own
(no context from the previous one), so the sum of their bounds bounds the NLL of the text under the
model that writes it window by window; their variances add. A text, or last window, of n < L tokens
is scored with positions n..L-1 holding the mask token: see `elbo_rows` for what that bound means.
The uniform graph has no mask token, so it takes full windows only (a text of a multiple of L tokens).

Randomness. Every draw comes from its own CPU generator, seeded from (seed, the window's tokens,
how many identical windows precede it in its text, the draw's index). A result therefore depends on
the seed, the text and `samples` only (up to float rounding, which differs between devices and
batch shapes): not on the chunk size, the other texts of a request, or where a window sits in a
text (so the bounds of two texts add up to the bound of their concatenation when both are whole
windows). Single draws are heavy-tailed (most near zero, rare large ones when t is near 1 and most of
a window is masked), so with few samples the standard error is itself unreliable: use 100 or more.

Pieces: `elbo_rows` (one chunk of rows, the maths), `ElboDraws` (windows x draws, computed a bounded
chunk at a time: the server's engine thread calls `step`), `TextScores` (texts -> windows -> results),
and the one-call wrappers `elbo_draws`, `score_tokens`, `score_texts`, `held_out_bits`.
"""
from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from .graph import Graph
from .loading import LoadedModel
from .losses import SAMPLING_EPS
from .noise import Noise

Progress = Callable[[int], object]  # called with the number of rows just computed
LOG_SCORE_BYTES = 1 << 30  # default chunk: at most ~1 GiB of float32 log scores


class ScoreError(ValueError):
    """Bad scoring input; the message says what to fix."""


@dataclass(frozen=True)
class ScoreResult:
    text: str
    tokens: int
    nll_nats: float  # the ELBO estimate: an upper bound on -log p(text), in nats
    stderr_nats: float  # its Monte-Carlo standard error (nan with a single draw)
    bits_per_token: float  # nll_nats / (tokens ln 2)
    perplexity_bound: float  # exp(nll_nats / tokens)

    @classmethod
    def from_estimate(cls, text: str, tokens: int, nll_nats: float, variance: float) -> ScoreResult:
        return cls(text=text, tokens=tokens, nll_nats=nll_nats, stderr_nats=math.sqrt(variance),
                   bits_per_token=nll_nats / tokens / math.log(2), perplexity_bound=math.exp(nll_nats / tokens))

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the maths: one chunk of rows -------------------------------------------------------------

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


def check_windows(windows: torch.Tensor, graph: Graph, length: int | None = None) -> None:
    if windows.dim() != 2 or windows.dtype != torch.long:
        raise ScoreError(f"token windows must be a (windows, length) long tensor, got {tuple(windows.shape)} "
                         f"{windows.dtype}")
    if length is not None and windows.shape[1] != length:
        raise ScoreError(f"windows must have the model's length {length}, got {windows.shape[1]}")
    if windows.numel() and not 0 <= int(windows.min()) <= int(windows.max()) < graph.dim:
        raise ScoreError(f"token ids must lie in [0, {graph.dim}); got {int(windows.min())}..{int(windows.max())}")


def check_samples(samples) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ScoreError(f"samples must be a whole number of at least 1, got {samples!r}")
    return samples


def default_rows(length: int, vocab: int) -> int:
    """Rows per chunk so that the worst case (every position counted) holds ~1 GiB of log scores."""
    return max(1, min(256, LOG_SCORE_BYTES // (4 * length * vocab)))


# ---- windows x draws, a chunk at a time ----------------------------------------------------------

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

    def run(self, model, graph: Graph, noise: Noise, batch_size: int, progress: Progress | None = None) -> None:
        while not self.done:
            done = self.step(model, graph, noise, batch_size)
            if progress is not None:
                progress(done)

    def estimates(self) -> list[tuple[float, float]]:
        """(mean in nats, variance of that mean) per window; the variance is nan with one draw."""
        mean = self.draws.mean(dim=1)
        var = self.draws.var(dim=1) / self.samples if self.samples > 1 else torch.full_like(mean, math.nan)
        return list(zip(mean.tolist(), var.tolist()))


def elbo_draws(model, graph: Graph, noise: Noise, ids: torch.Tensor, samples: int, seed: int = 0,
               batch_size: int = 64, progress: Progress | None = None) -> torch.Tensor:
    """(W, samples) draws of the bound, in nats, for the windows `ids` (W, L) of the model's length."""
    check_windows(ids, graph)
    job = ElboDraws(ids, samples, seed)
    job.run(model, graph, noise, batch_size, progress)
    return job.draws


def score_tokens(model, graph: Graph, noise: Noise, ids: torch.Tensor, samples: int, seed: int = 0,
                 batch_size: int = 64, progress: Progress | None = None) -> list[tuple[float, float]]:
    """(nll_nats, stderr_nats) for each window of `ids` (W, L), L the model's length; mask tokens in a
    window (absorbing graph) are held masked and not counted (see `elbo_rows`). `model`: a plain `SEDD`
    (a model in training, EMA weights put in place by the caller if wanted) or a `FastSEDD` runner
    (`lm.runner`: faster, it computes the output layer only where the loss counts)."""
    check_windows(ids, graph)
    job = ElboDraws(ids, samples, seed)
    job.run(model, graph, noise, batch_size, progress)
    return [(mean, math.sqrt(var)) for mean, var in job.estimates()]


# ---- texts ----------------------------------------------------------------------------------------

class TextScores:
    """Texts -> windows of the model's length -> `ScoreResult`s. The constructor validates and tokenizes
    (cheap, any thread); `step(model, graph, noise, max_rows)` computes a bounded chunk on the device
    (the engine thread); `results()` once `done`."""

    def __init__(self, lm: LoadedModel, texts: str | Sequence[str], samples: int = 128, seed: int = 0):
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ScoreError("no text to score: give at least one")
        check_samples(samples)
        self.texts = texts
        self.token_counts: list[int] = []
        windows, groups = [], []
        for i, text in enumerate(texts):
            ids = encode_for_scoring(lm, text, i if len(texts) > 1 else None)
            self.token_counts.append(len(ids))
            for start in range(0, len(ids), lm.length):
                window = ids[start:start + lm.length]
                if len(window) < lm.length:  # the last window: the rest of the canvas held masked
                    window = window + [lm.graph.mask] * (lm.length - len(window))
                windows.append(window)
                groups.append(i)
        self.groups = groups
        self.job = ElboDraws(torch.tensor(windows, dtype=torch.long), samples, seed, groups)

    @property
    def total_rows(self) -> int:
        return self.job.total_rows

    @property
    def rows_done(self) -> int:
        return self.job.rows_done

    @property
    def done(self) -> bool:
        return self.job.done

    def step(self, model, graph: Graph, noise: Noise, max_rows: int) -> int:
        return self.job.step(model, graph, noise, max_rows)

    def results(self) -> list[ScoreResult]:
        if not self.done:
            raise RuntimeError(f"scoring is not finished ({self.rows_done} of {self.total_rows} rows)")
        nll = [0.0] * len(self.texts)
        var = [0.0] * len(self.texts)
        for group, (mean, variance) in zip(self.groups, self.job.estimates()):
            nll[group] += mean
            var[group] += variance
        return [ScoreResult.from_estimate(text, n, nll[i], var[i])
                for i, (text, n) in enumerate(zip(self.texts, self.token_counts))]


def encode_for_scoring(lm: LoadedModel, text, index: int | None = None) -> list[int]:
    which = "the text" if index is None else f"text {index}"
    if not isinstance(text, str):
        raise ScoreError(f"{which} must be a string, got {type(text).__name__}")
    if not text:
        raise ScoreError(f"{which} is empty: give at least one character to score")
    unknown = lm.tokenizer.unknown_characters(text)
    if unknown:
        raise ScoreError(f"{which} holds characters this model's vocabulary cannot encode: "
                         f"{', '.join(repr(c) for c in unknown[:20])}; remove or replace them")
    ids = lm.tokenizer.encode(text)
    if not lm.graph.absorb and len(ids) % lm.length:
        raise ScoreError(
            f"{which} has {len(ids)} tokens; this model uses the uniform graph, which has no mask token to "
            f"hold the rest of a short window, so it scores texts of a multiple of {lm.length} tokens only")
    return ids


def score_texts(lm: LoadedModel, texts: str | Sequence[str], samples: int = 128, seed: int = 0,
                batch_size: int | None = None, progress: Progress | None = None) -> list[ScoreResult]:
    """The ELBO bound of each text (see the module docstring for what exactly is estimated)."""
    scores = TextScores(lm, texts, samples, seed)
    rows = batch_size or default_rows(lm.length, lm.graph.dim)
    while not scores.done:
        done = scores.step(lm.runner, lm.graph, lm.noise, rows)
        if progress is not None:
            progress(done)
    return scores.results()


# ---- held-out text files (`sedd eval`) ------------------------------------------------------------

def evenly_spaced_windows(ids: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """`count` windows of `length` tokens spread evenly over `ids` (deterministic)."""
    if len(ids) < length:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the model's length {length}")
    starts = torch.linspace(0, len(ids) - length, count).long()
    return ids[starts[:, None] + torch.arange(length)]


def held_out_bits(lm: LoadedModel, text: str, windows: int = 256, batch_size: int = 32,
                  repeats: int = 1, seed: int = 0) -> dict[str, float]:
    """Bits per token of the bound over `windows` evenly spaced windows x `repeats` draws each: the mean
    over all of them and its standard error (over windows and draws together)."""
    ids = torch.tensor(lm.tokenizer.encode(text), dtype=torch.long)
    x0_all = evenly_spaced_windows(ids, lm.length, windows)
    with tqdm(total=windows * repeats, desc="eval", unit="row", file=sys.stderr) as bar:
        draws = elbo_draws(lm.runner, lm.graph, lm.noise, x0_all, repeats, seed, batch_size, bar.update)
    values = draws.reshape(-1) / lm.length / math.log(2)
    return {"bits_per_token": values.mean().item(),
            "standard_error": (values.std() / math.sqrt(len(values))).item(),
            "sequences": len(values), "length": lm.length}
