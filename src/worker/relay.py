"""A worker's calls to the next stage of the ring: the only place a worker is a client.

A Forward or Decode call whose metadata names a route makes this worker relay:
each step's output goes to the first stage of the route on a Forward stream of
its own, which carries the rest of the route, and that stage's answer comes back
as this step's answer. Channels to other workers are kept per address and
reused; the cluster token and TLS files are this worker's own (one cluster CA
signs every worker's certificate).

A failure further down comes back as `RelayFailed`: the error the failed stage
sent (or the loss of it) and that stage's index counted from this worker, so the
coordinator knows which stage to replace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from mlx_cluster.contract.auth import TlsFiles, token_metadata
from mlx_cluster.contract.errors import ClusterError, WorkerUnavailable, error_from_status
from mlx_cluster.contract.logs import REQUEST_ID_HEADER
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import (
    FAILURES_IN_BAND_KEY,
    MAX_MESSAGE_BYTES,
    SESSION_DEADLINE_S,
    Route,
    client_channel_options,
    failed_stage,
)
from mlx_cluster.contract.streams import close_call, ended_status, failure_status
from mlx_cluster.tensor import shared
from mlx_cluster.tensor.shared import SharedArena

log = logging.getLogger(__name__)
T = TypeVar("T")

# A closed stream's next stage has this long to end the call before it is cancelled.
CLOSE_WAIT_S = 1.0


class RelayFailed(ClusterError):
    """A step failed further down the ring: `cause` as the failed stage sent it, and
    `stage`, its index counted from this worker (1 = the next stage)."""

    def __init__(self, cause: ClusterError, stage: int) -> None:
        super().__init__(str(cause))
        self.cause, self.stage = cause, stage
        self.code, self.kind = cause.code, cause.kind


class Peers:
    """Channels from this worker to the others, one per address."""

    def __init__(
        self,
        token: str | None = None,
        tls: TlsFiles | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        shared_min_bytes: int = 0,
    ) -> None:
        """`shared_min_bytes`: hidden states of this many bytes or more go to a next stage
        that shares this host's memory through it (0: never)."""
        self._auth = (token_metadata(token),) if token else ()
        self._tls = tls
        self._shared_min_bytes = shared_min_bytes
        self._shares: dict[str, bool] = {}  # probe -> this process can open it
        # Each channel its own connection: a channel made after a failure (`_forget`) must
        # not share the failed one's, which waits out a reconnect backoff.
        self._options = [
            *client_channel_options(max_message_bytes),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self._stubs: dict[str, pb_grpc.LayerServiceStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._ending: set[asyncio.Task[None]] = set()  # EndSession calls in flight

    def _stub(self, address: str, tls_name: str | None = None) -> pb_grpc.LayerServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            if self._tls is None:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            else:
                options: list[tuple[str, Any]] = list(self._options)
                if tls_name:  # the name the next worker's certificate carries, if not its host
                    options.append(("grpc.ssl_target_name_override", tls_name))
                credentials = self._tls.channel_credentials()
                channel = grpc.aio.secure_channel(address, credentials, options=options)
            self._channels.append(channel)
            stub = self._stubs[address] = pb_grpc.LayerServiceStub(channel)
        return stub

    def next_stage(self, route: Route, request_id: str) -> NextStage:
        """A Forward stream to the route's first stage, relaying on along the rest.

        The route's step timeout is per stage: a step may take that long for each stage
        of the route, so the stage nearest to one that stalls notices first and names it.
        """
        metadata = (
            *self._auth,
            (REQUEST_ID_HEADER, request_id),
            (FAILURES_IN_BAND_KEY, "1"),  # steps go ahead of their answers
            *route.onward().metadata(),
        )
        address = route.addresses[0]
        call = self._stub(address, route.tls_name).Forward(metadata=metadata)
        stages = len(route.addresses)
        timeouts = (route.step_timeout_s * stages, route.draft_step_timeout_s * stages)
        arena = SharedArena(self._shared_min_bytes) if self._shares_with(route) else None
        return NextStage(address, call, timeouts, self._forget, arena)

    def _shares_with(self, route: Route) -> bool:
        """Whether the route's next stage shares this host's memory (its probe opens)."""
        probe = route.next_probe
        if not (probe and self._shared_min_bytes):
            return False
        if probe not in self._shares:
            self._shares[probe] = shared.can_open(probe)
            log.info(
                "next stage %s %s this worker's memory",
                route.addresses[0],
                "shares" if self._shares[probe] else "does not share",
            )
        return self._shares[probe]

    def _forget(self, address: str) -> None:
        """The next stage at `address` could not be reached: the next call gets a new
        channel, which connects at once (a channel that failed waits out its backoff,
        failing calls meanwhile, even once a restarted worker listens again)."""
        self._stubs.pop(address, None)

    def end_sessions(self, route: Route, session_ids: list[str], request_id: str) -> None:
        """End sessions on other stages, in the background; a stage that does not answer
        (gone, or the link down) is left to its lease and idle TTL."""
        metadata = (*self._auth, (REQUEST_ID_HEADER, request_id))
        request = pb.EndSessionRequest(session_ids=session_ids)

        async def end(address: str) -> None:
            try:
                await self._stub(address, route.tls_name).EndSession(
                    request, timeout=SESSION_DEADLINE_S, metadata=metadata
                )
            except grpc.aio.AioRpcError as exc:
                log.info("could not end sessions on %s: %s", address, exc.details())

        for address in route.addresses:
            task = asyncio.create_task(end(address))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    async def close(self) -> None:
        for task in list(self._ending):
            task.cancel()
        await asyncio.gather(*(c.close() for c in self._channels), return_exceptions=True)
        self._channels, self._stubs = [], {}


@dataclass(frozen=True)
class _Sent:
    """A step sent to the next stage and not yet answered."""

    step_id: int
    at: float  # perf_counter() when it was sent
    length: int  # its positions per row
    # A decode step gets the route's step timeout; one that verifies drafts, or a prompt
    # chunk (which samples nothing), the larger one.
    long: bool
    segment: str = ""  # the shared-memory segment its hidden states lie in, if any


def _length(request: pb.ForwardRequest) -> int:
    tensor = request.token_ids if request.HasField("token_ids") else request.hidden
    return tensor.shape[1] if len(tensor.shape) > 1 else 0


class NextStage:
    """One Forward stream to the next stage: steps written in order, their answers read in
    the same order."""

    def __init__(
        self,
        address: str,
        call: grpc.aio.StreamStreamCall,
        timeouts_s: tuple[float, float],
        unreachable: Callable[[str], None] | None = None,
        arena: SharedArena | None = None,
    ) -> None:
        """`timeouts_s`: for a decode step, and for one that verifies drafts or a prompt
        chunk."""
        self.address = address
        self._call = call
        self._timeouts_s = timeouts_s
        self._unreachable = unreachable  # told when the next stage cannot be reached
        # Where large hidden states go when the next stage shares this host's memory.
        self.arena = arena
        self._step_id = 0
        self._sent: deque[_Sent] = deque()  # steps sent, not yet answered, oldest first

    async def step(self, request: pb.ForwardRequest) -> tuple[pb.ForwardResponse, float]:
        """Send one step on and wait for its answer; returns it and the seconds it took.

        Raises:
            RelayFailed: the next stage, or one after it, failed or did not answer in time.
        """
        await self.send(request)
        return await self.answer()

    async def send(self, request: pb.ForwardRequest) -> None:
        """Send one step on; its answer comes from `answer`, after those of the steps sent
        before it (steps may be sent ahead of their answers: the next stage pipelines them).

        Raises:
            RelayFailed: the next stage could not take it.
        """
        self._step_id += 1
        request.step_id = self._step_id
        long = request.verify or not request.sample
        segment = request.hidden.shared.segment if request.hidden.HasField("shared") else ""
        sent = _Sent(request.step_id, time.perf_counter(), _length(request), long, segment)
        self._sent.append(sent)
        await self._io(self._call.write(request), sent)

    async def answer(self) -> tuple[pb.ForwardResponse, float]:
        """The answer of the oldest step sent and not answered, and the seconds since it was
        sent; a step gets its timeout from when the answer before it came.

        Raises:
            RelayFailed: the next stage, or one after it, failed or did not answer in time.
        """
        sent = self._sent.popleft()
        reply = await self._io(self._call.read(), sent)
        if sent.segment and self.arena is not None:  # read by now: it takes the next
            self.arena.release(sent.segment)
        if reply is grpc.aio.EOF:
            raise await self._ended()
        if reply.HasField("failure"):
            self._call.cancel()
            raise self._failed(*failure_status(reply.failure))
        if reply.step_id != sent.step_id:
            self._call.cancel()
            raise RelayFailed(
                ClusterError(
                    f"worker at {self.address}: answer to step {reply.step_id}, "
                    f"expected {sent.step_id}"
                ),
                1,
            )
        return reply, time.perf_counter() - sent.at

    async def _io(self, work: Awaitable[T], sent: _Sent) -> T:
        """A write or read on the call for step `sent`; its failures as RelayFailed."""
        timeout_s = self._timeouts_s[1 if sent.long else 0]
        try:
            async with asyncio.timeout(timeout_s):
                return await work
        except grpc.aio.AioRpcError as exc:
            raise self._failed(exc.code(), exc.details(), exc.trailing_metadata()) from exc
        except asyncio.InvalidStateError:  # the call ended before this write
            raise await self._ended() from None
        except TimeoutError as exc:
            self._call.cancel()
            setting = "prefill_hop_timeout_s" if sent.long else "decode_hop_timeout_s"
            lost = WorkerUnavailable(
                f"worker at {self.address} did not answer a {sent.length}-token step "
                f"within {timeout_s:g} s (liveness.{setting} per stage)"
            )
            lost.code = grpc.StatusCode.DEADLINE_EXCEEDED
            raise RelayFailed(lost, 1) from exc
        except BaseException:
            self._call.cancel()  # a step cut short: its answer must never be read as the next
            raise

    async def _ended(self) -> RelayFailed:
        return self._failed(*await ended_status(self._call))

    def _failed(self, code: grpc.StatusCode, details: str | None, metadata: object) -> RelayFailed:
        stage = failed_stage(metadata)
        if stage == 0 and code == grpc.StatusCode.UNAVAILABLE and self._unreachable is not None:
            self._unreachable(self.address)
        # The next stage's own failure is named here; one relayed from further down names
        # its stage already.
        where = self.address if stage == 0 else None
        cause = error_from_status(code, details or "stream closed", where, metadata)  # type: ignore[arg-type]
        return RelayFailed(cause, 1 + stage)

    async def close(self) -> None:
        """Half-close and let the next stage end the call; cancel it if it does not."""
        await close_call(self._call, CLOSE_WAIT_S)
        if self.arena is not None:
            self.arena.close()

    def cancel(self) -> None:
        """End the call at once: the next stage ends the sessions last stepped on it."""
        self._call.cancel()
        if self.arena is not None:
            self.arena.close()
