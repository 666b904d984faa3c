"""API keys on the HTTP API: `Authorization: Bearer KEY`, as OpenAI clients send it.

A plain ASGI middleware in front of every route. `GET /` and `GET /health` stay
open (liveness checks and load balancers carry no key); everything else, the
Prometheus `/metrics` included (it names workers and their memory), needs a key.
A refusal is a 401 in OpenAI's error shape that never repeats the key sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from mlx_cluster.contract.auth import secret_matches
from mlx_cluster.coordinator.api.errors import ApiError

OPEN_ROUTES = frozenset({("GET", "/"), ("HEAD", "/"), ("GET", "/health"), ("HEAD", "/health")})

MISSING = (
    "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
    "(Authorization: Bearer YOUR_KEY)."
)
WRONG = "Incorrect API key provided."


def _refusal(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class ApiKeyAuth:
    """Answers 401 to requests without one of `keys`, except the open routes."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("ApiKeyAuth needs at least one key")
        self.app = app
        self.keys = list(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in OPEN_ROUTES:
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
        scheme, _, key = sent.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            await _refusal(MISSING).response()(scope, receive, send)
        elif not secret_matches(key.strip(), self.keys):
            await _refusal(WRONG).response()(scope, receive, send)
        else:
            await self.app(scope, receive, send)
