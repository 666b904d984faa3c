"""Every HTTP error, from one place, in OpenAI's shape.

`{"error": {"message", "type", "param", "code"}}`. A client's mistake is a 4xx
naming the field; a cluster problem is a 5xx saying which worker; no stack
trace reaches a client.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlx_cluster.contract.errors import (
    RECOVERABLE,
    ClusterError,
    InvalidArgument,
    KVCapacityExceeded,
    MessageTooLarge,
    SessionTooLarge,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
OLLAMA_PREFIX = "/api/"  # Ollama's routes: its error shape
ANTHROPIC_PREFIX = "/v1/messages"  # Anthropic's Messages API: its error shape
HTTP_CODES = {404: "not_found", 413: "request_too_large"}  # error codes of plain HTTP errors


@dataclass
class ApiError(Exception):
    """An error with its HTTP status, in OpenAI's terms."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error(exc: BaseException) -> ApiError:
    """The ApiError a failure becomes (also used for error events inside streams).

    KV full right now is a 429 to retry; a request that can never fit the KV
    budget is the client's 400; a gRPC message over its size limit is a setting
    of this deployment, a 500 naming that setting.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidArgument):
        return ApiError(400, str(exc))
    if isinstance(exc, SessionTooLarge):
        return ApiError(
            400,
            f"the prompt and max_tokens together need more KV cache than the cluster holds "
            f"for one request; shorten the prompt or lower max_tokens: {exc}",
            code="context_length_exceeded",
        )
    if isinstance(exc, KVCapacityExceeded):
        return ApiError(
            429,
            f"the cluster is at capacity, retry shortly: {exc}",
            type="rate_limit_error",
            code="capacity_exceeded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(exc, MessageTooLarge):
        text = str(exc)
        advice = "" if "max_message_mb" in text else MessageTooLarge.advice
        return ApiError(500, f"{text}{advice}", "server_error", code="message_too_large")
    if isinstance(exc, RECOVERABLE):
        return ApiError(
            503, f"a worker is unavailable: {exc}", "server_error", code="worker_unavailable"
        )
    if isinstance(exc, TimeoutError):
        return ApiError(504, "the request timed out", "server_error", code="timeout")
    if isinstance(exc, ClusterError):
        return ApiError(502, f"a worker failed: {exc}", "server_error", code="worker_error")
    log.error("unexpected error", exc_info=exc)
    return ApiError(500, "internal server error", "server_error", code="internal_error")


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    param = _field_path(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", param=None, code="invalid_json")
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    where = f"'{param}'" if param else "the request body"
    got = first.get("input")
    if isinstance(got, str | int | float | bool) and first.get("type") != "missing":
        message += f" (got {json.dumps(got)[:80]})"
    return ApiError(400, f"invalid value for {where}: {message}", param=param, code="invalid_value")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple[Any, ...]) -> str | None:
    """'messages.0.role' from pydantic's location, without union member tags like 'list[str]'."""
    parts: list[str] = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        text = str(part)
        if "[" in text or text in _TYPE_TAGS or text.startswith("function-"):
            break
        parts.append(text)
    return ".".join(parts) or None


# Anthropic's error types by HTTP status (its Messages API's shape).
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "api_error",
}


def shaped(path: str, error: ApiError) -> JSONResponse:
    """The error in the shape of the API at `path`: Ollama's `{"error": message}` under
    /api/, Anthropic's under /v1/messages, OpenAI's everywhere else."""
    if path.startswith(OLLAMA_PREFIX):
        where = f" ({error.param})" if error.param and error.param not in error.message else ""
        body: dict[str, Any] = {"error": f"{error.message}{where}"}
    elif path.startswith(ANTHROPIC_PREFIX):
        kind = ANTHROPIC_TYPES.get(error.status, "api_error")
        body = {"type": "error", "error": {"type": kind, "message": error.message}}
    else:
        return error.response()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _respond(request: Request, error: ApiError) -> JSONResponse:
    return shaped(request.url.path, error)


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure of `app` through api_error."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _respond(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = HTTP_CODES.get(exc.status_code, "invalid_request")
        return _respond(request, ApiError(exc.status_code, str(exc.detail), code=kind))

    # Handlers for Exception run in Starlette's outermost middleware, which logs and
    # re-raises: the expected errors get handlers of their own.
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _respond(request, exc)

    @app.exception_handler(ClusterError)
    async def on_cluster_error(request: Request, exc: ClusterError) -> JSONResponse:
        return _respond(request, api_error(exc))

    @app.exception_handler(Exception)
    async def on_any(request: Request, exc: Exception) -> JSONResponse:
        return _respond(request, api_error(exc))
