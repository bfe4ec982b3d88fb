"""Request and response bodies. Limits, descriptions and examples here are what /docs shows.

Limits that depend on the server's settings or on the model (most steps, samples and the
model's length) are checked per request and listed by GET /v1/model.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**63 - 1


DEFAULT_STEPS = 128


def default_steps(max_steps: int) -> int:
    """The steps a request gets when it names none: 128, or the server's SEDD_MAX_STEPS if lower."""
    return min(DEFAULT_STEPS, max_steps)


class SampleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"num_samples": 2, "steps": 128, "predictor": "analytic", "seed": 42},
        {"num_samples": 1, "steps": 64, "stream": True, "stream_every": 4},
    ]})

    num_samples: int = Field(1, ge=1, strict=True, description="samples to draw; at most the server's max_samples "
                                                  "(GET /v1/model)", examples=[1])
    steps: int = Field(DEFAULT_STEPS, ge=1, strict=True, description="denoising steps: more steps, better text, longer wait; at most "
                                              "the server's max_steps", examples=[128])
    length: int | None = Field(None, ge=1, strict=True, description="tokens per sample; null = the model's length "
                                                       "(its maximum)", examples=[None])
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

    @field_validator("num_samples", "steps", "length", "seed", "stream_every", mode="before")
    @classmethod
    def _integral_numbers(cls, value):
        """JSON Schema's `integer` includes 2.0: a number with no fractional part is that integer. Strings,
        booleans and 2.5 are still refused (the fields are strict)."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


class InfillRequest(SampleRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prefix": "di", "suffix": "ok", "num_samples": 2, "steps": 64, "seed": 7},
        {"prefix": "Once upon a time", "suffix": " and they lived happily ever after.", "steps": 256,
         "stream": True, "stream_every": 8},
    ]})

    prefix: str = Field("", description="text fixed at the start of the canvas, kept exactly",
                        examples=["Once upon a time"])
    suffix: str = Field("", description="text fixed at the end of the canvas, kept exactly",
                        examples=[" and they lived happily ever after."])


class Sample(BaseModel):
    text: str = Field(description="the generated text (for infill: prefix, middle and suffix)")


class Timing(BaseModel):
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
    length: int = Field(description="tokens per sample (the canvas)")
    seed: int = Field(description="the seed used: send it back to reproduce this answer")
    timing: Timing


class InfillResponse(SampleResponse):
    prefix: str
    suffix: str


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


class ErrorEvent(BaseModel):
    """Data of an SSE `error` event; the stream ends after it."""

    error: str


# Response headers, as the OpenAPI `responses` of the routes document them.
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "`Bearer`: send `Authorization: Bearer <key>`",
                                         "schema": {"type": "string"}}}


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
    dtype: str
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
