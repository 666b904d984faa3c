"""Per-request context for the HTTP API: request id, access log line, request metrics,
and the limits that must hold before a body is parsed.

Plain ASGI middlewares, so the request id (a contextvar) also covers the body
of streaming responses, and a body is counted while it arrives.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_cluster.contract.config import LimitsConfig
from mlx_cluster.contract.logs import REQUEST_ID_HEADER, request_id
from mlx_cluster.coordinator.api.errors import HTTP_CODES, ApiError, shaped
from mlx_cluster.coordinator.api.metrics import Metrics
from mlx_cluster.coordinator.api.schemas import max_messages

log = logging.getLogger("mlx_cluster.coordinator.http")

KNOWN_ENDPOINTS = {
    "/",
    "/health",
    "/metrics",
    "/generate",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/cluster/events",
}
# Streams that stay open as long as a page does: not counted as requests in flight.
LONG_LIVED = frozenset({"/v1/cluster/events"})


class RequestContext:
    """Sets the request id, counts the request, and logs one line when it is answered."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get(REQUEST_ID_HEADER, "")[:64] or uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        path = scope["path"] if scope["path"] in KNOWN_ENDPOINTS else "other"
        status: dict[str, Any] = {"code": 500}
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", []).append((REQUEST_ID_HEADER.encode(), rid.encode()))
            await send(message)

        in_flight = 0 if path in LONG_LIVED else 1
        self.metrics.in_flight.inc(in_flight)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec(in_flight)
            self.metrics.requests.labels(path, str(status["code"])).inc()
            if path != "/metrics":
                log.info(
                    "%s %s -> %d in %.1f ms",
                    scope["method"],
                    scope["path"],
                    status["code"],
                    (time.perf_counter() - started) * 1000,
                )
            request_id.reset(token)


class RequestLimits:
    """Refuses a body over `limits.body_limit` with a 413 as soon as it is known: from
    its Content-Length, or once the bytes read pass the limit (before any parsing).
    Also sets the message limit that validating a chat request checks first."""

    def __init__(self, app: ASGIApp, limits: LimitsConfig) -> None:
        self.app = app
        self.limit = limits.body_limit
        self.max_messages = limits.max_messages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            refusal = ApiError(413, self._message(int(declared)), code=HTTP_CODES[413])
            await shaped(scope["path"], refusal)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # the error handler gives it OpenAI's shape
                    raise HTTPException(413, self._message(received, "at least "))
            return message

        token = max_messages.set(self.max_messages)
        try:
            await self.app(scope, counted, send)
        finally:
            max_messages.reset(token)

    def _message(self, size: int, at_least: str = "") -> str:
        return f"the request body is {at_least}{size} bytes, the limit is {self.limit} bytes"
