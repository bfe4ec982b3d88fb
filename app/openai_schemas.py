"""The OpenAI-compatible protocol in one module: request, response, stream-chunk and error shapes of
/v1/completions and /v1/models, and the body of /v1/score.

The sampling controls are OpenAI's `temperature` and `top_p`, and vLLM's extra fields `top_k` and `min_p`
(app/schemas.py describes them; null = the default). Fields OpenAI defines that a diffusion model cannot
honour (logprobs, echo, best_of > n, the penalties, logit_bias) are accepted at their no-op value and
refused otherwise (`refused_parameter`): the schema says which value is accepted, the route answers 400
naming the field. docs/openai.md lists them and why.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .schemas import (
    CONTROLS,
    MAX_SEED,
    check_control_field,
    control_field,
    documented_errors,
    integral_number,
)

MAX_STOP_STRINGS = 4  # as OpenAI


class OpenAIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @property
    def type(self) -> str:
        return error_type(self.status)


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


class ErrorDetail(BaseModel):
    message: str = Field(description="what went wrong and what to change")
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error or server_error")
    param: str | None = Field(description="the request field at fault, when one is")
    code: str | None = Field(description="a machine-readable reason, when there is one")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


ERROR_DESCRIPTIONS = {
    400: "invalid input or a refused OpenAI parameter; `error.param` names the field",
    401: "missing or wrong API key (when the server has one)",
    404: "no model of that name is served here (GET /v1/models)",
    413: "request body over SEDD_MAX_BODY_BYTES (FastAPI's {\"detail\"} shape: refused before routing)",
    500: "the generation failed (a fault in its model pass); other requests are not affected",
    503: "model loading, queue full or shutting down",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a /v1 route for these error statuses (413 among them: it comes before routing,
    in FastAPI's shape)."""
    answers = documented_errors(ErrorBody, {status: ERROR_DESCRIPTIONS[status] for status in statuses})
    answers[413].update(model=None, content={"application/json": {"schema": {
        "type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}}}})
    return answers


# ---- /v1/completions ------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, strict=True, description="end the stream with a chunk that carries "
                                "`usage` and no choices")


def _only(value: object, description: str) -> Any:
    """A field OpenAI defines that is accepted only at its no-op value (or null)."""
    return Field(None, description=f"not supported: {description}",
                 json_schema_extra={"enum": [value, None]})


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "tiny-five", "prompt": "hel", "suffix": "!", "n": 2, "seed": 1},
        {"model": "tiny-five", "prompt": ["he", "wo"], "max_tokens": 4, "stream": True,
         "stream_options": {"include_usage": True}},
    ]})

    model: str = Field(description="the served model's name (GET /v1/models)")
    prompt: str | list[str] = Field(description="text kept before the generated part; a list asks for "
                                    "completions of several prompts in one request", examples=["Once upon a time"])
    suffix: str | None = Field(None, description="text kept after the generated part (insert mode)")
    max_tokens: int | None = Field(None, ge=1, strict=True, description="tokens generated between prompt and "
                                   "suffix; null = fill the model's canvas")
    n: int = Field(1, ge=1, strict=True, description="completions per prompt")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True, description="for a reproducible answer; "
                             "null = a fresh one")
    stream: bool = Field(False, strict=True, description="answer with Server-Sent Events: `data: {chunk}` lines "
                         "and a final `data: [DONE]`")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_STRINGS} strings; the generated "
                                         "text is cut at the first one found (finish_reason `stop`)")
    user: str | None = Field(None, description="an end-user id; accepted and ignored")
    # Diffusion settings (the SDKs send them with extra_body).
    steps: int | None = Field(None, ge=1, strict=True, description="denoising steps; null = 128 or the "
                              "server's max_steps if lower")
    predictor: Literal["analytic", "euler"] = Field("analytic", description="the update rule of each step")
    denoising: bool = Field(False, strict=True, description="with `stream`: every chunk carries the whole "
                            "current canvas (masks drawn as ░) instead of deltas")
    # Sampling controls: OpenAI's temperature and top_p; top_k and min_p as vLLM takes them (extra fields).
    temperature: float | None = control_field("temperature", None, nullable=True, note="; null = 1")
    top_p: float | None = control_field("top_p", None, nullable=True, note="; null = 1")
    top_k: int | None = control_field("top_k", None, nullable=True, note="; null = 0 (an extra field, as vLLM)")
    min_p: float | None = control_field("min_p", None, nullable=True, note="; null = 0 (an extra field, as vLLM)")
    # OpenAI's fields that a diffusion sampler cannot honour.
    logprobs: int | None = _only(None, "per-token log-probabilities do not exist for a diffusion sample")
    echo: bool | None = _only(False, "send the prompt back only as your own prefix")
    best_of: int | None = Field(None, ge=1, strict=True, description="not supported above `n`: no likelihood "
                                "ranks the candidates")
    frequency_penalty: float | None = _only(0, "tokens appear all at once, not one after another")
    presence_penalty: float | None = _only(0, "tokens appear all at once, not one after another")
    logit_bias: dict[str, float] | None = Field(None, description="not supported (only {} or null)",
                                                json_schema_extra={"maxProperties": 0})

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt (a list of strings or one string)")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None:
            if len(stops) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
            if any(not stop for stop in stops):
                raise ValueError("a stop string may not be empty")
        return value

    _integral_numbers = field_validator("max_tokens", "n", "seed", "steps", "best_of", "top_k",
                                        mode="before")(integral_number)
    _control_ranges = field_validator(*CONTROLS)(check_control_field)

    def controls(self) -> dict:
        """make_job's keyword arguments for the controls the request sets (null: the library's default)."""
        return {name: getattr(self, name) for name in CONTROLS if getattr(self, name) is not None}

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


