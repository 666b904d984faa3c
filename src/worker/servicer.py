"""The LayerService servicer: parse, validate, delegate to WorkerRuntime, serialize.

Every MLX call (loading, decoding, layers, encoding) runs on one ComputeThread
so the event loop stays free for Info, EndSession, Lease and other streams.
Ids are checked here, before anything is queued, so that no error echoes a
huge id and no log line holds a raw one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2

from mlx_cluster import tensor
from mlx_cluster.contract.errors import ClusterError, InvalidArgument, error_metadata
from mlx_cluster.contract.logs import REQUEST_ID_HEADER, request_id
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import LAYER_SERVICE_NAME
from mlx_cluster.worker.compute_thread import ComputeThread
from mlx_cluster.worker.leases import Leases
from mlx_cluster.worker.runtime import WorkerRuntime
from mlx_cluster.worker.sessions import check_id

log = logging.getLogger(__name__)
T = TypeVar("T")

# gRPC ends the requests of a Forward call whose client vanished as if the client had
# half-closed, and cancels the handler a loop iteration or two later: wait this long
# before taking an end of requests as clean (1 ms caught every case measured).
CANCEL_SETTLE_S = 0.005


def _bind_request_id(context: grpc.aio.ServicerContext) -> None:
    """Tag this call's log lines (and its compute jobs') with the caller's request id."""
    metadata = dict(context.invocation_metadata() or ())
    request_id.set(str(metadata.get(REQUEST_ID_HEADER, "-")))


async def _abort(context: grpc.aio.ServicerContext, exc: ClusterError) -> None:
    """End the call with `exc`'s status; its kind goes along so the client rebuilds its class."""
    await context.abort(exc.code, str(exc), trailing_metadata=error_metadata(exc))


def _check_ids(session_ids: Iterable[str]) -> list[str]:
    return [check_id(sid) for sid in session_ids]


