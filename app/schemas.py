"""Request and response bodies. Limits, descriptions and examples here are what /docs shows.

Limits that depend on the server's settings or on the model (most steps, samples and the
model's length) are checked per request and listed by GET /v1/model.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, field_validator, model_validator
from pydantic_core import PydanticCustomError

from sedd_core.canvas import MAX_SEGMENTS
from sedd_core.controls import ControlError, check_control

MAX_SEED = 2**63 - 1


DEFAULT_STEPS = 128


def default_steps(max_steps: int) -> int:
    """The steps a request gets when it names none: 128, or the server's SEDD_MAX_STEPS if lower."""
    return min(DEFAULT_STEPS, max_steps)


def integral_number(value):
    """JSON Schema's `integer` includes 2.0: a number with no fractional part is that integer. Strings,
    booleans and 2.5 are still refused (the fields are strict)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# The sampling controls, as every generation endpoint and /v1/completions take them. The ranges are the
# library's (sedd_core.controls.check_control), whose messages state them; the schema repeats them.
CONTROLS = ("temperature", "top_p", "top_k", "min_p")
CONTROL_DOCS = {
    "temperature": "reshapes the distribution of the token a revealed position becomes (the clean-token "
                   "distribution; under a uniform-graph model, the token a position moves to): probabilities to "
                   "the power 1/temperature, renormalised; below 1 sharper, above 1 flatter. 0 = deterministic: "
                   "the same text with any seed or none, every sample the same (the most confident positions "
                   "are revealed first, as many per step as the noise schedule unmasks, each with its most "
                   "likely token; absorbing-graph models only). The reveal rate follows the noise schedule "
                   "whatever the controls",
    "top_p": "nucleus: keep the most likely tokens whose probabilities (after temperature and top_k) add up to "
             "top_p, the one that crosses it included; 1 = off",
    "top_k": "keep the k most likely tokens (and any tied with the k-th); 0 = off",
    "min_p": "keep the tokens at least min_p times as likely as the most likely one (applied after top_p); "
             "0 = off",
}
CONTROL_BOUNDS = {"temperature": {"minimum": 0}, "top_p": {"exclusiveMinimum": 0, "maximum": 1},
                  "top_k": {"minimum": 0}, "min_p": {"minimum": 0, "maximum": 1}}


def check_control_field(value, info):
    """A control's range, as the library states it (422, or 400 on /v1, naming the field)."""
    if value is not None:
        try:
            check_control(info.field_name, value)
        except ControlError as exc:
            raise PydanticCustomError("control_range", "{requirement}, got {value}",
                                      {"requirement": exc.requirement, "value": value}) from None
    return value


def control_field(name: str, default, nullable: bool = False, note: str = ""):
    """A control's Field: its description and its range in the schema (`nullable`: null = the default)."""
    bounds = CONTROL_BOUNDS[name]
    schema = {"anyOf": [{"type": "integer" if name == "top_k" else "number", **bounds}, {"type": "null"}]} \
        if nullable else bounds
    return Field(default, strict=True, description=CONTROL_DOCS[name] + note, json_schema_extra=schema,
                 **({} if name == "top_k" else {"allow_inf_nan": False}))


class SamplingFields(BaseModel):
    """How a revealed position picks its token (sedd_core.controls.SamplingControls)."""

    temperature: float = control_field("temperature", 1.0)
    top_p: float = control_field("top_p", 1.0)
    top_k: int = control_field("top_k", 0)
    min_p: float = control_field("min_p", 0.0)

    _integral_top_k = field_validator("top_k", mode="before")(integral_number)
    _ranges = field_validator(*CONTROLS)(check_control_field)

    def controls(self) -> dict:
        """make_job's keyword arguments."""
        return {name: getattr(self, name) for name in CONTROLS}


class GenerationOptions(SamplingFields):
    """The fields every generation request has: how many samples, how many steps, how to answer."""

    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(1, ge=1, strict=True, description="samples to draw; at most the server's max_samples "
                                                  "(GET /v1/model)", examples=[1])
    steps: int = Field(DEFAULT_STEPS, ge=1, strict=True, description="denoising steps: more steps, better text, longer wait; at most "
                                              "the server's max_steps", examples=[128])
    predictor: Literal["analytic", "euler"] = Field("analytic", description="the update rule of each step: "
                                                    "analytic (Tweedie tau-leaping) or euler")
    seed: int | None = Field(None, ge=0, strict=True, le=MAX_SEED, description="seed for a reproducible result; null = a "
                             "fresh one, reported in the answer", examples=[42])
    stream: bool = Field(False, strict=True, description="answer with Server-Sent Events (also chosen by "
                                            "`Accept: text/event-stream`)")
    stream_every: int = Field(1, ge=1, strict=True, description="when streaming, a `step` event every this many steps; a "
                                                   "client far behind gets the latest step, not the backlog")
    pieces: bool = Field(False, strict=True, description="when streaming, add one display string per position to each "
                                            "sample of a `step` event")

    _integral_numbers = field_validator("num_samples", "steps", "seed", "stream_every", mode="before")(integral_number)


