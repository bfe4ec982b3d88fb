"""The FastAPI application: `create_app(settings)`; `sedd serve` runs it under uvicorn.

    uvicorn app.main:create_app --factory        # settings from SEDD_* variables

The model and the batching engine are created once, in the lifespan handler, and reach the
endpoints through `Depends` (app.state). Everything about generation lives in sedd_core;
this package validates, routes, streams and reports.
"""
from __future__ import annotations

from app.openmp import openmp_wait_defaults

# OpenMP threads spin briefly, then sleep (app/openmp.py). The runtime reads this when torch loads, so it is
# set before this module imports torch: for `uvicorn app.main:create_app`; `sedd serve` sets it itself.
openmp_wait_defaults()

import asyncio
import logging
import os
import re
import socket
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import sedd_core

from . import state as server_state
from .middleware import BodySizeLimit, ReplicaHeader
from .openai_schemas import OpenAIError, error_body
from .routes import generation, meta, openai, pages, score
from .schemas import ErrorEvent, InfillRequest, RewriteRequest, SampleRequest, StepEvent, default_steps
from .settings import Settings

DESCRIPTION = """\
Text from a SEDD (Score Entropy Discrete Diffusion) model: every position starts masked and
the model unmasks them over `steps` denoising steps. Requests from many clients share each
model pass (continuous batching), so concurrent clients cost little more than one.

* `POST /sample`: unconditional samples. `POST /infill`: keep a prefix and a suffix, fill the middle; or
  keep text at any positions with `segments` (kept text and gaps). `POST /rewrite`: regenerate spans of a text.
* `stream: true` (or `Accept: text/event-stream`) streams `step` events and one `done` event.
* `POST /v1/completions`, `GET /v1/models`: OpenAI-compatible completions (`suffix` for infill), streamed or not.
* `POST /v1/score`: the diffusion ELBO of texts (an upper bound on their negative log-likelihood).
* `GET /v1/model`: the model and this server's limits. `GET /health`: readiness. `GET /metrics`: Prometheus.
"""

BODY_MODELS = {"/sample": SampleRequest, "/infill": InfillRequest, "/rewrite": RewriteRequest}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    _configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state: server_state.ServerState = app.state.sedd
        server_state.drain_on_signals(state)
        loading = asyncio.create_task(server_state.start(state))
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            await server_state.stop(state)

    app = FastAPI(title="sedd-serve", version=sedd_core.__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.sedd = server_state.ServerState(settings=settings)
    app.state.replica_id = settings.replica_id or f"{socket.gethostname()}:{os.getpid()}"
    app.include_router(generation.router)
    app.include_router(meta.router)
    app.include_router(openai.router)
    app.include_router(score.router)
    app.include_router(pages.router)
    if settings.fault_injection:  # test-only; never on by default
        from .routes import faults

        logging.getLogger("sedd.server").warning("SEDD_FAULT_INJECTION is on: POST /_faults can fail model passes "
                                                 "(for tests only)")
        app.include_router(faults.router)
    app.mount("/static", pages.static_files(), name="static")
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _unreadable_body)
    app.add_exception_handler(OpenAIError, _openai_error)
    app.openapi = lambda: _openapi_with_events(app)
    # Added last = outermost: CORS headers reach the browser on 413 and 401 answers too.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ReplicaHeader, replica=app.state.replica_id)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Accept"],
                           expose_headers=["Retry-After", "X-Request-ID", "X-Replica-ID"], max_age=600)
    return app


