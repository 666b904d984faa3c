"""A bidirectional gRPC call, as both roles hold one: closing it, and reading why it ended."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc


async def close_call(call: grpc.aio.StreamStreamCall, wait_s: float) -> None:
    """Half-close `call` and let the server end it (answers still coming are read and
    dropped); cancel it if the server does not within `wait_s` seconds."""
    try:
        await call.done_writing()
        await asyncio.wait_for(_drain(call), wait_s)
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
        call.cancel()


async def _drain(call: grpc.aio.StreamStreamCall) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


async def ended_status(
    call: grpc.aio.StreamStreamCall,
) -> tuple[grpc.StatusCode, str, Any]:
    """The status a call that ended (or failed) ended with: code, details, trailing metadata."""
    code = await call.code()
    details = await call.details()
    return code, details or "stream closed", await call.trailing_metadata()
