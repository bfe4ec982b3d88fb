"""The output layer: the engine's token records become text and response bodies here, and only here.

The engine's worker thread never decodes (sedd_core.engine emits token ids); every generation
endpoint turns the records of its submission into its own shapes through one `RequestOutput`.
What a request held fixed comes from its job (`Job.fixed`) as `FixedPositions`, so the same code serves
a prefix and suffix, or fixed text at any positions.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import TypeVar

import torch

from sedd_core.canvas import text_and_spans
from sedd_core.engine import FinalOutput, StepOutput
from sedd_core.generation import decode_rows, token_pieces
from sedd_core.loading import LoadedModel
from sedd_core.sampling import Job
from sedd_core.tokenizers import GPT2Tokenizer, Tokenizer

from .schemas import RequestDurations, Sample, SampleResponse, StepEvent, StepSample

Response = TypeVar("Response", bound=SampleResponse)
TIMING_DIGITS = 4


@dataclass(frozen=True)
class FixedPositions:
    """Which positions of a canvas a job holds fixed (its prompt); the others are generated."""

    fixed: tuple[bool, ...]

    @classmethod
    def of(cls, job: Job) -> FixedPositions:
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
        self.positions = FixedPositions.of(job)
        self.gaps = job.gaps or self.positions.gaps  # the job's own gaps tell adjacent gaps apart
        self.rows, self.steps, self.predictor, self.controls = job.rows, job.steps, job.predictor, job.controls
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
                         prefix_tokens=self.positions.prefix_tokens, suffix_tokens=self.positions.suffix_tokens,
                         fixed=list(self.positions.fixed))

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
                      num_samples=self.rows, steps=self.steps, predictor=self.predictor,
                      temperature=self.controls.temperature, top_p=self.controls.top_p, top_k=self.controls.top_k,
                      min_p=self.controls.min_p, length=self.positions.length,
                      timing=RequestDurations(queued_s=round(timing.queued_s, TIMING_DIGITS),
                                              run_s=round(timing.run_s, TIMING_DIGITS),
                                              total_s=round(timing.total_s, TIMING_DIGITS)),
                      **fields)


# ---- text of a gap as it is revealed (OpenAI-style streams) -----------------------------------------
def token_bytes(tokenizer: Tokenizer, tokens: list[int]) -> bytes:
    """The UTF-8 bytes of `tokens` (no masks): GPT-2 tokens may end inside a character."""
    if isinstance(tokenizer, GPT2Tokenizer):
        return tokenizer.encoding.decode_bytes(tokens)
    return tokenizer.decode(tokens).encode("utf-8")


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where `text` is cut for `stops`: the start of the earliest occurrence of any of them."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, str]:
    """(text cut at the first stop string, finish_reason)."""
    cut = first_stop(text, stops)
    return (text, "length") if cut is None else (text[:cut], "stop")


class GapStream:
    """The text of one row's gap as deltas, while the absorbing sampler reveals it.

    A revealed token never changes, so the run of revealed tokens from the gap's left end is final and
    is sent as soon as it exists. Its bytes go through an incremental UTF-8 decoder (errors replaced as
    in a one-shot decode), which holds back the bytes of a character that a later token completes: no
    delta ever ends inside a character, and the deltas join to the one-shot decode of the gap. With stop
    strings, text that could still be the start of a stop string is held back until it cannot, so the
    deltas join to the non-streamed text cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, gap: tuple[int, int], mask_id: int | None, stops: list[str]):
        self.tokenizer, self.gap, self.mask_id, self.stops = tokenizer, gap, mask_id, stops
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._revealed = 0  # gap tokens fed to the decoder
        self.text = ""  # the gap's text decoded so far
        self.sent = 0  # characters of `text` sent
        self.finish_reason: str | None = None  # set once the choice is over

    def update(self, row: list[int], final: bool = False) -> str:
        """The next delta ("" when nothing new is safe to send) for the canvas `row`."""
        if self.finish_reason is not None:
            return ""
        start, end = self.gap
        position = start + self._revealed
        while position < end and row[position] != self.mask_id:
            position += 1
        new = row[start + self._revealed:position]
        self._revealed += len(new)
        final = final or self._revealed == end - start
        self.text += self._decoder.decode(token_bytes(self.tokenizer, new), final=final)
        cut = first_stop(self.text, self.stops)
        if final:
            limit = len(self.text) if cut is None else cut
            self.finish_reason = "length" if cut is None else "stop"
        else:
            hold = self._held_back()
            limit = hold if cut is None or cut > hold else cut
            if cut is not None and cut <= hold:
                self.finish_reason = "stop"
        delta, self.sent = self.text[self.sent:limit], max(self.sent, limit)
        return delta

    def _held_back(self) -> int:
        """The earliest index from which the text is a proper prefix of a stop string (it may complete)."""
        longest = max((len(stop) for stop in self.stops), default=0)
        for i in range(max(0, len(self.text) - longest + 1), len(self.text)):
            tail = self.text[i:]
            if any(len(stop) > len(tail) and stop.startswith(tail) for stop in self.stops):
                return i
        return len(self.text)
