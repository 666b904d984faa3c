"""The LayerService servicer: parse, validate, delegate to WorkerRuntime, serialize.

Every MLX call (loading, decoding, layers, encoding) runs on one ComputeThread
so the event loop stays free for Info, EndSession, Lease and other streams.
Ids are checked here, before anything is queued, so that no error echoes a
huge id and no log line holds a raw one.

A Forward or Decode call whose metadata names a route relays each step to the
next stage (relay.py); Decode runs the first stage's decode loop (ring.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2

from mlx_cluster.contract.errors import ClusterError, InvalidArgument, error_metadata
from mlx_cluster.contract.logs import REQUEST_ID_HEADER, request_id
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import LAYER_SERVICE_NAME, STAGE_KEY, Route
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.contract.streams import failures_in_band
from mlx_cluster.tensor.shared import Probe
from mlx_cluster.worker import steps
from mlx_cluster.worker.compute_thread import ComputeThread
from mlx_cluster.worker.forward_calls import checked_steps, in_band
from mlx_cluster.worker.leases import Leases
from mlx_cluster.worker.relay import NextStage, Peers, RelayFailed
from mlx_cluster.worker.relayed_steps import Compute, relay_steps
from mlx_cluster.worker.ring import EVENTS_AHEAD, DecodeLoop
from mlx_cluster.worker.ring_steps import RingSteps
from mlx_cluster.worker.runtime import WorkerRuntime
from mlx_cluster.worker.sessions import check_id

log = logging.getLogger(__name__)
T = TypeVar("T")


def _bind_request_id(context: grpc.aio.ServicerContext) -> None:
    """Tag this call's log lines (and its compute jobs') with the caller's request id."""
    metadata = dict(context.invocation_metadata() or ())
    request_id.set(str(metadata.get(REQUEST_ID_HEADER, "-")))


async def _abort(context: grpc.aio.ServicerContext, exc: ClusterError) -> None:
    """End the call with `exc`'s status; its kind goes along so the client rebuilds its class,
    and for a failure further down the ring, the failed stage's index."""
    metadata = error_metadata(exc)
    if isinstance(exc, RelayFailed):
        metadata += ((STAGE_KEY, str(exc.stage)),)
    await context.abort(exc.code, str(exc), trailing_metadata=metadata)


def _check_ids(ids: Iterable[str], what: str = "session id") -> list[str]:
    return [check_id(value, what) for value in ids]


