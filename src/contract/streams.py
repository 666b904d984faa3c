"""A bidirectional gRPC call, as both roles hold one: closing it, reading why it ended,
and a failed step sent in band."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from mlx_cluster.contract.errors import ERROR_KIND_KEY
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.rpc import FAILURES_IN_BAND_KEY, STAGE_KEY


async def close_call(call: grpc.aio.StreamStreamCall, wait_s: float) -> None:
    """Half-close `call` and let the server end it (answers still coming are read and
    dropped); cancel it if the server does not within `wait_s` seconds."""
    if call.done():  # ended already (a cancelled call's reads would raise CancelledError)
        return
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


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def failures_in_band(metadata: object) -> bool:
    """The call's invocation metadata asks for failures in band."""
    return any(key == FAILURES_IN_BAND_KEY for key, _ in metadata or ())  # type: ignore[attr-defined]


def step_failure(code: grpc.StatusCode, message: str, kind: str, stage: int) -> pb.StepFailure:
    """A failed step's answer: what the call's status would have said."""
    return pb.StepFailure(code=code.value[0], kind=kind, message=message, stage=stage)


def failure_status(failure: pb.StepFailure) -> tuple[grpc.StatusCode, str, Any]:
    """A failure in band as the status it stands for: code, details, trailing metadata."""
    code = _CODES.get(failure.code, grpc.StatusCode.UNKNOWN)
    metadata = [(STAGE_KEY, str(failure.stage))]
    if failure.kind:
        metadata.append((ERROR_KIND_KEY, failure.kind))
    return code, failure.message, tuple(metadata)