class SampleRequest(GenerationOptions):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"num_samples": 2, "steps": 128, "predictor": "analytic", "seed": 42},
        {"num_samples": 1, "steps": 64, "stream": True, "stream_every": 4},
    ]})

    length: int | None = Field(None, ge=1, strict=True, description="tokens per sample; null = the model's length "
                                                       "(its maximum)", examples=[None])

    _integral_length = field_validator("length", mode="before")(integral_number)


# A segment is kept text or a gap of that many tokens. Only the shape is checked here; the rules a list
# of segments must follow (at least one gap, gaps >= 1, at most MAX_SEGMENTS, the model's length and
# vocabulary) are the library's (sedd_core.canvas), whose messages name the segment. The schema states them.
def _segment(value):
    value = integral_number(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PydanticCustomError("segment_type", "a segment is a string (text kept exactly) or a whole number (a gap "
                                  "of that many tokens), got {value}", {"value": json.dumps(value, default=repr)[:40]})
    return value


Segment = Annotated[str | int, BeforeValidator(_segment)]
SEGMENTS_EXAMPLE = ["ROMEO. ", 40, " and JULIET ", 30, "."]
SEGMENTS_SCHEMA = {"minItems": 1, "maxItems": MAX_SEGMENTS,
                   "items": {"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 1}]}}
CANVAS_FIELDS = ("prefix", "suffix", "length")


def _integral_items(value):
    return [integral_number(item) for item in value] if isinstance(value, list) else value


def _integral_pairs(value):
    return [_integral_items(pair) for pair in value] if isinstance(value, list) else value


class InfillRequest(SampleRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prefix": "di", "suffix": "ok", "num_samples": 2, "steps": 64, "seed": 7},
        {"prefix": "Once upon a time", "suffix": " and they lived happily ever after.", "steps": 256,
         "stream": True, "stream_every": 8},
        {"segments": SEGMENTS_EXAMPLE, "num_samples": 2, "steps": 128, "seed": 7},
    ]})

    prefix: str = Field("", description="text fixed at the start of the canvas, kept exactly",
                        examples=["Once upon a time"])
    suffix: str = Field("", description="text fixed at the end of the canvas, kept exactly",
                        examples=[" and they lived happily ever after."])
    segments: list[Segment] | None = Field(
        None, examples=[SEGMENTS_EXAMPLE], json_schema_extra={"anyOf": [{"type": "array", **SEGMENTS_SCHEMA},
                                                                       {"type": "null"}]},
        description="instead of prefix/suffix/length: the whole canvas as an ordered list of segments, a string "
                    "is text kept exactly where it stands, a whole number is a gap of that many tokens for the "
                    f"model to fill; at most {MAX_SEGMENTS} segments, at least one gap, the canvas (all segments' "
                    "tokens) at most the model's length. Each answer sample's `spans` locate the gaps in its text")

    @model_validator(mode="after")
    def _segments_or_prefix_and_suffix(self):
        given = [name for name in CANVAS_FIELDS if name in self.model_fields_set]
        if self.segments is not None and given:
            raise PydanticCustomError("segments_and_prefix", "give either segments or {given}, not both: segments "
                                      "describe the whole canvas", {"given": "/".join(given)})
        return self


class RewriteRequest(GenerationOptions):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"text": "ROMEO. What light through yonder window breaks?", "spans": [[7, 17]], "seed": 7},
        {"text": "did ok", "spans": [[1, 3], [4, 5]], "lengths": [2, 1], "steps": 64, "stream": True},
    ]})

    text: str = Field(description="the text to rewrite; every character outside `spans` is kept exactly",
                      examples=["ROMEO. What light through yonder window breaks?"])
    spans: list[tuple[Annotated[int, Strict()], Annotated[int, Strict()]]] = Field(
        json_schema_extra={"minItems": 1}, examples=[[[7, 17]]],
        description="character ranges [start, end) of `text` to generate anew (offsets count Unicode code "
                    "points), in order and not overlapping")
    lengths: list[Annotated[int, Strict()]] | None = Field(
        None, json_schema_extra={"anyOf": [{"type": "array", "items": {"type": "integer", "minimum": 1}},
                                           {"type": "null"}]},
        description="tokens for each span's gap, one per span; null = as many as the span's text encodes to")

    _integral_spans = field_validator("spans", mode="before")(_integral_pairs)
    _integral_lengths = field_validator("lengths", mode="before")(_integral_items)


class Sample(BaseModel):
    text: str = Field(description="the generated text (for infill: prefix, middle and suffix)")
    spans: list[tuple[int, int]] | None = Field(
        None, examples=[[[7, 52], [64, 97]]],
        description="character ranges [start, end) of `text` that the model generated (the gaps, in order); "
                    "the text between them was kept")