def refused_parameter(body: CompletionRequest) -> OpenAIError | None:
    """The first field set to a value we cannot honour, as the 400 that names it."""
    def refuse(param: str, why: str) -> OpenAIError:
        return OpenAIError(400, f"{param} is not supported by this diffusion model: {why}", param=param,
                           code="unsupported_parameter")

    if body.logprobs is not None:
        return refuse("logprobs", "a diffusion sample has no per-token log-probabilities; leave it out (or "
                                  "score a text with POST /v1/score)")
    if body.echo:
        return refuse("echo", "leave it out or false; the prompt is your own text")
    if body.best_of is not None and body.best_of > body.n:
        return refuse("best_of", f"no likelihood ranks extra candidates; leave it out or at most n ({body.n})")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name) not in (None, 0):
            return refuse(name, "tokens are revealed in parallel, not one after another; leave it out or 0")
    if body.logit_bias:
        return refuse("logit_bias", "biasing the denoising updates is not implemented; leave it out or {}")
    return None


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    text: str = Field(description="the generated text only (neither prompt nor suffix); while streaming with "
                      "`denoising`, the whole canvas")
    index: int = Field(description="prompt-major: prompt i, completion j is i * n + j")
    logprobs: None = None
    finish_reason: FinishReason | None = Field(description="`stop` when cut at a stop string, else `length`; "
                                               "null in a chunk before the choice ends")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens of every prompt and its suffix (once per prompt)")
    completion_tokens: int = Field(description="positions generated: max_tokens (or the gap) times the choices")
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(description="Unix time in seconds")
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, description="in a JSON answer always; in a stream only in the last chunk, "
                                "with `stream_options.include_usage`")


# ---- /v1/models -----------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the server loaded the model")
    owned_by: str = "sedd-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- /v1/score ------------------------------------------------------------------------------------
class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"text": "hello world!", "samples": 128, "seed": 0},
        {"text": ["hello world!", "zzzz zzzz zz"], "samples": 256},
    ]})

    text: str | list[str] = Field(description="a text, or a list of texts, to score", examples=["hello world!"])
    samples: int = Field(128, ge=1, strict=True, description="Monte-Carlo draws of the noise level per window; "
                         "at most the server's SEDD_MAX_SCORE_SAMPLES")
    seed: int = Field(0, ge=0, le=MAX_SEED, strict=True, description="the same seed, text and samples give the "
                      "same estimate")

    _integral_numbers = field_validator("samples", "seed", mode="before")(integral_number)

    @property
    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


class TextScore(BaseModel):
    text: str
    tokens: int = Field(description="tokens of the text")
    nll_nats: float = Field(description="the diffusion ELBO: an upper bound on -log p(text), in nats (estimate)")
    stderr_nats: float | None = Field(description="Monte-Carlo standard error of nll_nats (null with one sample)")
    bits_per_token: float = Field(description="nll_nats / (tokens ln 2)")
    perplexity_bound: float = Field(description="exp(nll_nats / tokens): an upper bound on the perplexity")


class ScoreResponse(BaseModel):
    model: str
    results: list[TextScore]
