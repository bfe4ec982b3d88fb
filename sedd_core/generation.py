"""Sample and infill in the library: build a `Job` from a request, run it to the end, decode it.

The batching engine uses `make_job` too, so the CLI, the library and the server
validate input and lay out prompts in one place.
"""
from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence

import torch

from .canvas import Segment, SegmentError, lay_out, tokenize_kept
from .controls import ControlError, SamplingControls
from .loading import LoadedModel
from .sampling import PREDICTORS, Job, denoising_step
from .tokenizers import MASK_PLACEHOLDER, render


class GenerationError(ValueError):
    """Bad generation input; the message says what to fix, and `field` names the input when it is one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def new_seed() -> int:
    """53 bits, so that a seed survives a round trip through JavaScript numbers (the web page)."""
    return secrets.randbits(53)


def check_encodable(lm: LoadedModel, **texts: str) -> None:
    """One error that lists every character, in every field, that the vocabulary cannot encode."""
    problems = []
    for what, text in texts.items():
        unknown = lm.tokenizer.unknown_characters(text)
        if unknown:
            problems.append(f"the {what} holds {', '.join(repr(c) for c in unknown[:20])}")
    if problems:
        raise GenerationError(f"characters this model's vocabulary cannot encode: {'; '.join(problems)}")


def infill_segments(lm: LoadedModel, length: int | None, prefix: str = "", suffix: str = "") -> list[Segment]:
    """The shorthand's segments `[prefix, gap, suffix]`: the gap fills the rest of a canvas of `length`
    tokens (default: the model's length). The kept text is tokenized once, here (`TokenizedText`)."""
    max_length = lm.length
    length = max_length if length is None else int(length)
    if not 1 <= length <= max_length:
        raise GenerationError(f"length must be between 1 and {max_length} (the model's length), got {length}")
    check_encodable(lm, prefix=prefix, suffix=suffix)
    try:
        kept_prefix, kept_suffix = tokenize_kept(lm.tokenizer, prefix), tokenize_kept(lm.tokenizer, suffix)
    except SegmentError as exc:
        raise GenerationError(str(exc)) from None
    prefix_tokens, suffix_tokens = len(kept_prefix.tokens), len(kept_suffix.tokens)
    gap = length - prefix_tokens - suffix_tokens
    if gap < 1:
        raise GenerationError(
            f"prefix ({prefix_tokens} tokens) plus suffix ({suffix_tokens} tokens) "
            f"leave no room on a canvas of {length} tokens; shorten them or raise length"
        )
    return [kept_prefix, gap, kept_suffix]


def sampling_controls(lm: LoadedModel, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      min_p: float = 0.0) -> SamplingControls:
    """The controls, checked against their ranges and against the model (temperature 0 needs the absorbing
    graph); see `sedd_core.controls.SamplingControls` for what each does."""
    try:
        controls = SamplingControls(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    except ControlError as exc:
        raise GenerationError(str(exc), field=exc.field) from None
    if controls.greedy and not lm.graph.absorb:
        raise GenerationError("temperature 0 (deterministic decoding) needs an absorbing-graph model; this model "
                              "uses the uniform graph, which starts from random tokens: use a temperature above 0",
                              field="temperature")
    return controls


def make_job(lm: LoadedModel, *, num_samples: int = 1, steps: int = 128, length: int | None = None,
             predictor: str = "analytic", seed: int | None = None, prefix: str = "", suffix: str = "",
             segments: Sequence[str | int] | None = None, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, min_p: float = 0.0) -> Job:
    """A job for `segments` (kept text and gaps, see `sedd_core.canvas`), or for `[prefix, gap, suffix]` on a
    canvas of `length` tokens: the shorthand. `job.gaps` holds the token positions of the gaps.
    `temperature`, `top_p`, `top_k`, `min_p`: the sampling controls (`sedd_core.controls.SamplingControls`)."""
    if predictor not in PREDICTORS:
        raise GenerationError(f"predictor must be one of {', '.join(PREDICTORS)}, got {predictor!r}")
    if steps < 1:
        raise GenerationError(f"steps must be at least 1, got {steps}")
    if num_samples < 1:
        raise GenerationError(f"num_samples must be at least 1, got {num_samples}")
    controls = sampling_controls(lm, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    if segments is not None:
        if prefix or suffix or length is not None:
            raise GenerationError("give either segments or prefix/suffix/length, not both: segments describe the "
                                  "whole canvas")
    else:
        segments = infill_segments(lm, length, prefix, suffix)
    try:
        placed = lay_out(lm.tokenizer, segments, lm.length)
    except SegmentError as exc:
        raise GenerationError(str(exc)) from None
    generator = torch.Generator(device=lm.device)
    generator.manual_seed(new_seed() if seed is None else int(seed))
    x = lm.graph.sample_limit(num_samples, placed.length, device=lm.device, generator=generator)
    fixed = torch.tensor(placed.fixed, dtype=torch.bool, device=lm.device)
    fixed_tokens = torch.tensor(placed.tokens, dtype=torch.long, device=lm.device)
    return Job(x=x, steps=steps, predictor=predictor, generator=generator, fixed=fixed if any(placed.fixed) else None,
               fixed_tokens=fixed_tokens, controls=controls, gaps=placed.gaps)


def iterate(lm: LoadedModel, job: Job) -> Iterator[Job]:
    """Run a job step by step on its own, yielding it after each step (the last yield is the final state)."""
    while not job.done:
        denoising_step(lm.runner, lm.graph, lm.noise, [job])
        yield job


def decode_rows(lm: LoadedModel, x: torch.Tensor, placeholder: bool = False) -> list[str]:
    rows = x.tolist()
    if placeholder:
        return [render(lm.tokenizer, row, lm.mask_id) for row in rows]
    return [lm.tokenizer.decode(row, lm.mask_id) for row in rows]


def token_pieces(lm: LoadedModel, row: list[int]) -> list[str]:
    """One display string per position: the token's text, or the mask placeholder."""
    return [MASK_PLACEHOLDER if tok == lm.mask_id else lm.tokenizer.decode_token(tok) for tok in row]


def generate(lm: LoadedModel, *, num_samples: int = 1, steps: int = 128, length: int | None = None,
             predictor: str = "analytic", seed: int | None = None, prefix: str = "", suffix: str = "",
             segments: Sequence[str | int] | None = None, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, min_p: float = 0.0, callback: Callable[[Job], None] | None = None) -> list[str]:
    """Texts of `num_samples` samples; with prefix/suffix or segments, an infill that keeps the text exactly.
    The sampling controls as in `make_job`."""
    job = make_job(lm, num_samples=num_samples, steps=steps, length=length, predictor=predictor, seed=seed,
                   prefix=prefix, suffix=suffix, segments=segments, temperature=temperature, top_p=top_p,
                   top_k=top_k, min_p=min_p)
    for state in iterate(lm, job):
        if callback is not None:
            callback(state)
    return decode_rows(lm, job.x)
