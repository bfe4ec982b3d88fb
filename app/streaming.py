"""How a route's answer reaches a client that may leave: every streamed answer is an SSE response with the
server's heartbeat and a cut-off after the shutdown's drain, and a client that left before its JSON answer
gets 499. The generation routes, /v1/completions and /v1/score answer through here."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Response
from sse_starlette import EventSourceResponse, ServerSentEvent

if TYPE_CHECKING:
    from .settings import Settings

STREAM_GRACE_MARGIN_S = 5  # sse-starlette cuts streams this long after the drain timeout, as a last resort
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer


def event_stream(events: AsyncIterator[ServerSentEvent], settings: Settings,
                 headers: dict[str, str]) -> EventSourceResponse:
    """`events` as Server-Sent Events, with `: ping` comments while idle; after a shutdown's drain (which ends
    a stream with an error event itself) the stream is cut."""
    return EventSourceResponse(events, headers=headers, ping=settings.stream_heartbeat_s,
                               shutdown_grace_period=settings.drain_timeout_s + STREAM_GRACE_MARGIN_S)


def client_closed() -> Response:
    """The answer to a client that left first: nobody reads it, but the access log and metrics do."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)
