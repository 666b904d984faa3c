"""The worker's gate: every call must carry the cluster token, health checks excepted.

Refusals are UNAUTHENTICATED statuses that say what is wrong (missing,
malformed or wrong token) and never contain the token sent or expected; the
worker goes on serving other calls.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from mlx_cluster.contract.auth import BEARER, TOKEN_ENV, TOKEN_METADATA_KEY, secret_matches

log = logging.getLogger(__name__)

# The standard grpc.health.v1 service stays open: load balancers and readiness probes
# (and the coordinator's own wait for readiness) check it without the secret, and it
# tells them no more than SERVING or NOT_SERVING.
OPEN_PREFIX = "/grpc.health.v1.Health/"

MISSING = (
    f"missing cluster token: this worker requires the metadata "
    f"'{TOKEN_METADATA_KEY}: {BEARER}<token>' on every call; give the coordinator the "
    "worker's token (auth.token or auth.token_file)"
)
MALFORMED = (
    f"malformed cluster token: expected the metadata '{TOKEN_METADATA_KEY}: {BEARER}<token>'"
)
WRONG = (
    "wrong cluster token: the token sent is not this worker's; compare the coordinator's "
    f"auth.token (or auth.token_file) with the worker's {TOKEN_ENV} (or --token-file)"
)


def token_problem(metadata: Sequence[tuple[str, Any]] | None, token: str) -> str | None:
    """What is wrong with the token in a call's metadata, or None if it is `token`."""
    sent = [value for key, value in metadata or () if key == TOKEN_METADATA_KEY]
    if not sent:
        return MISSING
    if not isinstance(sent[0], str) or not sent[0].startswith(BEARER):
        return MALFORMED
    return None if secret_matches(sent[0].removeprefix(BEARER), [token]) else WRONG


def _refusal(handler: grpc.RpcMethodHandler, method: str, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        log.warning("refused %s from %s: %s", method, context.peer(), message.split(":")[0])
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets through only calls that carry `token` (and health checks)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the cluster token must not be empty")
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIX):
            return handler
        problem = token_problem(handler_call_details.invocation_metadata, self._token)
        return handler if problem is None else _refusal(handler, method, problem)
