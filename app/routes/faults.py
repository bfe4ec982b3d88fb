"""Test-only fault injection: POST /_faults makes the next denoising passes raise.

The router exists only when the server starts with SEDD_FAULT_INJECTION=1 (never by default), so
reliability tests can fail a pass through the real server. For the next `passes` passes that hold at
least `min_requests` requests, `"kind": "error"` raises a RuntimeError (the pass's requests fail) and
`"kind": "oom"` a torch.cuda.OutOfMemoryError (the engine retries a pass of several requests one request
at a time; a request that runs out of memory alone fails). GET /_faults says how many passes failed.
Behind the API key like every other endpoint but /health.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Literal

import torch
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from sedd_core.sampling import Job

from ..auth import require_api_key
from ..state import ReadyState

router = APIRouter(tags=["testing"], include_in_schema=False, dependencies=[Depends(require_api_key)])


class FaultPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    passes: int = Field(1, ge=0, le=1000, description="how many of the next passes fail")
    min_requests: int = Field(1, ge=1, description="only passes of at least this many requests fail")
    kind: Literal["error", "oom"] = "error"


class FaultInjector:
    """Installed as the engine's fault_injector; called on the worker thread before every pass."""

    def __init__(self):
        self._lock = threading.Lock()
        self.plan = FaultPlan(passes=0)
        self.fired = 0

    def arm(self, plan: FaultPlan) -> None:
        with self._lock:
            self.plan, self.fired = plan, 0

    def __call__(self, jobs: Sequence[Job]) -> None:
        with self._lock:
            if self.plan.passes <= 0 or len(jobs) < self.plan.min_requests:
                return
            self.plan.passes -= 1
            self.fired += 1
        if self.plan.kind == "oom":
            raise torch.cuda.OutOfMemoryError("injected: CUDA out of memory (SEDD_FAULT_INJECTION)")
        raise RuntimeError("injected fault (SEDD_FAULT_INJECTION)")


@router.post("/_faults")
async def arm_faults(plan: FaultPlan, state: ReadyState) -> dict:
    injector = state.engine.fault_injector
    if not isinstance(injector, FaultInjector):
        injector = state.engine.fault_injector = FaultInjector()
    injector.arm(plan)
    return {"armed": plan.model_dump()}


@router.get("/_faults")
async def fault_status(state: ReadyState) -> dict:
    injector = state.engine.fault_injector
    return {"fired": injector.fired if isinstance(injector, FaultInjector) else 0}
