"""Texts and text files to the diffusion ELBO: `sedd score`, `sedd eval` and the server's `/v1/score`.
The estimator itself (what is estimated, its draws, chunks) is `elbo.py`.

Windows. A text longer than the model's length L is cut into consecutive windows of L tokens; each is
scored on its own (no context from the previous one), so the sum of their bounds bounds the NLL of the
text under the model that writes it window by window; their variances add. A text, or last window, of
n < L tokens is scored with positions n..L-1 holding the mask token: see `elbo.elbo_rows` for what
that bound means. The uniform graph has no mask token, so it takes full windows only (a text of a
multiple of L tokens).

Each window's draws depend on the seed, its tokens and how many identical windows precede it in its
text: not on the other texts of a request or on where the window sits in its text, so the bounds of
two texts add up to the bound of their concatenation when both are whole windows.

Pieces: `TextScores` (texts -> windows -> `ScoreResult`s; the server's engine steps it), `score_texts`
(the same in one call), `held_out_bits` (evenly spaced windows of a held-out text, `sedd eval`).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from .elbo import ElboDraws, Progress, ScoreError, check_samples, default_rows, elbo_draws
from .graph import Graph
from .loading import LoadedModel
from .noise import Noise


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


class TextScores:
    """Texts -> windows of the model's length -> `ScoreResult`s. The constructor validates and tokenizes
    (cheap, any thread); `run` computes every draw, or the server's engine thread calls
    `step(model, graph, noise, max_rows)` a bounded chunk at a time; `results()` once `done`."""

    def __init__(self, lm: LoadedModel, texts: str | Sequence[str], samples: int = 128, seed: int = 0):
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ScoreError("no text to score: give at least one")
        check_samples(samples)
        self.lm = lm
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
        self.draws = ElboDraws(torch.tensor(windows, dtype=torch.long), samples, seed, groups)

    @property
    def total_rows(self) -> int:
        return self.draws.total_rows

    @property
    def rows_done(self) -> int:
        return self.draws.rows_done

    @property
    def done(self) -> bool:
        return self.draws.done

    def step(self, model, graph: Graph, noise: Noise, max_rows: int) -> int:
        return self.draws.step(model, graph, noise, max_rows)

    def run(self, batch_size: int | None = None, progress: Progress | None = None) -> list[ScoreResult]:
        """Every draw on the model's runner, `batch_size` rows a pass (default: by model size); the results."""
        lm = self.lm
        rows = batch_size or default_rows(lm.length, lm.graph.dim)
        self.draws.run(lm.runner, lm.graph, lm.noise, rows, progress)
        return self.results()

    def results(self) -> list[ScoreResult]:
        if not self.done:
            raise RuntimeError(f"scoring is not finished ({self.rows_done} of {self.total_rows} rows)")
        nll = [0.0] * len(self.texts)
        var = [0.0] * len(self.texts)
        for group, (mean, variance) in zip(self.groups, self.draws.estimates()):
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
    """The ELBO bound of each text (see `elbo.py` for what exactly is estimated)."""
    return TextScores(lm, texts, samples, seed).run(batch_size, progress)


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
