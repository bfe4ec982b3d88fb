"""POST /sample, POST /infill and POST /rewrite: check limits, build a job with sedd_core, submit it to
the engine, answer with JSON or stream Server-Sent Events (shapes from app/outputs.py).

Each route only says what canvas its body describes (a length, a prefix and suffix, segments, or a text
with spans to rewrite) and what its answer echoes; the rest of the path is shared."""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from sedd_core.canvas import SegmentError, rewrite_segments
from sedd_core.engine import EngineOutput, FinalOutput, StepOutput
from sedd_core.generation import GenerationError, make_job, new_seed
from sedd_core.loading import LoadedModel

from .. import submissions
from ..auth import require_api_key
from ..limits import check_limits, requested_steps
from ..outputs import RequestOutput
from ..schemas import (
    ErrorEvent,
    ErrorResponse,
    GenerationOptions,
    InfillRequest,
    InfillResponse,
    RewriteRequest,
    RewriteResponse,
    SampleRequest,
    SampleResponse,
    StepEvent,
    documented_errors,
)
from ..state import ReadyState, ServerState
from ..streaming import client_closed, event_stream

router = APIRouter(tags=["generation"], dependencies=[Depends(require_api_key)])

SSE_EXAMPLE = (
    'event: step\ndata: {"step":1,"steps":4,"t":0.75,"samples":[{"text":"░░░lo░░░░░░!","masks_left":9}]}\n\n'
    'event: done\ndata: {"id":"sample-…","model":"tiny-five","samples":[{"text":"hello world!"}], …}\n\n'
)


def _sse_event(name: str, data_model: type) -> dict[str, Any]:
    """One SSE event as schemathesis and OpenAPI 3.2's `itemSchema` read a stream: `event` names it, `data` is
    JSON text whose schema is `data_model`."""
    return {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"const": name},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"$ref": f"#/components/schemas/{data_model.__name__}"}}}}


def responses(answer: type) -> dict[int | str, dict[str, Any]]:
    """The documented answers of a generation route whose JSON answer (and `done` event data) is `answer`."""
    return {
        200: {"description": "JSON answer, or with `stream: true` / `Accept: text/event-stream` a stream of "
                             f"`step` events (data: {StepEvent.__name__}), then one `done` event (data: this JSON "
                             f"answer) or one `error` event (data: {ErrorEvent.__name__}). The stream's schema "
                             "describes one event. Comment lines (`: ping`) keep idle connections open.",
              "content": {"text/event-stream": {
                  "schema": {"oneOf": [_sse_event("step", StepEvent), _sse_event("done", answer),
                                       _sse_event("error", ErrorEvent)]},
                  "example": SSE_EXAMPLE}}},
        **documented_errors(ErrorResponse, {
            401: "missing or wrong API key (when the server has one)",
            413: "request body over SEDD_MAX_BODY_BYTES",
            422: "invalid input; `detail` says which field and what to change",
            500: "the generation failed (a fault in its model pass); `detail` says why. Other requests are not "
                 "affected",
            503: "model loading, queue full or shutting down (also a request still running when the shutdown's "
                 "drain timeout ends)",
        }),
    }


@router.post("/sample", response_model=SampleResponse, responses=responses(SampleResponse),
             summary="Draw unconditional samples")
async def sample(body: SampleRequest, request: Request, state: ReadyState):
    """Samples of the model's length (or `length`), denoised from all-masked in `steps` steps."""
    return await _generate(request, state, body, "sample", SampleResponse, lambda lm: {"length": body.length})


@router.post("/infill", response_model=InfillResponse, responses=responses(InfillResponse),
             summary="Keep text at any positions and fill the gaps")
async def infill(body: InfillRequest, request: Request, state: ReadyState):
    """A canvas of `length` tokens (default: the model's length) with `prefix` at its start and `suffix` at
    its end, both kept exactly; the positions between them are generated.

    Or, instead of prefix/suffix/length, `segments`: the canvas as kept text and gaps at any positions, e.g.
    `["ROMEO. ", 40, " and JULIET ", 30, "."]`. Each sample's `spans` are the character ranges of its gaps."""
    if body.segments is not None:
        return await _generate(request, state, body, "infill", InfillResponse,
                               lambda lm: {"segments": body.segments}, segments=body.segments)
    return await _generate(request, state, body, "infill", InfillResponse,
                           lambda lm: {"length": body.length, "prefix": body.prefix, "suffix": body.suffix},
                           prefix=body.prefix, suffix=body.suffix)


@router.post("/rewrite", response_model=RewriteResponse, responses=responses(RewriteResponse),
             summary="Regenerate character spans of a text in place")
async def rewrite(body: RewriteRequest, request: Request, state: ReadyState):
    """Every character of `text` outside `spans` is kept; each span becomes a gap of as many tokens as its
    text encodes to (or `lengths[i]`) and is generated anew. Each sample's `spans` locate the new text."""

    def canvas(lm: LoadedModel) -> dict[str, Any]:
        try:
            return {"segments": rewrite_segments(lm.tokenizer, body.text, body.spans, body.lengths)}
        except SegmentError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None

    return await _generate(request, state, body, "rewrite", RewriteResponse, canvas, text=body.text,
                           spans=body.spans, lengths=body.lengths)


# ---- the shared path ------------------------------------------------------------------------------
def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _json(model: BaseModel) -> str:
    return _dumps(model.model_dump(exclude_none=True))


async def _generate(request: Request, state: ServerState, body: GenerationOptions, kind: str,
                    answer_model: type[SampleResponse], canvas: Callable[[LoadedModel], dict[str, Any]], **echo):
    """`canvas(lm)`: make_job's arguments for where the request's text and gaps lie (or an HTTPException);
    `echo`: what the answer repeats from the request."""
    settings, lm = state.settings, state.lm
    steps = requested_steps(body, settings)
    check_limits(settings, steps=steps, num_samples=body.num_samples)
    seed = body.seed if body.seed is not None else new_seed()
    placement = canvas(lm)
    try:
        job = make_job(lm, num_samples=body.num_samples, steps=steps, predictor=body.predictor, seed=seed,
                       **body.controls(), **placement)
    except GenerationError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None

    streaming = body.stream or "text/event-stream" in request.headers.get("accept", "")
    submission = submissions.submit(state, job, body.stream_every if streaming else None)
    output = RequestOutput(lm, job, pieces=body.pieces and streaming)
    request_id = f"{kind}-{uuid.uuid4().hex[:24]}"

    def answer(final: FinalOutput) -> SampleResponse:
        return output.response(final, answer_model, id=request_id, seed=seed, **echo)

    headers = {"X-Request-ID": request_id}
    if streaming:
        return event_stream(_events(submission, output, answer), settings, headers)
    final = await submissions.result(submission, request)
    if final is None:
        return client_closed()
    return Response(_json(answer(final)), media_type="application/json", headers=headers)


async def _events(submission, output: RequestOutput,
                  answer: Callable[[FinalOutput], SampleResponse]) -> AsyncIterator[ServerSentEvent]:
    """`step` events, then `done` (the JSON answer) or `error`."""
    record: EngineOutput
    async for record in submissions.follow(submission):
        if isinstance(record, StepOutput):
            yield ServerSentEvent(_json(output.step_event(record)), event="step")
        elif isinstance(record, FinalOutput):
            yield ServerSentEvent(_json(answer(record)), event="done")
        else:
            yield ServerSentEvent(_json(ErrorEvent(error=record.message)), event="error")
