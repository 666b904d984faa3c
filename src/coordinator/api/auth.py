"""API keys on the HTTP API: `Authorization: Bearer KEY`, as OpenAI clients send it, or
`x-api-key: KEY`, as Anthropic's clients do.

A plain ASGI middleware in front of every route. `GET /` and `GET /health` stay
open (liveness checks and load balancers carry no key), and so do the dashboard's
script and style (a page loads them without headers; the page asks for a key before
it calls anything else); everything else, the dashboard's live events and the
Prometheus `/metrics` included (it names workers and their memory), needs a key.
A refusal is a 401 in the shape of the API called (errors.shaped) that never repeats
the key sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from mlx_cluster.contract.auth import secret_matches
from mlx_cluster.coordinator.api.errors import ApiError, shaped

OPEN_ROUTES = frozenset({("GET", "/"), ("HEAD", "/"), ("GET", "/health"), ("HEAD", "/health")})
OPEN_GET_PREFIX = "/dashboard/"  # the dashboard's static assets

MISSING = (
    "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
    "(Authorization: Bearer YOUR_KEY), or in an x-api-key header."
)
WRONG = "Incorrect API key provided."


def _refusal(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _open(method: str, path: str) -> bool:
    return (method, path) in OPEN_ROUTES or (
        method in {"GET", "HEAD"} and path.startswith(OPEN_GET_PREFIX)
    )


class ApiKeyAuth:
    """Answers 401 to requests without one of `keys`, except the open routes."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("ApiKeyAuth needs at least one key")
        self.app = app
        self.keys = list(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _open(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            key = headers.get(b"x-api-key", b"").decode("latin-1")
        path = scope["path"]
        if not key.strip():
            await shaped(path, _refusal(MISSING))(scope, receive, send)
        elif not secret_matches(key.strip(), self.keys):
            await shaped(path, _refusal(WRONG))(scope, receive, send)
        else:
            await self.app(scope, receive, send)