def _how_it_ended(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "was cancelled"
    return f"failed ({type(exc).__name__})"


class LayerServicer(pb_grpc.LayerServiceServicer):
    """Thin gRPC front of a WorkerRuntime."""

    def __init__(
        self,
        runtime: WorkerRuntime,
        health: health.aio.HealthServicer,
        peers: Peers | None = None,
        probe: Probe | None = None,
    ) -> None:
        """`probe`: the shared-memory segment Info names (runtime.shared_memory_probe),
        removed on close."""
        self.runtime = runtime
        self._probe = probe
        self._health = health
        self._peers = peers or Peers(max_message_bytes=runtime.settings.max_message_bytes)
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
        if self._probe is not None:
            self._probe.close()
        if self.runtime.shared_views is not None:
            self.runtime.shared_views.close()

    async def close_peers(self) -> None:
        await self._peers.close()

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
                request.embedding,
                request.head,
                request.draft_model,
                request.prefix_cache_bytes,
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
        sampling = None
        if request.HasField("sampling"):
            sampling = await self._check(context, SamplingParams.from_spec, request.sampling)
        prefix = None
        if request.prefix_id:
            await self._check(context, check_id, request.prefix_id, "prefix id")
            prefix = (request.prefix_id, request.prefix_length, list(request.history))
        totals = await self._run(
            context,
            self.runtime.open_session,
            request.session_id,
            request.reserve_tokens,
            request.lease_id,
            sampling,
            prefix,
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
        keep = [(k.session_id, k.prefix_id, k.length) for k in request.keep]
        await self._check(context, _check_ids, [k[0] for k in keep])
        await self._check(context, _check_ids, [k[1] for k in keep], "prefix id")
        drop = await self._check(context, _check_ids, request.drop_prefixes, "prefix id")
        ended, kept = await self._run(context, self.runtime.end_sessions, session_ids, keep, drop)
        log.info("ended %d of sessions %s; kept as prefixes %s", ended, session_ids, kept)
        whole_only = self.runtime.whole_only(kept)
        return pb.EndSessionResponse(ended=ended, kept=kept, kept_whole_only=whole_only)

    async def TruncateSession(
        self, request: pb.TruncateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.TruncateSessionResponse:
        await self._check(context, check_id, request.session_id)
        length = await self._run(context, self.runtime.truncate, request.session_id, request.length)
        return pb.TruncateSessionResponse(length=length)

    # --- the streams -------------------------------------------------------------

    def _open_next(self, context: grpc.aio.ServicerContext) -> NextStage | None:
        route = Route.of_call(context.invocation_metadata())
        if not route.addresses:
            return None
        return self._peers.next_stage(route, request_id.get())

    async def Forward(
        self, request_iterator: AsyncIterator[pb.ForwardRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ForwardResponse]:
        """Steps in order, each relayed on when the call names a route. A call that ends
        other than by the client's half-close (cancelled, failed, its connection lost)
        ends the sessions whose last step was on it, here and further down the ring."""
        _bind_request_id(context)  # once per stream, not per step
        stream_id = next(self._stream_ids)
        next_stage = self._open_next(context)
        requests = checked_steps(request_iterator)
        if next_stage is None:
            answers = self._steps_here(requests, stream_id)
        else:
            answers = relay_steps(requests, self._onward(stream_id, next_stage), next_stage)
        try:
            async with contextlib.aclosing(answers):
                try:
                    async for reply in answers:
                        yield reply
                except (ClusterError, ValueError) as exc:
                    failure = exc if isinstance(exc, ClusterError) else InvalidArgument(str(exc))
                    if not failures_in_band(context.invocation_metadata()):
                        await _abort(context, failure)
                    self._compute.post(self.runtime.end_stream, stream_id, _how_it_ended(exc))
                    if next_stage is not None:
                        next_stage.cancel()
                    yield pb.ForwardResponse(failure=in_band(failure))
                    return  # the call ends OK: its caller reads the failure first
        except BaseException as exc:
            self._compute.post(self.runtime.end_stream, stream_id, _how_it_ended(exc))
            if next_stage is not None:
                next_stage.cancel()
            raise
        if next_stage is not None:
            await next_stage.close()

    async def _steps_here(
        self, requests: AsyncIterator[pb.ForwardRequest], stream_id: int
    ) -> AsyncGenerator[pb.ForwardResponse, None]:
        """Steps that end here, one at a time."""
        async for request in requests:
            yield await self._compute.submit(steps.step_here, self.runtime, request, stream_id)

    def _onward(self, stream_id: int, next_stage: NextStage) -> Compute:
        """This stage's part of a relayed step, on the compute thread."""
        runtime, arena = self.runtime, next_stage.arena

        def compute(request: pb.ForwardRequest) -> Awaitable[tuple[pb.ForwardRequest, float]]:
            return self._compute.submit(steps.step_onward, runtime, request, stream_id, None, arena)

        return compute

    # --- the decode loop ----------------------------------------------------------

    async def Decode(
        self, request_iterator: AsyncIterator[pb.DecodeCommand], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DecodeEvent]:
        """The decode loop: an event per step until the client half-closes. A call that
        ends otherwise ends its rows' sessions, here and further down the ring.

        The loop steps in a task of its own: the next step starts as soon as a token is
        in, while the event that reports it is still being written to the caller.
        """
        _bind_request_id(context)
        stream_id = next(self._stream_ids)
        route = Route.of_call(context.invocation_metadata())
        next_stage = self._open_next(context)

        ring_steps = RingSteps(self._compute, self.runtime, next_stage, stream_id)
        loop = DecodeLoop(ring_steps, self.runtime.settings.max_batch, ring_steps.model_drafts())
        events: asyncio.Queue[pb.DecodeEvent | Exception | None] = asyncio.Queue(EVENTS_AHEAD)
        reader = asyncio.create_task(loop.read_commands(request_iterator))
        stepping = asyncio.create_task(loop.pump(events))
        failure: Exception | None = None
        try:
            while (item := await events.get()) is not None:
                if isinstance(item, Exception):
                    failure = item
                    break
                yield item
        except BaseException as exc:  # cancelled, or the call broke
            self._end_ring(stream_id, next_stage, loop, route, _how_it_ended(exc))
            raise
        finally:
            reader.cancel()
            stepping.cancel()
            ring_steps.close()
        if failure is not None:
            self._end_ring(stream_id, next_stage, loop, route, f"failed ({failure!r:.200})")
            if not isinstance(failure, ClusterError):
                log.error("the decode loop failed", exc_info=failure)
                failure = ClusterError(f"the decode loop failed: {failure!r:.300}")
            await _abort(context, failure)
        if next_stage is not None:
            await next_stage.close()

    def _end_ring(
        self,
        stream_id: int,
        next_stage: NextStage | None,
        loop: DecodeLoop,
        route: Route,
        why: str,
    ) -> None:
        """A Decode call ended badly: end its rows' sessions here and on every later stage.

        Each stage ends the sessions last stepped on the call that broke, but a step that
        never reached a stage (it failed before, or a row had not stepped yet) leaves
        them open there: they are ended by id too (a stage that is gone ends nothing).
        """
        self._compute.post(self.runtime.end_stream, stream_id, why)
        if next_stage is not None:
            next_stage.cancel()
        if loop.seen:
            ids = sorted(loop.seen)
            self._compute.post(self.runtime.end_sessions, ids)
            self._peers.end_sessions(route, ids, request_id.get())

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
