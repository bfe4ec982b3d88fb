"""GET /health (open), GET /v1/model and GET /metrics (behind the API key when there is one)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from sedd_core import loading
from sedd_core.fast_model import FLASH_ATTN_AVAILABLE, FastSEDD, flash_attn_usable
from sedd_core.sampling import PREDICTORS

from ..auth import require_api_key
from ..schemas import RETRY_AFTER, WWW_AUTHENTICATE, ErrorResponse, Health, ModelInfo
from ..state import AppState, ReadyState

router = APIRouter(tags=["server"])


@router.get("/health", response_model=Health,
            responses={503: {"model": Health, "description": "not ready: loading, failed or shutting down",
                             "headers": RETRY_AFTER}},
            summary="Readiness: 200 once the model is loaded and warmed up")
async def health(state: AppState):
    if state.ready:
        return JSONResponse({"status": "ok"})
    body = Health(status=state.status, error=state.error).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/v1/model", response_model=ModelInfo, dependencies=[Depends(require_api_key)],
            responses={401: {"model": ErrorResponse, "description": "missing or wrong API key",
                             "headers": WWW_AUTHENTICATE},
                       503: {"model": ErrorResponse, "description": "model loading or shutting down",
                             "headers": RETRY_AFTER}},
            summary="The loaded model and this server's limits")
async def model_info(state: ReadyState, request: Request) -> ModelInfo:
    lm, settings = state.lm, state.settings
    return ModelInfo(
        name=lm.name, source=lm.source, layout=lm.layout, tokenizer=lm.tokenizer.name,
        vocab_size=lm.config.vocab_size, length=lm.length, device=str(lm.device),
        dtype=str(lm.dtype).removeprefix("torch."), dtype_choice=lm.dtype_choice,
        cpu_bf16=loading.cpu_bf16_support() if lm.device.type == "cpu" else None,
        compiled=isinstance(lm.runner, FastSEDD) and lm.runner.compiled, parameters=lm.parameters,
        graph=lm.config.graph,
        noise=lm.config.noise, predictors=list(PREDICTORS), max_rows=settings.max_rows,
        max_queue=settings.max_queue, max_steps=settings.max_steps, max_samples=settings.max_samples,
        flash_attn={"available": FLASH_ATTN_AVAILABLE,
                    "used": isinstance(lm.runner, FastSEDD) and flash_attn_usable(lm.device, lm.dtype)},
        replica=request.app.state.replica_id,
    )


@router.get("/metrics", dependencies=[Depends(require_api_key)], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
                       401: {"model": ErrorResponse, "description": "missing or wrong API key",
                             "headers": WWW_AUTHENTICATE}},
            summary="Prometheus metrics")
async def metrics(state: AppState) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
