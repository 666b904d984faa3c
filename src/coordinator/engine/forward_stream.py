"""Forward streams: one persistent stream to a worker (a step written, its answer read,
in order).

The client opens a stream (`WorkerClient.open_stream`); the chain steps on them, each
user on its own set (streams.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import grpc
import mlx.core as mx

from mlx_cluster import tensor
from mlx_cluster.contract.errors import ClusterError, InvalidArgument, error_from_status
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.streams import close_call, ended_status
from mlx_cluster.coordinator.engine.events import HopTiming

if TYPE_CHECKING:
    from mlx_cluster.coordinator.engine.client import WorkerClient

# A closed Forward stream's worker has this long to end the call before it is cancelled.
STREAM_CLOSE_WAIT_S = 1.0


class ForwardStream:
    """One persistent bidirectional Forward stream: write a step, read its answer.

    Several tasks may step on one stream: each step holds the stream from its write
    to its answer, so steps are answered in the order they were sent.
    """

    def __init__(self, client: WorkerClient, call: grpc.aio.StreamStreamCall) -> None:
        self._client = client
        self._call = call
        self._step_id = 0
        self._turn = asyncio.Lock()

    @property
    def done(self) -> bool:
        """The call has ended (closed, failed or cancelled): no step can go through."""
        return self._call.done()

    async def step(
        self,
        session_ids: list[str],
        hidden: mx.array | None,
        offsets: list[int],
        last_position_only: bool = False,
        token_ids: mx.array | None = None,
    ) -> tuple[mx.array, HopTiming]:
        """Send hidden states [B, L, D] through the worker's layers, or token ids [B, L] to
        the first stage (which embeds them); the stage that samples keeps the token ids.

        Returns:
            The worker's output and where this step's time went.
        """
        t0 = time.perf_counter()
        request = pb.ForwardRequest(
            session_ids=session_ids, offsets=offsets, last_position_only=last_position_only
        )
        if hidden is not None:
            tensor.encode(hidden, out=request.hidden)
        if token_ids is not None:
            tensor.encode(token_ids, out=request.token_ids)
        t1 = time.perf_counter()
        async with self._turn:
            self._step_id += 1
            request.step_id = self._step_id
            reply = await self._exchange(request)
        t2 = time.perf_counter()
        if reply.step_id != request.step_id:
            self._call.cancel()
            raise ClusterError(
                f"worker {self._client.name}: answer to step {reply.step_id}, "
                f"expected {request.step_id}"
            )
        try:
            out = tensor.decode(reply.hidden)
        except ValueError as exc:
            raise InvalidArgument(f"worker {self._client.name} sent a bad tensor: {exc}") from exc
        timing = HopTiming(t1 - t0, t2 - t1, reply.compute_seconds, time.perf_counter() - t2)
        self._client.last_step_network_s = timing.network
        return out, timing

    async def _exchange(self, request: pb.ForwardRequest) -> pb.ForwardResponse:
        """Write one step and read its answer; a step cut short ends the call.

        (A step cancelled between its write and its answer would leave that answer for
        the next step to read: the call is cancelled instead, so it is never used again.)
        """
        try:
            await self._call.write(request)
            reply = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self._client.name) from exc
        except asyncio.InvalidStateError:  # the call ended before this write: say why
            raise await self._stream_error() from None
        except BaseException:
            self._call.cancel()
            raise
        if reply is grpc.aio.EOF:
            raise await self._stream_error()
        return reply

    async def _stream_error(self) -> ClusterError:
        code, details, metadata = await ended_status(self._call)
        return error_from_status(code, details, self._client.name, metadata)

    async def close(self) -> None:
        """Half-close and let the worker end the call; cancels it if it does not."""
        await close_call(self._call, STREAM_CLOSE_WAIT_S)


def error_from_rpc(exc: grpc.aio.AioRpcError, worker: str) -> ClusterError:
    """The contract error a failed call carries: its class from the kind the worker sent."""
    return error_from_status(exc.code(), exc.details() or "", worker, exc.trailing_metadata())