def _configure_logging(level: str) -> None:
    """Our `sedd.*` loggers print beside uvicorn's, at SEDD_LOG_LEVEL."""
    logger = logging.getLogger("sedd")
    logger.setLevel(5 if level == "trace" else level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _openapi_with_events(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus the data of the SSE events, which no route returns as a model, with this
    server's limits (steps, samples and, once the model is loaded, its length) as the fields' bounds."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (StepEvent, ErrorEvent):
            event_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(event_schema.pop("$defs", {}))
            components[model.__name__] = event_schema
        state: server_state.ServerState = app.state.sedd
        for name in ("SampleRequest", "InfillRequest", "RewriteRequest"):
            fields = components[name]["properties"]
            fields["steps"].update(maximum=state.settings.max_steps,
                                   default=default_steps(state.settings.max_steps))
            fields["num_samples"]["maximum"] = state.settings.max_samples
            if state.lm is not None and "length" in fields:
                length = fields["length"]
                for option in length.get("anyOf", [length]):
                    if option.get("type") == "integer":
                        option["maximum"] = state.lm.length
        _openai_limits(components, state)
        if state.lm is None:  # the model's length is not known yet: do not keep this version
            return schema
        app.openapi_schema = schema
    return app.openapi_schema


def _integer_option(field: dict[str, Any]) -> dict[str, Any]:
    """The integer schema of a field that may also be null (anyOf)."""
    return next(option for option in field.get("anyOf", [field]) if option.get("type") == "integer")


def _openai_limits(components: dict[str, Any], state: server_state.ServerState) -> None:
    """This server's limits on the /v1 bodies: steps, choices and texts per request, score samples and,
    once loaded, the model's name and length."""
    settings = state.settings
    fields = components["CompletionRequest"]["properties"]
    _integer_option(fields["steps"]).update(maximum=settings.max_steps)
    fields["n"]["maximum"] = settings.max_samples
    for option in fields["prompt"]["anyOf"]:
        if option.get("type") == "array":
            option.update(minItems=1, maxItems=settings.max_samples)
    score = components["ScoreRequest"]["properties"]
    score["samples"]["maximum"] = settings.max_score_samples
    for option in score["text"]["anyOf"]:
        if option.get("type") == "array":
            option.update(minItems=1, maxItems=settings.max_samples)
    texts = [option for option in score["text"]["anyOf"] if option.get("type") == "string"]
    texts += [option["items"] for option in score["text"]["anyOf"] if option.get("type") == "array"]
    for text in texts:
        text["minLength"] = 1
    if state.lm is not None:
        fields["model"]["enum"] = [state.lm.name]
        _integer_option(fields["max_tokens"])["maximum"] = state.lm.length
        chars = getattr(state.lm.tokenizer, "chars", None)  # a character vocabulary encodes only these
        if chars is not None:
            for text in texts:
                text["pattern"] = "^[" + "".join(re.escape(c) for c in chars) + "]+$"


# ---- readable validation errors -------------------------------------------------------------------
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 whose `detail` is one sentence per problem, naming the field; `errors` keeps the structure.
    On /v1/* (OpenAI's clients): 400 in OpenAI's error shape, `param` naming the first field at fault."""
    model = BODY_MODELS.get(request.url.path)
    messages, errors = [], []
    for error in exc.errors():
        messages.append(_describe(error, model))
        errors.append({key: error[key] for key in ("loc", "msg", "type") if key in error})
    if _openai_path(request):
        loc = [str(part) for part in exc.errors()[0].get("loc", ())] if exc.errors() else []
        param = (".".join(loc[1:]) if loc[:1] == ["body"] else ".".join(loc)) or None
        return JSONResponse(error_body(400, "; ".join(messages), param=param, code="invalid_value"), status_code=400)
    return JSONResponse({"detail": "; ".join(messages), "errors": errors}, status_code=422)


def _openai_path(request: Request) -> bool:
    """/v1/* answers errors as OpenAI does (GET /v1/model included: it sits under the same prefix)."""
    return request.url.path.startswith("/v1/")


async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


async def _unreadable_body(request: Request, exc: StarletteHTTPException):
    """A body that is not UTF-8 text is invalid JSON like any other: 422 with a sentence, where FastAPI
    would answer a bare 400 ("There was an error parsing the body"). Every other HTTP error as FastAPI does."""
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        cause = exc.__cause__
        message = f"the request body is not valid JSON: it is not UTF-8 text (byte {cause.start})"
        if _openai_path(request):
            return JSONResponse(error_body(400, message, code="invalid_json"), status_code=400)
        return JSONResponse({"detail": message, "errors": [{"loc": ["body"], "msg": message, "type": "json_invalid"}]},
                            status_code=422)
    if _openai_path(request):
        code = {401: "invalid_api_key", 404: "not_found", 503: "unavailable"}.get(exc.status_code)
        return JSONResponse(error_body(exc.status_code, str(exc.detail), code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))
    return await http_exception_handler(request, exc)


def _describe(error: dict[str, Any], model) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    field = ".".join(loc[1:]) if loc[:1] == ["body"] else ".".join(loc)
    kind, msg = error.get("type", ""), error.get("msg", "invalid")
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "not JSON")
        where = f" (at character {loc[1]})" if len(loc) > 1 else ""
        return f"the request body is not valid JSON: {reason}{where}"
    if kind == "extra_forbidden":
        allowed = f"; the fields are: {', '.join(model.model_fields)}" if model is not None else ""
        return f"unknown field {field!r}{allowed}"
    if kind == "missing" and not field:
        return "the request body is missing: send a JSON object, e.g. {} (every field has a default)"
    if not field and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object (and Content-Type: application/json)"
    return f"{field}: {msg}" if field else msg
