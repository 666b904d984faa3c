"""The LayerService servicer: parse, validate, delegate to WorkerRuntime, serialize.

Every MLX call (loading, decoding, layers, encoding) runs on one compute thread
so the event loop stays free for Info, EndSession and other streams.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import mlx.core as mx
from grpc_health.v1 import health, health_pb2

from mlx_cluster import tensor
from mlx_cluster.contract.errors import ClusterError, InvalidArgument, error_metadata
from mlx_cluster.contract.logs import REQUEST_ID_HEADER, request_id
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import LAYER_SERVICE_NAME, PROTOCOL_VERSION
from mlx_cluster.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)
T = TypeVar("T")

try:
    from importlib.metadata import version as _dist_version

    VERSION = _dist_version("mlx-cluster")
except Exception:  # running from a source tree without an install
    VERSION = "0.0.0+source"


# --- the compute thread ----------------------------------------------------------


class ComputeThread:
    """The one thread that makes every MLX call of a worker, in the order submitted.

    Every Forward step crosses from the event loop to this thread and back, so the
    crossing is kept lean: a job is a tuple on a SimpleQueue and its result returns
    through one `call_soon_threadsafe`, with no concurrent.futures.Future in between
    and no copy of the caller's context (only the request id travels, for log lines).
    That is measurably cheaper than `run_in_executor` on a one-thread pool.
    """

    def __init__(self, name: str = "mlx-compute") -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        # A daemon thread is not joined at exit: close it first, so that it clears its streams.
        atexit.register(self.close)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue fn(*args); the future (of the running loop) gets its result or exception.

        Cancelling the future before the job starts skips the job.
        """
        if self._closed:
            raise RuntimeError("the compute thread is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, request_id.get(), fn, args))
        return future

    def _serve(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                loop, future, rid, fn, args = job
                if future.cancelled():
                    continue
                request_id.set(rid)
                try:
                    result = fn(*args)
                except BaseException as exc:  # handed to the caller, as concurrent.futures does
                    _reply(loop, _set_exception, future, exc)
                else:
                    _reply(loop, _set_result, future, result)
        finally:
            mx.clear_streams()  # MLX aborts at exit unless each thread that used it does this

    def close(self) -> None:
        """Finish the queued jobs, release the thread's MLX streams and end it."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._jobs.put(None)
        self._thread.join()


def _reply(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(fn, *args)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.cancelled():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.cancelled():
        future.set_exception(exc)


def _bind_request_id(context: grpc.aio.ServicerContext) -> None:
    """Tag this call's log lines (and its compute jobs') with the caller's request id."""
    metadata = dict(context.invocation_metadata() or ())
    request_id.set(str(metadata.get(REQUEST_ID_HEADER, "-")))


async def _abort(context: grpc.aio.ServicerContext, exc: ClusterError) -> None:
    """End the call with `exc`'s status; its kind goes along so the client rebuilds its class."""
    await context.abort(exc.code, str(exc), trailing_metadata=error_metadata(exc))


# --- the servicer ----------------------------------------------------------------


class LayerServicer(pb_grpc.LayerServiceServicer):
    """Thin gRPC front of a WorkerRuntime."""

    def __init__(self, runtime: WorkerRuntime, health: health.aio.HealthServicer) -> None:
        self.runtime = runtime
        self._health = health
        self._compute = ComputeThread()

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

    def close(self) -> None:
        """Finish the step in progress, then release the compute thread's MLX streams.

        MLX wants each thread that used it to clear its streams before it exits;
        otherwise the process may abort at exit.
        """
        self._compute.close()

    # --- unary calls -------------------------------------------------------------

    def info(self) -> pb.InfoResponse:
        rt, caps = self.runtime, self.runtime.capabilities
        msg = pb.InfoResponse(
            name=rt.settings.name,
            version=VERSION,
            protocol_version=PROTOCOL_VERSION,
            capabilities=pb.Capabilities(**dataclasses.asdict(caps)),
            model=rt.model,
        )
        if rt.layer_slice is not None and rt.sessions is not None:
            s = rt.layer_slice
            msg.layer_start, msg.layer_end, msg.model_num_layers = s.start, s.end, s.num_layers
            msg.weight_bytes = s.weight_bytes
            msg.kv_capacity_tokens = rt.sessions.capacity
            msg.kv_used_tokens = rt.sessions.used
            msg.sessions_open = len(rt.sessions)
            msg.dtype = tensor.dtype_name(s.dtype)
            msg.hidden_size = s.hidden_size
        return msg

    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.InfoResponse:
        return self.info()

    async def LoadLayers(
        self, request: pb.LoadLayersRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadLayersResponse:
        await self._health.set(LAYER_SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        result = await self._run(
            context,
            self.runtime.load,
            request.model,
            request.start,
            request.end,
            request.kv_budget_tokens,
            request.session_ttl_s,
        )
        await self._health.set(LAYER_SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        return pb.LoadLayersResponse(
            info=self.info(), memory_used_bytes=result.memory_used_bytes, reloaded=result.reloaded
        )

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        def open_session() -> pb.OpenSessionResponse:
            _, store = self.runtime.require_loaded()
            store.open(request.session_id, request.reserve_tokens)
            log.info(
                "session %s opened, %d tokens reserved, %d of %d in use",
                request.session_id,
                request.reserve_tokens,
                store.used,
                store.capacity,
            )
            return pb.OpenSessionResponse(
                kv_used_tokens=store.used, kv_capacity_tokens=store.capacity
            )

        return await self._run(context, open_session)

    async def EndSession(
        self, request: pb.EndSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.EndSessionResponse:
        def end() -> int:
            store = self.runtime.sessions
            ended = store.end(list(request.session_ids)) if store is not None else 0
            log.info("ended %d of sessions %s", ended, list(request.session_ids))
            return ended

        return pb.EndSessionResponse(ended=await self._run(context, end))

    async def TruncateSession(
        self, request: pb.TruncateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.TruncateSessionResponse:
        def truncate() -> int:
            _, store = self.runtime.require_loaded()
            return store.truncate(request.session_id, request.length)

        return pb.TruncateSessionResponse(length=await self._run(context, truncate))

    # --- the stream --------------------------------------------------------------

    def _step(self, request: pb.ForwardRequest) -> pb.ForwardResponse:
        started = time.perf_counter()
        if not request.HasField("hidden"):
            raise InvalidArgument("ForwardRequest.hidden is missing")
        hidden = tensor.decode(request.hidden)
        out = self.runtime.forward(
            list(request.session_ids), hidden, list(request.offsets), request.last_position_only
        )
        response = pb.ForwardResponse(step_id=request.step_id)
        tensor.encode(out, out=response.hidden)
        response.compute_seconds = time.perf_counter() - started
        return response

    async def Forward(
        self, request_iterator: AsyncIterator[pb.ForwardRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ForwardResponse]:
        _bind_request_id(context)  # once per stream, not per step
        requests = aiter(request_iterator)
        while True:
            try:
                request = await anext(requests)
            except StopAsyncIteration:
                return
            except Exception as exc:  # bytes that are no ForwardRequest
                log.warning("undecodable Forward message: %r", exc)
                await _abort(context, InvalidArgument("malformed ForwardRequest"))
            yield await self._answer(context, self._compute.submit(self._step, request))

    # --- housekeeping ------------------------------------------------------------

    async def evict_idle_sessions(self, every_s: float) -> None:
        """Forever: end sessions idle past the TTL (run as a background task)."""
        while True:
            await asyncio.sleep(every_s)
            store = self.runtime.sessions
            if store is not None:
                evicted = await self._compute.submit(store.evict_idle)
                if evicted:
                    log.info("evicted %d idle sessions: %s", len(evicted), evicted)
