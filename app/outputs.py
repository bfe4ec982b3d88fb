"""The output layer: the engine's token records become text and response bodies here, and only here.

The engine's worker thread never decodes (sedd_core.engine emits token ids); every generation
endpoint turns the records of its submission into its own shapes through one `RequestOutput`.
What a request held fixed comes from its job (`Job.fixed`) as a `Layout`, so the same code serves
a prefix and suffix, or fixed text at any positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch

from sedd_core.canvas import text_and_spans
from sedd_core.engine import FinalOutput, StepOutput
from sedd_core.generation import decode_rows, token_pieces
from sedd_core.loading import LoadedModel
from sedd_core.sampling import Job

from .schemas import Sample, SampleResponse, StepEvent, StepSample, Timing

Response = TypeVar("Response", bound=SampleResponse)
TIMING_DIGITS = 4


@dataclass(frozen=True)
class Layout:
    """Which positions of a canvas a job holds fixed (its prompt); the others are generated."""

    fixed: tuple[bool, ...]

    @classmethod
    def of(cls, job: Job) -> Layout:
        if job.fixed is None:
            return cls((False,) * job.length)
        return cls(tuple(job.fixed.tolist()))

    @property
    def gaps(self) -> tuple[tuple[int, int], ...]:
        """Token positions [start, end) of the generated runs."""
        return tuple((start, end) for start, end, fixed in self.runs() if not fixed)

    @property
    def length(self) -> int:
        return len(self.fixed)

    def runs(self) -> list[tuple[int, int, bool]]:
        """Maximal runs of positions, in order, as (start, end, fixed)."""
        runs, start = [], 0
        for i in range(1, self.length + 1):
            if i == self.length or self.fixed[i] != self.fixed[start]:
                runs.append((start, i, self.fixed[start]))
                start = i
        return runs

    @property
    def prefix_tokens(self) -> int:
        """Fixed positions at the start of the canvas."""
        runs = self.runs()
        return runs[0][1] if runs and runs[0][2] else 0

    @property
    def suffix_tokens(self) -> int:
        """Fixed positions at the end of the canvas."""
        runs = self.runs()
        return runs[-1][1] - runs[-1][0] if runs and runs[-1][2] and len(runs) > 1 else 0


@dataclass(frozen=True)
class DecodedSample:
    text: str  # the whole canvas
    spans: list[tuple[int, int]]  # character ranges [start, end) of `text` that were generated

    @property
    def generated(self) -> str:
        """Only the generated text, gap after gap (without the fixed text)."""
        return "".join(self.text[start:end] for start, end in self.spans)


class RequestOutput:
    """Turns one submission's records into response shapes (on the event loop, never the device thread)."""

    def __init__(self, lm: LoadedModel, job: Job, *, pieces: bool = False):
        self.lm = lm
        self.layout = Layout.of(job)
        self.gaps = job.gaps or self.layout.gaps  # the job's own gaps tell adjacent gaps apart
        self.rows, self.steps, self.predictor = job.rows, job.steps, job.predictor
        self.pieces = pieces  # per-position display strings in step events

    # ---- progress ----------------------------------------------------------------------------------
    def step_event(self, record: StepOutput) -> StepEvent:
        texts = decode_rows(self.lm, record.tokens, placeholder=True)
        samples = [StepSample(text=text, masks_left=left) for text, left in zip(texts, record.masks_left)]
        if not self.pieces:
            return StepEvent(step=record.step, steps=record.steps, t=record.t, samples=samples)
        for sample, row in zip(samples, record.tokens.tolist()):
            sample.pieces = token_pieces(self.lm, row)
        return StepEvent(step=record.step, steps=record.steps, t=record.t, samples=samples,
                         prefix_tokens=self.layout.prefix_tokens, suffix_tokens=self.layout.suffix_tokens,
                         fixed=list(self.layout.fixed))

    # ---- the result --------------------------------------------------------------------------------
    def decode(self, tokens: torch.Tensor) -> list[DecodedSample]:
        """Each row's text (the whole row decoded at once) and where its generated gaps lie in it."""
        return [DecodedSample(*text_and_spans(self.lm.tokenizer, row, self.gaps, self.lm.mask_id))
                for row in tokens.tolist()]

    def response(self, record: FinalOutput, answer: type[Response], **fields) -> Response:
        """`answer` (SampleResponse or a subclass) for the final record; `fields`: what the request echoes
        (id, seed, the infill's prefix and suffix or segments, ...)."""
        timing = record.timing
        samples = [Sample(text=s.text, spans=s.spans) for s in self.decode(record.tokens)]
        return answer(model=self.lm.name, samples=samples,
                      num_samples=self.rows, steps=self.steps, predictor=self.predictor, length=self.layout.length,
                      timing=Timing(queued_s=round(timing.queued_s, TIMING_DIGITS),
                                    run_s=round(timing.run_s, TIMING_DIGITS),
                                    total_s=round(timing.total_s, TIMING_DIGITS)),
                      **fields)
