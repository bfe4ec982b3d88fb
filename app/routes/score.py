"""POST /v1/score: the diffusion ELBO of texts, estimated by the shared estimator
(`sedd_core.evaluate.TextScores`, as `sedd score`) on the engine's device thread.

The route validates and tokenizes; the engine computes the draws a bounded chunk at a time between
denoising steps (so sampling requests keep flowing) and hands the finished item back; the route reads
its results. docs/openai.md says what exactly is estimated.
"""
from __future__ import annotations

import math

from fastapi import APIRouter, Depends, Request, Response

from sedd_core.elbo import ScoreError, default_rows
from sedd_core.evaluate import TextScores

from .. import submissions
from ..auth import require_api_key
from ..openai_schemas import OpenAIError, ScoreRequest, ScoreResponse, TextScore, error_responses
from ..state import ReadyState
from ..streaming import client_closed

router = APIRouter(tags=["scoring"], dependencies=[Depends(require_api_key)])


@router.post("/v1/score", response_model=ScoreResponse, responses=error_responses(400, 401, 413, 500, 503),
             summary="Likelihood bound of texts (the diffusion ELBO), with its standard error")
async def score(body: ScoreRequest, request: Request, state: ReadyState):
    """For each text: an upper bound on -log p(text) in nats, estimated with `samples` Monte-Carlo draws of
    the noise level per window of the model's length, and its standard error."""
    lm, settings = state.lm, state.settings
    texts = body.texts
    if not texts:
        raise OpenAIError(400, "text is an empty list: give a text or a list of at least one", param="text")
    if len(texts) > settings.max_samples:
        raise OpenAIError(400, f"{len(texts)} texts; this server scores at most {settings.max_samples} per request "
                               "(SEDD_MAX_SAMPLES): send fewer", param="text")
    try:
        work = TextScores(lm, texts, body.samples, body.seed)
    except ScoreError as exc:
        raise OpenAIError(400, str(exc), param="text") from None
    if body.samples > settings.max_score_samples:
        raise OpenAIError(400, f"samples must be at most {settings.max_score_samples} (this server's "
                               f"SEDD_MAX_SCORE_SAMPLES), got {body.samples}", param="samples")
    # A chunk costs about one sampling pass: at most SEDD_MAX_ROWS rows (and the estimator's memory bound).
    rows = min(settings.max_rows, default_rows(lm.length, lm.graph.dim))
    submission = submissions.submit_work(state, work, rows)
    finals = await submissions.results([submission], request)
    if finals is None:
        return client_closed()
    results = [TextScore(text=r.text, tokens=r.tokens, nll_nats=r.nll_nats,
                         stderr_nats=None if math.isnan(r.stderr_nats) else r.stderr_nats,
                         bits_per_token=r.bits_per_token, perplexity_bound=r.perplexity_bound)
               for r in finals[0].work.results()]
    return Response(ScoreResponse(model=lm.name, results=results).model_dump_json(), media_type="application/json")
