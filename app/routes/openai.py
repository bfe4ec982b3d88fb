"""OpenAI-compatible endpoints: POST /v1/completions (with `suffix`, streamed or not) and GET /v1/models.

One job per prompt, each of `n` rows, all submitted to the engine together: the engine runs the rows of
every running request of one canvas length in one pass, so the prompts of a request share passes (and
share them with /sample and /infill traffic). Text comes from the output layer (app/outputs.py). Errors
on /v1/* have OpenAI's shape (app/main.py); this module raises `OpenAIError` for what only it knows.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request, Response
from sse_starlette import ServerSentEvent

from sedd_core.canvas import SegmentError, TokenizedText, tokenize_kept
from sedd_core.engine import ErrorOutput, FinalOutput, StepOutput
from sedd_core.generation import GenerationError, check_encodable, make_job, new_seed
from sedd_core.sampling import Job
from sedd_core.tokenizers import MASK_PLACEHOLDER, Tokenizer

from .. import submissions
from ..auth import require_api_key
from ..limits import check_limits
from ..openai_schemas import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIError,
    Usage,
    error_body,
    error_responses,
    refused_parameter,
)
from ..outputs import GapStream, RequestOutput, cut_at_stop
from ..schemas import MAX_SEED, default_steps
from ..state import ReadyState, ServerState
from ..streaming import client_closed, event_stream

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])

STARTED = int(time.time())
DONE = "[DONE]"


STREAM_DOC = {
    "description": "JSON answer, or with `stream: true` Server-Sent Events: `data: {chunk}` lines (chunk: a "
                   "Completion whose choices carry the new text, `usage` only in the last chunk with "
                   "`stream_options.include_usage`), then `data: [DONE]`; a failure mid-stream sends "
                   "`data: {\"error\": {...}}` and ends.",
    "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"anyOf": [
            {"const": DONE},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"$ref": "#/components/schemas/Completion"}}]}}}}},
}


def check_model(name: str, state: ServerState) -> None:
    if name not in (state.lm.name, state.lm.source):
        raise OpenAIError(404, f"the model {name!r} is not served here; this server serves {state.lm.name!r} "
                               "(GET /v1/models)", param="model", code="model_not_found")


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 413, 503),
            summary="The served model, in OpenAI's list shape")
async def list_models(state: ReadyState) -> ModelList:
    return ModelList(data=[ModelCard(id=state.lm.name, created=STARTED)])


@router.get("/v1/models/{model}", response_model=ModelCard, responses=error_responses(401, 404, 413, 503),
            summary="One served model, in OpenAI's shape")
async def retrieve_model(model: str, state: ReadyState) -> ModelCard:
    check_model(model, state)
    return ModelCard(id=state.lm.name, created=STARTED)


@router.post("/v1/completions", response_model=Completion,
             responses={200: STREAM_DOC, **error_responses(400, 401, 404, 413, 500, 503)},
             summary="OpenAI-compatible completions; `suffix` makes it an infill")
async def completions(body: CompletionRequest, request: Request, state: ReadyState):
    """The text between `prompt` and `suffix`, `max_tokens` long (default: the rest of the model's canvas),
    `n` times per prompt. Sampling controls: `temperature`, `top_p`, and as extra fields `top_k`, `min_p`.
    Diffusion settings as extra fields: `steps`, `predictor`, `denoising`."""
    lm, settings = state.lm, state.settings
    check_model(body.model, state)
    if (refused := refused_parameter(body)) is not None:
        raise refused
    prompts = body.prompts
    steps = body.steps if body.steps is not None else default_steps(settings.max_steps)
    check_limits(settings, steps=steps, num_samples=1)
    if body.n * len(prompts) > settings.max_samples:
        raise OpenAIError(400, f"n x prompts = {body.n} x {len(prompts)} = {body.n * len(prompts)} completions; "
                               f"this server makes at most {settings.max_samples} per request (SEDD_MAX_SAMPLES): "
                               "lower n or send fewer prompts", param="n")
    seed = body.seed if body.seed is not None else new_seed()
    jobs = [_job(state, body, prompt, steps, (seed + i) % (MAX_SEED + 1)) for i, prompt in enumerate(prompts)]
    prompt_tokens = sum(job.length - _gap_length(job) for job in jobs)  # the kept prompt and suffix tokens
    completion_tokens = sum(job.rows * _gap_length(job) for job in jobs)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  total_tokens=prompt_tokens + completion_tokens)

    # Deltas need step records only under the absorbing graph (a uniform-graph model streams its final text).
    wants_steps = body.stream and (body.denoising or lm.graph.absorb)
    running = submissions.submit_all(state, jobs, 1 if wants_steps else None)
    reply = Reply(id=f"cmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=lm.name)
    headers = {"X-Request-ID": reply.id}
    outputs = [RequestOutput(lm, job) for job in jobs]
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _stream(running, outputs, body, reply, usage if include_usage else None, state)
        return event_stream(events, settings, headers)
    finals = await submissions.results(running, request)
    if finals is None:
        return client_closed()
    choices = []
    for i, (output, final) in enumerate(zip(outputs, finals)):
        for j, decoded in enumerate(output.decode(final.tokens)):
            text, finish = cut_at_stop(decoded.generated, body.stops)
            choices.append(CompletionChoice(text=text, index=i * body.n + j, finish_reason=finish))
    answer = reply.completion(choices, usage)
    return Response(answer.model_dump_json(), media_type="application/json", headers=headers)


def _job(state: ServerState, body: CompletionRequest, prompt: str, steps: int, seed: int) -> Job:
    """`prompt`, a gap of max_tokens (or the rest of the canvas) and the suffix, as one job of n rows. Prompt and
    suffix are tokenized once, here: the job keeps those tokens."""
    lm, suffix = state.lm, body.suffix or ""
    try:
        check_encodable(lm, prompt=prompt, suffix=suffix)
    except GenerationError as exc:
        raise OpenAIError(400, str(exc), param="prompt" if lm.tokenizer.unknown_characters(prompt) else "suffix") from None
    prompt_kept, suffix_kept = _tokenized(lm.tokenizer, "prompt", prompt), _tokenized(lm.tokenizer, "suffix", suffix)
    kept = len(prompt_kept.tokens) + len(suffix_kept.tokens)
    gap = body.max_tokens if body.max_tokens is not None else lm.length - kept
    if kept + gap > lm.length or gap < 1:
        asked = f"max_tokens {body.max_tokens}" if body.max_tokens is not None else "at least 1 generated token"
        raise OpenAIError(400, f"prompt and suffix take {kept} tokens and {asked} makes {kept + max(gap, 1)}, more "
                               f"than the model's length of {lm.length} tokens: shorten the prompt or suffix"
                               + (" or lower max_tokens" if body.max_tokens is not None else ""),
                          param="max_tokens" if body.max_tokens is not None else "prompt")
    try:
        return make_job(lm, num_samples=body.n, steps=steps, predictor=body.predictor, seed=seed,
                        segments=[prompt_kept, gap, suffix_kept], **body.controls())
    except GenerationError as exc:
        raise OpenAIError(400, str(exc), param=exc.field or "prompt") from None


def _tokenized(tokenizer: Tokenizer, field: str, text: str) -> TokenizedText:
    try:
        return tokenize_kept(tokenizer, text)
    except SegmentError as exc:  # e.g. a lone surrogate, which GPT-2 cannot give back
        raise OpenAIError(400, f"the {field} {exc}", param=field) from None


def _gap_length(job: Job) -> int:
    return sum(end - start for start, end in job.gaps)


class Reply:
    """What every chunk and the answer of one request share."""

    def __init__(self, id: str, created: int, model: str):
        self.id, self.created, self.model = id, created, model

    def completion(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> ServerSentEvent:
        # as OpenAI: `finish_reason` and `logprobs` null until set, `usage` only in the last chunk
        return ServerSentEvent(self.completion(choices, usage).model_dump_json(exclude={"usage"} if usage is None
                                                                               else None))


async def _stream(running: list, outputs: list[RequestOutput], body: CompletionRequest, reply: Reply,
                  usage: Usage | None, state: ServerState) -> AsyncIterator[ServerSentEvent]:
    lm, n = state.lm, body.n
    gaps = [[GapStream(lm.tokenizer, job_gap(output), lm.mask_id, body.stops) for _ in range(n)]
            for output in outputs]
    async with aclosing(submissions.follow_all(running)) as records:  # a client that leaves cancels every submission now
        async for i, record in records:
            if isinstance(record, ErrorOutput):
                status = submissions.error_status(record).status_code
                yield ServerSentEvent(json.dumps(error_body(status, record.message, code=record.outcome)))
                return
            if (chunk := _chunk(i, record, outputs, gaps, body, reply, lm)) is not None:
                yield chunk
    if usage is not None:
        yield reply.chunk([], usage)
    yield ServerSentEvent(DONE)


def _chunk(i: int, record: StepOutput | FinalOutput, outputs: list[RequestOutput], gaps: list[list[GapStream]],
           body: CompletionRequest, reply: Reply, lm) -> ServerSentEvent | None:
    """The chunk for a record of prompt i's submission: whole canvases, or the choices with news."""
    n = body.n
    rows = record.tokens.tolist()
    final = isinstance(record, FinalOutput)
    choices = []
    if body.denoising:
        texts = (_final_canvases(outputs[i], record, body.stops) if final else
                 [(lm.tokenizer.decode(row, lm.mask_id, MASK_PLACEHOLDER), None) for row in rows])
        choices = [CompletionChoice(text=text, index=i * n + j, finish_reason=finish)
                   for j, (text, finish) in enumerate(texts)]
    else:
        for j, (row, gap) in enumerate(zip(rows, gaps[i])):
            was_open = gap.finish_reason is None
            delta = gap.update(row, final=final)
            if delta or (was_open and gap.finish_reason is not None):
                choices.append(CompletionChoice(text=delta, index=i * n + j, finish_reason=gap.finish_reason))
    return reply.chunk(choices) if choices else None


def job_gap(output: RequestOutput) -> tuple[int, int]:
    """The one generated run of a completion's canvas ([prompt, gap, suffix])."""
    (gap,) = output.gaps
    return gap


def _final_canvases(output: RequestOutput, record: FinalOutput, stops: list[str]) -> list[tuple[str, str]]:
    """The whole finished canvas per row, its generated part cut at the first stop string."""
    canvases = []
    for decoded in output.decode(record.tokens):
        (start, end), = decoded.spans
        text, finish = cut_at_stop(decoded.text[start:end], stops)
        canvases.append((decoded.text[:start] + text + decoded.text[end:], finish))
    return canvases
