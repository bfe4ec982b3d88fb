"""Optional bearer-token check for the generation endpoints, /v1/model and /metrics.

With no SEDD_API_KEY every request passes. /health and the web page stay open.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="the server's SEDD_API_KEY, when it has one")


async def require_api_key(request: Request,
                          credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    key = request.app.state.sedd.settings.api_key
    if key is None:
        return
    given = credentials.credentials if credentials is not None else ""
    # Constant time: digests of equal length, compared without stopping at the first difference.
    if not hmac.compare_digest(_digest(given), _digest(key.get_secret_value())):
        detail = ("invalid API key" if credentials is not None
                  else "this server needs an API key: send the header `Authorization: Bearer <key>`")
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()