class RequestDurations(BaseModel):
    """Where the seconds of one request went (the answer's `timing`)."""

    queued_s: float = Field(description="seconds waiting for rows")
    run_s: float = Field(description="seconds from the first step to the last")
    total_s: float = Field(description="seconds from submission to the answer")


class SampleResponse(BaseModel):
    id: str = Field(description="this request's id (also the X-Request-ID header)")
    model: str = Field(description="name of the model that answered")
    samples: list[Sample]
    num_samples: int
    steps: int
    predictor: str
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    length: int = Field(description="tokens per sample (the canvas)")
    seed: int = Field(description="the seed used: send it back to reproduce this answer (with temperature 0, "
                                  "every seed gives the same text)")
    timing: RequestDurations


class InfillResponse(SampleResponse):
    prefix: str | None = Field(None, description="the request's prefix (prefix/suffix requests)")
    suffix: str | None = Field(None, description="the request's suffix (prefix/suffix requests)")
    segments: list[str | int] | None = Field(None, description="the request's segments (segments requests)")


class RewriteResponse(SampleResponse):
    text: str = Field(description="the request's text")
    spans: list[tuple[int, int]] = Field(description="the request's spans (into `text`; each sample's own "
                                                     "`spans` locate the new text in it)")
    lengths: list[int] | None = Field(None, description="the request's lengths, when it gave them")


class StepSample(BaseModel):
    text: str = Field(description="the sample so far; masked positions drawn as ░")
    masks_left: int = Field(description="positions still masked (never grows)")
    pieces: list[str] | None = Field(None, description="one string per position (with `pieces: true`)")


class StepEvent(BaseModel):
    """Data of an SSE `step` event."""

    step: int = Field(description="steps taken so far")
    steps: int = Field(description="steps asked for (a final denoise follows the last one)")
    t: float = Field(description="diffusion time reached, from 1 (all masked) to about 0")
    samples: list[StepSample]
    prefix_tokens: int | None = Field(None, description="with `pieces`: fixed positions at the start")
    suffix_tokens: int | None = Field(None, description="with `pieces`: fixed positions at the end")
    fixed: list[bool] | None = Field(None, description="with `pieces`: one flag per position, true where the "
                                                       "request's text is kept (the same for every sample)")


class ErrorEvent(BaseModel):
    """Data of an SSE `error` event; the stream ends after it."""

    error: str


# Response headers, as the OpenAPI `responses` of the routes document them.
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "`Bearer`: send `Authorization: Bearer <key>`",
                                         "schema": {"type": "string"}}}
ERROR_HEADERS = {401: WWW_AUTHENTICATE, 503: RETRY_AFTER}


def documented_errors(body: type[BaseModel], descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """A route's OpenAPI `responses` for error statuses whose body is `body` (FastAPI's {"detail"} or OpenAI's
    {"error"}), with the headers a 401 and a 503 carry."""
    return {status: {"model": body, "description": description,
                     **({"headers": ERROR_HEADERS[status]} if status in ERROR_HEADERS else {})}
            for status, description in descriptions.items()}


class ErrorResponse(BaseModel):
    detail: str = Field(description="what went wrong and what to change")


class Health(BaseModel):
    status: Literal["ok", "loading", "failed", "draining"]
    error: str | None = Field(None, description="why loading failed (status `failed`)")


class FlashAttention(BaseModel):
    available: bool = Field(description="the flash-attn package imports on this host")
    used: bool = Field(description="attention runs through it (CUDA and a half-precision dtype)")


class ModelInfo(BaseModel):
    name: str
    source: str = Field(description="what SEDD_MODEL named")
    layout: str = Field(description="checkpoint layout: oxen, hf or run")
    tokenizer: str
    vocab_size: int = Field(description="model states, the mask included for the absorbing graph")
    length: int = Field(description="tokens per sample at most")
    device: str
    dtype: str = Field(description="what the matmuls run in (the weights' storage dtype)")
    dtype_choice: str = Field("asked", description="how dtype was picked: 'asked' (SEDD_DTYPE, --dtype) or "
                              "'auto: ...' with the reason (on a CPU: bfloat16 where it has native bf16 "
                              "instructions, float32 elsewhere)")
    cpu_bf16: str | None = Field(None, description="the native bf16 instruction set this CPU has (amx_bf16, "
                                 "avx512_bf16), or null")
    compiled: bool = Field(False, description="the network runs through torch.compile (SEDD_COMPILE)")
    parameters: int
    graph: str
    noise: str
    predictors: list[str]
    max_rows: int = Field(description="rows in one model pass, over all requests")
    max_queue: int
    max_steps: int
    max_samples: int
    flash_attn: FlashAttention
    replica: str | None = Field(None, description="the replica that answered, as in the X-Replica-ID header "
                                "(SEDD_REPLICA_ID; unset: HOST:PID, under Ray Serve the replica's id)")
