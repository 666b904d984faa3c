"""The coordinator's handle on one worker: unary calls with deadlines, and Forward streams.

gRPC statuses come back as contract errors naming the worker, so callers deal
with one kind of failure whatever the transport said; replies come back as the
typed values of contract.worker_info, never as protobuf messages.

Sessions are tied to the client's lifetime: from its first session on, the client
holds a Lease call to the worker and opens every session under that lease, so a
worker ends them within seconds of this process dying. An EndSession that fails
is retried in the background until the worker has ended those ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlx_cluster.contract.auth import TlsFiles, token_metadata
from mlx_cluster.contract.config import LivenessConfig
from mlx_cluster.contract.errors import (
    ClusterError,
    InvalidArgument,
    ProtocolMismatch,
    WorkerUnavailable,
)
from mlx_cluster.contract.logs import REQUEST_ID_HEADER, request_id
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import (
    FAILURES_IN_BAND_KEY,
    INFO_DEADLINE_S,
    LOAD_DEADLINE_S,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SESSION_DEADLINE_S,
    Route,
    client_channel_options,
)
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.contract.worker_info import LoadedSlice, WorkerInfo
from mlx_cluster.coordinator.engine.forward_stream import ForwardStream, error_from_rpc

log = logging.getLogger(__name__)
R = TypeVar("R")
S = TypeVar("S")
Metadata = tuple[tuple[str, str], ...]

# A failed EndSession is tried again after this, then twice as long each time, up to the max.
END_RETRY_FIRST_S = 0.5
END_RETRY_MAX_S = 30.0
# Pause before calling Lease again after the call ended: well inside the worker's grace.
LEASE_RETRY_S = 0.5


class WorkerClient:
    """Calls to one worker at `address`; `name` is filled in from Info.

    With `token`, every call carries the cluster token; with `tls`, the channel is
    TLS, verified against `tls.ca` (mutual TLS when `tls.cert` and `tls.key` are set).
    `liveness` sets the keepalive pings that drop the connection to a worker that stopped
    answering (failing its calls with WorkerUnavailable).
    """

    def __init__(
        self,
        address: str,
        name: str | None = None,
        token: str | None = None,
        tls: TlsFiles | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        liveness: LivenessConfig | None = None,
    ) -> None:
        self.address = address
        self.name = name or address
        self._named = name is not None  # a configured name beats the worker's own
        # The worker's shared-memory probe, from its Info: a peer on its host that opens it
        # sends it hidden states through shared memory ("": it takes none).
        self.shared_memory_probe = ""
        self._auth = (token_metadata(token),) if token else ()
        self._tls_name = tls.server_name if tls else None  # the workers' relays need it too
        liveness = liveness or LivenessConfig()
        options: list[tuple[str, Any]] = list(
            client_channel_options(
                max_message_bytes,
                keepalive_time_ms=round(liveness.ping_interval_s * 1000),
                keepalive_timeout_ms=round(liveness.ping_timeout_s * 1000),
            )
        )
        if tls is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            if tls.server_name:  # the name the worker's certificate carries, if not its host
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.aio.secure_channel(address, tls.channel_credentials(), options)
        self._stub = pb_grpc.LayerServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.last_step_network_s: float | None = None  # last Forward step: round trip - compute
        self.lease_id = uuid.uuid4().hex  # this client's sessions end with this lease
        self._lease: asyncio.Task[None] | None = None  # holds the Lease call open
        self._unended: set[str] = set()  # ids whose EndSession failed
        self._end_retry: asyncio.Task[None] | None = None
        self._retry_now = asyncio.Event()  # set: a call succeeded, retry EndSession at once

    async def close(self) -> None:
        """Let go of the lease (the worker ends this client's sessions) and of the channel."""
        tasks = [t for t in (self._lease, self._end_retry) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata of every call: the request id (for worker logs), the cluster token."""
        return ((REQUEST_ID_HEADER, request_id.get()), *self._auth)

    def service(self, stub_class: Callable[[grpc.aio.Channel], S]) -> tuple[S, Metadata]:
        """A stub of another of the worker's services on this client's channel (same TLS),
        and the metadata its calls must carry (the cluster token)."""
        return stub_class(self._channel), self._metadata()

    async def _call(self, call: Callable[[], Awaitable[R]]) -> R:
        try:
            reply = await call()
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self.name) from exc
        if self._unended:  # the worker answers again: end what it could not end before
            self._retry_now.set()
        return reply

    def _checked(self, info: WorkerInfo) -> WorkerInfo:
        """`info`, from a worker that speaks this coordinator's protocol."""
        if info.name and not self._named:
            self.name = info.name
        self.shared_memory_probe = info.shared_memory_probe
        if info.protocol_version != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"worker {self.name} speaks protocol {info.protocol_version}, this coordinator "
                f"speaks {PROTOCOL_VERSION}; run the same mlx-cluster version on both"
            )
        return info

    async def info(self, timeout: float = INFO_DEADLINE_S) -> WorkerInfo:
        """The worker's Info.

        Raises:
            ProtocolMismatch: if the worker speaks another protocol version.
        """
        reply = await self._call(
            lambda: self._stub.Info(pb.InfoRequest(), timeout=timeout, metadata=self._metadata())
        )
        return self._checked(WorkerInfo.from_proto(reply))

    async def wait_ready(self, timeout: float) -> WorkerInfo:
        """Wait until the worker's standard health service says SERVING, then return Info."""
        request = health_pb2.HealthCheckRequest(service="")
        try:
            reply = await self._health.Check(
                request, timeout=timeout, wait_for_ready=True, metadata=self._metadata()
            )
        except grpc.aio.AioRpcError as exc:
            raise WorkerUnavailable(
                f"worker at {self.address} not ready after {timeout:.0f} s: {exc.details()}"
            ) from exc
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise WorkerUnavailable(f"worker at {self.address} reports status {reply.status}")
        return await self.info()

    async def load_layers(
        self,
        model: str,
        start: int,
        end: int,
        kv_budget_tokens: int = 0,
        session_ttl_s: float = 0,
        embedding: bool = False,
        head: bool = False,
        draft_model: str = "",
        prefix_cache_bytes: int = 0,
    ) -> LoadedSlice:
        """Load layers [start, end) of `model` (and the embedding, the head: the first and last
        stage's; the first may hold a `draft_model` too), keeping ended sessions' prefixes
        in up to `prefix_cache_bytes`; the worker ends every session it had open."""
        request = pb.LoadLayersRequest(
            model=model,
            start=start,
            end=end,
            kv_budget_tokens=kv_budget_tokens,
            session_ttl_s=session_ttl_s,
            embedding=embedding,
            head=head,
            draft_model=draft_model,
            prefix_cache_bytes=prefix_cache_bytes,
        )
        reply = await self._call(
            lambda: self._stub.LoadLayers(
                request, timeout=LOAD_DEADLINE_S, metadata=self._metadata()
            )
        )
        loaded = LoadedSlice.from_proto(reply)
        self._checked(loaded.info)
        return loaded

    async def open_session(
        self,
        session_id: str,
        reserve_tokens: int = 0,
        sampling: SamplingParams | None = None,
        prefix: tuple[str, int, list[int]] | None = None,
    ) -> None:
        """Open a session under this client's lease (held from the first session on); the
        stage that holds the head samples its tokens by `sampling` (None: greedy). With
        `prefix` (a kept prefix's id, the length to start from, and for the stage that
        samples its tokens), its caches start from that prefix."""
        self._hold_lease()
        request = pb.OpenSessionRequest(
            session_id=session_id, reserve_tokens=reserve_tokens, lease_id=self.lease_id
        )
        if sampling is not None:
            request.sampling.CopyFrom(sampling.to_spec())
        if prefix is not None:
            request.prefix_id, request.prefix_length = prefix[0], prefix[1]
            request.history.extend(prefix[2])
        await self._call(
            lambda: self._stub.OpenSession(
                request, timeout=SESSION_DEADLINE_S, metadata=self._metadata()
            )
        )

    async def end_sessions(self, session_ids: list[str]) -> int:
        """End sessions; returns how many were open. If the call fails, the ids are ended
        later, in the background, once the worker answers again."""
        try:
            return await self._end(session_ids)
        except InvalidArgument:  # ids the worker refuses: no retry can end them
            raise
        except ClusterError:
            self._unended.update(session_ids)
            if self._end_retry is None or self._end_retry.done():
                self._end_retry = asyncio.create_task(self._retry_ends())
            raise

    async def keep_prefixes(
        self, keep: list[tuple[str, str, int]], drop: list[str]
    ) -> tuple[list[str], list[str]]:
        """End sessions kept as prefixes (session id, prefix id, length) where the worker
        has room, and forget the prefixes `drop`; returns the prefixes kept, and those of
        them that can be started from only whole. A failed call ends the sessions later,
        as `end_sessions` does."""
        request = pb.EndSessionRequest(drop_prefixes=drop)
        for session_id, prefix_id, length in keep:
            request.keep.add(session_id=session_id, prefix_id=prefix_id, length=length)
        try:
            reply = await self._call(
                lambda: self._stub.EndSession(
                    request, timeout=SESSION_DEADLINE_S, metadata=self._metadata()
                )
            )
        except ClusterError:
            if keep:
                await self.end_sessions([k[0] for k in keep])
            raise
        return list(reply.kept), list(reply.kept_whole_only)

    async def _end(self, session_ids: list[str]) -> int:
        request = pb.EndSessionRequest(session_ids=session_ids)
        reply = await self._call(
            lambda: self._stub.EndSession(
                request, timeout=SESSION_DEADLINE_S, metadata=self._metadata()
            )
        )
        return reply.ended

    async def _retry_ends(self) -> None:
        """Until the worker has ended every id whose EndSession failed (or no longer knows
        it): EndSession again, with backoff, or at once after another call succeeds."""
        delay = END_RETRY_FIRST_S
        while self._unended:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_now.wait(), delay)
            self._retry_now.clear()
            session_ids = sorted(self._unended)
            try:
                await self._end(session_ids)
            except ClusterError as exc:
                delay = min(2 * delay, END_RETRY_MAX_S)
                log.info(
                    "worker %s: EndSession failed again (%s), next try in %.1f s",
                    self.name,
                    exc,
                    delay,
                )
                continue
            self._unended.difference_update(session_ids)
            log.info("worker %s: ended sessions %s on a retry", self.name, session_ids)

    def _hold_lease(self) -> None:
        if self._lease is None or self._lease.done():
            self._lease = asyncio.create_task(self._keep_lease(), name=f"lease on {self.address}")

    async def _keep_lease(self) -> None:
        """Until close: a Lease call to the worker, made again whenever it ends."""
        request_id.set("-")  # the lease is the client's, not the request's that started it
        request = pb.LeaseRequest(lease_id=self.lease_id)
        while True:
            call = self._stub.Lease(request, metadata=self._metadata(), wait_for_ready=True)
            try:
                async for _ in call:  # heartbeats
                    pass
            except grpc.aio.AioRpcError as exc:
                log.debug("worker %s: lease call ended: %s", self.name, exc.details())
            finally:
                call.cancel()
            await asyncio.sleep(LEASE_RETRY_S)

    async def truncate_session(self, session_id: str, length: int) -> int:
        request = pb.TruncateSessionRequest(session_id=session_id, length=length)
        reply = await self._call(
            lambda: self._stub.TruncateSession(
                request, timeout=SESSION_DEADLINE_S, metadata=self._metadata()
            )
        )
        return reply.length

    def open_stream(self, timeout: float | None = None) -> ForwardStream:
        """A Forward stream for one generation; steps on it are answered in order."""
        return ForwardStream(self, self._stub.Forward(timeout=timeout, metadata=self._metadata()))

    def decode_call(
        self, onward: Sequence[WorkerClient], step_timeout_s: float, draft_step_timeout_s: float
    ) -> grpc.aio.StreamStreamCall:
        """A Decode call: this worker's decode loop, relaying along the `onward` workers
        (engine/ring.py); its steps may take `step_timeout_s` per stage, those with drafts
        the other."""
        relay = self._route(onward, step_timeout_s, draft_step_timeout_s)
        return self._stub.Decode(metadata=(*self._metadata(), *relay.metadata()))

    def relay_call(
        self, onward: Sequence[WorkerClient], step_timeout_s: float
    ) -> grpc.aio.StreamStreamCall:
        """A Forward call whose steps this worker relays along the `onward` workers,
        pipelined (engine/prompt_relay.py); each may take `step_timeout_s` per stage."""
        relay = self._route(onward, step_timeout_s, step_timeout_s)
        in_band = (FAILURES_IN_BAND_KEY, "1")  # chunks go ahead of their answers
        return self._stub.Forward(metadata=(*self._metadata(), in_band, *relay.metadata()))

    def _route(
        self, onward: Sequence[WorkerClient], step_timeout_s: float, draft_step_timeout_s: float
    ) -> Route:
        addresses = tuple(c.address for c in onward)
        probes = tuple(c.shared_memory_probe for c in onward)
        return Route(addresses, step_timeout_s, self._tls_name, draft_step_timeout_s, probes)
