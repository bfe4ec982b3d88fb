"""The output layer (app/outputs.py) and the limits check (app/limits.py), in-process on tiny-five."""
from __future__ import annotations

import pytest
import torch
from fastapi.exceptions import RequestValidationError

from app.limits import check_limits, requested_steps
from app.outputs import FixedPositions, RequestOutput
from app.schemas import InfillRequest, InfillResponse, SampleRequest, default_steps
from app.settings import Settings
from sedd_core.engine import Durations, FinalOutput, StepOutput
from sedd_core.generation import generate, iterate, make_job
from sedd_core.tokenizers import MASK_PLACEHOLDER


def test_layout_comes_from_the_jobs_fixed_positions(lm):
    infill = FixedPositions.of(make_job(lm, steps=2, length=12, prefix="di", suffix="ok", seed=1))
    assert infill.runs() == [(0, 2, True), (2, 10, False), (10, 12, True)]
    assert (infill.length, infill.prefix_tokens, infill.suffix_tokens) == (12, 2, 2)
    only_suffix = FixedPositions.of(make_job(lm, steps=2, length=12, suffix="ok", seed=1))
    assert (only_suffix.prefix_tokens, only_suffix.suffix_tokens) == (0, 2)
    plain = FixedPositions.of(make_job(lm, steps=2, length=6, seed=1))
    assert plain.runs() == [(0, 6, False)] and (plain.prefix_tokens, plain.suffix_tokens) == (0, 0)
    inner = FixedPositions((False, True, True, False, False, True, False))  # fixed text inside the canvas
    assert inner.runs() == [(0, 1, False), (1, 3, True), (3, 5, False), (5, 6, True), (6, 7, False)]
    assert (inner.prefix_tokens, inner.suffix_tokens) == (0, 0)


def test_decode_gives_text_and_the_generated_spans(lm):
    job = make_job(lm, num_samples=2, steps=6, length=12, prefix="di", suffix="ok", seed=3)
    for _ in iterate(lm, job):
        pass
    samples = RequestOutput(lm, job).decode(job.x.cpu())
    assert [s.text for s in samples] == generate(lm, num_samples=2, steps=6, length=12, prefix="di",
                                                 suffix="ok", seed=3)
    for sample in samples:
        assert sample.spans == [(2, 10)]
        assert sample.generated == sample.text[2:10]


def test_step_event_and_response_shapes(lm):
    job = make_job(lm, num_samples=1, steps=4, length=8, prefix="a", seed=5)
    tokens = job.x.cpu()
    record = StepOutput(request_id=1, step=1, steps=4, t=0.75, tokens=tokens,
                        masks_left=tuple((tokens == lm.mask_id).sum(dim=1).tolist()))
    event = RequestOutput(lm, job).step_event(record)
    assert event.samples[0].text == "a" + MASK_PLACEHOLDER * 7 and event.samples[0].masks_left == 7
    assert event.samples[0].pieces is None and event.prefix_tokens is None  # only asked for with `pieces`
    with_pieces = RequestOutput(lm, job, pieces=True).step_event(record)
    assert with_pieces.samples[0].pieces == ["a"] + [MASK_PLACEHOLDER] * 7
    assert (with_pieces.prefix_tokens, with_pieces.suffix_tokens) == (1, 0)
    assert event.fixed is None and with_pieces.fixed == [True] + [False] * 7

    final = FinalOutput(request_id=1, tokens=torch.tensor([lm.tokenizer.encode("abcdefgh")]),
                        timing=Durations(queued_s=0.123456, run_s=1.0, total_s=1.123456))
    answer = RequestOutput(lm, job).response(final, InfillResponse, id="x", seed=5, prefix="a", suffix="")
    assert answer.samples[0].text == "abcdefgh" and answer.timing.queued_s == 0.1235
    assert (answer.num_samples, answer.steps, answer.length, answer.model) == (1, 4, 8, lm.name)


def test_limits_check_reads_the_body_and_never_rewrites_it():
    settings = Settings(max_steps=64, max_rows=4, max_samples=2)
    body = SampleRequest()
    assert requested_steps(body, settings) == default_steps(64) == 64
    assert body.steps == 128 and "steps" not in body.model_fields_set  # as sent: no steps named
    check_limits(settings, steps=requested_steps(body, settings), num_samples=body.num_samples)
    over = InfillRequest(steps=65, num_samples=3)
    with pytest.raises(RequestValidationError) as refused:
        check_limits(settings, steps=requested_steps(over, settings), num_samples=over.num_samples)
    errors = refused.value.errors()
    assert [e["loc"] for e in errors] == [("body", "steps"), ("body", "num_samples")]
    assert "SEDD_MAX_STEPS" in errors[0]["msg"] and "SEDD_MAX_SAMPLES" in errors[1]["msg"]
    assert (over.steps, over.num_samples) == (65, 3)
    with pytest.raises(RequestValidationError) as renamed:  # an endpoint whose field is called otherwise
        check_limits(settings, steps=8, num_samples=3, samples_field="n")
    assert renamed.value.errors()[0]["loc"] == ("body", "n")