def _how_it_ended(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "was cancelled"
    return f"failed ({type(exc).__name__})"


class LayerServicer(pb_grpc.LayerServiceServicer):
    """Thin gRPC front of a WorkerRuntime."""

    def __init__(self, runtime: WorkerRuntime, health: health.aio.HealthServicer) -> None:
        self.runtime = runtime
        self._health = health
        self._compute = ComputeThread()
        self._leases = Leases(runtime.settings.lease_grace_s, self._lease_lapsed)
        self._stream_ids = itertools.count(1)  # numbers Forward calls, for their sessions
        self._stopping = asyncio.Event()  # set: Lease calls end

    async def _run(self, context: grpc.aio.ServicerContext, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on the compute thread; contract errors become gRPC statuses."""
        _bind_request_id(context)
        return await self._answer(context, self._compute.submit(fn, *args))

    async def _answer(self, context: grpc.aio.ServicerContext, pending: Awaitable[T]) -> T:
        """The result of a compute job; contract errors become gRPC statuses."""
        try:
            return await pending
        except ClusterError as exc:
            await _abort(context, exc)
        except ValueError as exc:
            await _abort(context, InvalidArgument(str(exc)))
        raise AssertionError("unreachable: abort raises")

    async def _check(
        self, context: grpc.aio.ServicerContext, check: Callable[..., T], *args: Any
    ) -> T:
        """check(*args), here on the event loop; a contract error ends the call."""
        try:
            return check(*args)
        except ClusterError as exc:
            await _abort(context, exc)
        raise AssertionError("unreachable: abort raises")

    def stop_leases(self) -> None:
        """End every Lease call, so that none holds up a graceful stop."""
        self._stopping.set()

    def close(self) -> None:
        """Finish the step in progress, then release the compute thread's MLX streams.

        MLX wants each thread that used it to clear its streams before it exits;
        otherwise the process may abort at exit.
        """
        self._leases.close()
        self._compute.close()

    # --- unary calls -------------------------------------------------------------

    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.InfoResponse:
        return self.runtime.info().to_proto()

    async def LoadLayers(
        self, request: pb.LoadLayersRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadLayersResponse:
        loop = asyncio.get_running_loop()

        def not_serving() -> None:  # on the compute thread, once the slice held is dropped
            asyncio.run_coroutine_threadsafe(self._set_serving(False), loop)

        try:
            result = await self._run(
                context,
                self.runtime.load,
                request.model,
                request.start,
                request.end,
                request.kv_budget_tokens,
                request.session_ttl_s,
                not_serving,
            )
        finally:  # a rejected load leaves the slice held, and so the status, as they were
            await self._set_serving(self.runtime.loaded is not None)
        return pb.LoadLayersResponse(
            info=result.info.to_proto(),
            memory_used_bytes=result.memory_used_bytes,
            reloaded=result.reloaded,
        )

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse
        await self._health.set(
            LAYER_SERVICE_NAME, status.SERVING if serving else status.NOT_SERVING
        )

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        await self._check(context, check_id, request.session_id)
        if request.lease_id:
            await self._check(context, check_id, request.lease_id, "lease id")
        totals = await self._run(
            context,
            self.runtime.open_session,
            request.session_id,
            request.reserve_tokens,
            request.lease_id,
        )
        if request.lease_id:
            self._leases.opened_under(request.lease_id)
        log.info(
            "session %r opened%s, %d tokens reserved, %d of %d in use",
            request.session_id,
            f" under lease {request.lease_id!r}" if request.lease_id else "",
            request.reserve_tokens,
            totals.used,
            totals.capacity,
        )
        return pb.OpenSessionResponse(
            kv_used_tokens=totals.used, kv_capacity_tokens=totals.capacity
        )

    async def EndSession(
        self, request: pb.EndSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.EndSessionResponse:
        session_ids = await self._check(context, _check_ids, request.session_ids)
        ended = await self._run(context, self.runtime.end_sessions, session_ids)
        log.info("ended %d of sessions %s", ended, session_ids)
        return pb.EndSessionResponse(ended=ended)

    async def TruncateSession(
        self, request: pb.TruncateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.TruncateSessionResponse:
        await self._check(context, check_id, request.session_id)
        length = await self._run(context, self.runtime.truncate, request.session_id, request.length)
        return pb.TruncateSessionResponse(length=length)

    # --- the streams -------------------------------------------------------------

    def _step(self, request: pb.ForwardRequest, stream_id: int) -> pb.ForwardResponse:
        started = time.perf_counter()
        if not request.HasField("hidden"):
            raise InvalidArgument("ForwardRequest.hidden is missing")
        hidden = tensor.decode(request.hidden)
        out = self.runtime.forward(
            list(request.session_ids),
            hidden,
            list(request.offsets),
            request.last_position_only,
            stream_id,
        )
        response = pb.ForwardResponse(step_id=request.step_id)
        tensor.encode(out, out=response.hidden)
        response.compute_seconds = time.perf_counter() - started
        return response

    async def Forward(
        self, request_iterator: AsyncIterator[pb.ForwardRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ForwardResponse]:
        """Steps in order. A call that ends other than by the client's half-close (cancelled,
        failed, its connection lost) ends the sessions whose last step was on it."""
        _bind_request_id(context)  # once per stream, not per step
        stream_id = next(self._stream_ids)
        requests = aiter(request_iterator)
        try:
            while True:
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    await asyncio.sleep(CANCEL_SETTLE_S)
                    return
                except Exception as exc:  # bytes that are no ForwardRequest
                    log.warning("undecodable Forward message: %r", exc)
                    await _abort(context, InvalidArgument("malformed ForwardRequest"))
                await self._check(context, _check_ids, request.session_ids)
                pending = self._compute.submit(self._step, request, stream_id)
                yield await self._answer(context, pending)
        except BaseException as exc:
            self._compute.post(self.runtime.end_stream, stream_id, _how_it_ended(exc))
            raise

    async def Lease(
        self, request: pb.LeaseRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LeaseEvent]:
        """Hold a lease while the call lasts, with a heartbeat event every few seconds."""
        lease_id = await self._check(context, check_id, request.lease_id, "lease id")
        heartbeat_s = self.runtime.settings.lease_heartbeat_s
        with self._leases.held(lease_id):
            while not self._stopping.is_set():
                yield pb.LeaseEvent()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), heartbeat_s)

    def _lease_lapsed(self, lease_id: str) -> None:
        self._compute.post(self.runtime.end_lease, lease_id)

    # --- housekeeping ------------------------------------------------------------

    async def evict_idle_sessions(self, every_s: float) -> None:
        """Forever: end sessions idle past the TTL (run as a background task)."""
        while True:
            await asyncio.sleep(every_s)
            await self._compute.submit(self.runtime.evict_idle)
