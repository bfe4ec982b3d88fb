"""POST /sample and POST /infill: validate, build a job with sedd_core, hand it to the engine,
answer with JSON or stream Server-Sent Events."""
from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from sedd_core.engine import EngineClosed, QueueFull
from sedd_core.engine import Request as EngineRequest
from sedd_core.generation import GenerationError, make_job, new_seed

from ..auth import require_api_key
from ..schemas import (
    RETRY_AFTER,
    WWW_AUTHENTICATE,
    ErrorEvent,
    ErrorResponse,
    InfillRequest,
    InfillResponse,
    SampleRequest,
    SampleResponse,
    StepEvent,
    default_steps,
)
from ..state import ReadyState, ServerState

router = APIRouter(tags=["generation"], dependencies=[Depends(require_api_key)])

QUEUE_FULL_RETRY_AFTER_S = 1
STEP_BACKLOG = 16  # step events a streaming reader may fall behind before it gets only the latest
STREAM_GRACE_MARGIN_S = 5  # sse-starlette cuts streams this long after the drain timeout, as a last resort
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer

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
        401: {"model": ErrorResponse, "description": "missing or wrong API key (when the server has one)",
              "headers": WWW_AUTHENTICATE},
        413: {"model": ErrorResponse, "description": "request body over SEDD_MAX_BODY_BYTES"},
        422: {"model": ErrorResponse, "description": "invalid input; `detail` says which field and what to change"},
        500: {"model": ErrorResponse, "description": "the generation failed (a fault in its model pass); `detail` "
                                                     "says why. Other requests are not affected"},
        503: {"model": ErrorResponse, "description": "model loading, queue full or shutting down (also a request "
                                                     "still running when the shutdown's drain timeout ends)",
              "headers": RETRY_AFTER},
    }


@router.post("/sample", response_model=SampleResponse, responses=responses(SampleResponse),
             summary="Draw unconditional samples")
async def sample(body: SampleRequest, request: Request, state: ReadyState):
    """Samples of the model's length (or `length`), denoised from all-masked in `steps` steps."""
    return await _generate(request, state, body, "sample")


@router.post("/infill", response_model=InfillResponse, responses=responses(InfillResponse),
             summary="Fill the middle between a fixed prefix and suffix")
async def infill(body: InfillRequest, request: Request, state: ReadyState):
    """A canvas of `length` tokens (default: the model's length) with `prefix` at its start and `suffix` at
    its end, both kept exactly; the positions between them are generated."""
    return await _generate(request, state, body, "infill")


# ---- the shared path ------------------------------------------------------------------------------
def _check_limits(body: SampleRequest, state: ServerState) -> None:
    settings, errors = state.settings, []
    if "steps" not in body.model_fields_set:
        body.steps = default_steps(settings.max_steps)
    if body.steps > settings.max_steps:
        errors.append(("steps", body.steps,
                       f"must be at most {settings.max_steps} (this server's SEDD_MAX_STEPS), got {body.steps}"))
    if body.num_samples > settings.max_samples:
        errors.append(("num_samples", body.num_samples, (f"must be at most {settings.max_samples} (this "
                                                         f"server's SEDD_MAX_SAMPLES), got {body.num_samples}")))
    if errors:
        raise RequestValidationError([{"loc": ("body", name), "msg": msg, "type": "less_than_equal", "input": value}
                                      for name, value, msg in errors])


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


async def _generate(request: Request, state: ServerState, body: SampleRequest, kind: str):
    _check_limits(body, state)
    lm, engine = state.lm, state.engine
    infill = isinstance(body, InfillRequest)
    # 53 bits: a drawn seed survives a round trip through a JavaScript number.
    seed = body.seed if body.seed is not None else new_seed()
    try:
        job = make_job(lm, num_samples=body.num_samples, steps=body.steps, length=body.length,
                       predictor=body.predictor, seed=seed, prefix=body.prefix if infill else "",
                       suffix=body.suffix if infill else "")
    except GenerationError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None

    streaming = body.stream or "text/event-stream" in request.headers.get("accept", "")
    # Without streaming no step events are wanted: a period past the last step means none are made.
    every = body.stream_every if streaming else job.steps + 1
    try:
        handle = engine.submit(job, stream_every=every, pieces=body.pieces and streaming)
    except QueueFull as exc:
        state.metrics.rejected()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"the server is busy: {exc}",
                            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)}) from None
    except EngineClosed as exc:
        state.metrics.rejected()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc),
                            headers={"Retry-After": "5"}) from None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None

    request_id = f"{kind}-{uuid.uuid4().hex[:24]}"

    def answer(done: dict[str, Any]) -> SampleResponse:
        fields = {"id": request_id, "model": lm.name, "samples": done["samples"], "num_samples": job.rows,
                  "steps": job.steps, "predictor": job.predictor, "length": job.length, "seed": seed,
                  "timing": done["timing"]}
        if infill:
            return InfillResponse(**fields, prefix=body.prefix, suffix=body.suffix)
        return SampleResponse(**fields)

    headers = {"X-Request-ID": request_id}
    if streaming:
        return EventSourceResponse(_stream(handle, answer), headers=headers,
                                   ping=state.settings.stream_heartbeat_s,
                                   # after the drain, which ends the stream with `error` itself
                                   shutdown_grace_period=state.settings.drain_timeout_s + STREAM_GRACE_MARGIN_S)
    done = await _final_event(handle, request)
    if done is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    response = answer(done)
    return Response(_dumps(response.model_dump()), media_type="application/json", headers=headers)


async def _stream(handle: EngineRequest, answer):
    """SSE events of one engine request; leaving early (client gone, shutdown) cancels it.

    A reader that falls more than STEP_BACKLOG step events behind gets the latest state instead of
    the backlog; the final event is never dropped."""
    try:
        while True:
            events = [await handle.queue.get()]
            while not handle.queue.empty():
                events.append(handle.queue.get_nowait())
            steps = [event for event in events if event.type == "step"]
            for event in steps[-1:] if len(steps) > STEP_BACKLOG else steps:
                yield ServerSentEvent(_dumps(event.data), event="step")
            final = next((event for event in events if event.type != "step"), None)
            if final is None:
                continue
            if final.type == "done":
                yield ServerSentEvent(_dumps(answer(final.data).model_dump()), event="done")
            else:
                yield ServerSentEvent(_dumps({"error": final.data.get("error", "generation failed")}),
                                      event="error")
            return
    finally:
        if not handle.finished:
            handle.cancel()  # its rows leave the batch before the next step


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only http.disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _final_event(handle: EngineRequest, request: Request) -> dict[str, Any] | None:
    """The `done` data; None when the client left first (the engine request is then cancelled)."""

    async def final() -> Any:
        while True:
            event = await handle.queue.get()
            if event.type != "step":
                return event

    waiting = asyncio.ensure_future(final())
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            return None
        event = waiting.result()
    finally:
        for task in (waiting, gone):
            task.cancel()
        if not handle.finished:
            handle.cancel()
    if event.type == "done":
        return event.data
    detail = event.data.get("error", "generation failed")
    if event.data.get("outcome") == "shutdown":  # the server stopped before the request finished
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=detail, headers={"Retry-After": "5"})
    raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, detail=detail)
