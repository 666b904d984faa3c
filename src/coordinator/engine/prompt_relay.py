"""A prompt's chunks through a chain of several stages without passing through the
coordinator: one Forward call to the first stage, which relays each chunk along the
others (the worker's relayed_steps.py).

The coordinator writes the chunks' token ids back to back; each stage sends its
hidden states for a chunk straight on to the next and takes the next chunk, so
the stages overlap the chunks, and a chunk's hidden states cross each link once.
The last stage answers each chunk with its last position only.

A failure anywhere ends the call; `RingFailed` names the stage that failed (the
first stage relays what the others sent) so that the chain can replace it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import grpc
import mlx.core as mx

from mlx_cluster import tensor
from mlx_cluster.contract.errors import ClusterError, WorkerUnavailable
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.streams import close_call, ended_status, failure_status
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.events import HopTiming
from mlx_cluster.coordinator.engine.ring import RingFailed, relay_failure

# A closed relay's first stage has this long to end the call before it is cancelled.
CLOSE_WAIT_S = 1.0


class PromptRelay:
    """A Forward call to the first of `clients` that relays along the others in order."""

    def __init__(self, clients: Sequence[WorkerClient], step_timeout_s: float) -> None:
        """`step_timeout_s`: how long a chunk may take on each stage."""
        self.clients = list(clients)  # the stages when the relay was opened
        self._step_timeout_s = step_timeout_s
        self._call = self.clients[0].relay_call(self.clients[1:], step_timeout_s)
        # no answer for this long: the first stage is lost (it times the others)
        self._answer_timeout_s = step_timeout_s * (len(self.clients) + 1)
        self._step_id = 0
        self._turn = asyncio.Lock()  # one prompt at a time: answers come in order
        self._failure: RingFailed | None = None  # what ended the call, for prompts waiting

    @property
    def done(self) -> bool:
        """A stage failed: nothing more goes through."""
        return self._failure is not None

    async def run(
        self,
        session_id: str,
        chunks: Sequence[mx.array],
        start: int,
        answered: Callable[[int, list[HopTiming]], None],
    ) -> None:
        """Chunks [L_k] of one session's prompt from position `start`: `answered(k, hops)`
        once every stage holds chunk k, with where its time went on each stage.

        Raises:
            RingFailed: a stage failed, or the first stage answered nothing in time.
        """
        requests, offset = [], start
        for chunk in chunks:
            request = pb.ForwardRequest(
                session_ids=[session_id], offsets=[offset], last_position_only=True
            )
            tensor.encode(chunk[None], out=request.token_ids)
            requests.append(request)
            offset += chunk.shape[0]
        async with self._turn:
            if self._failure is not None:  # a stage failed a prompt before this one
                raise RingFailed(self._failure.index, self._failure.client, self._failure.cause)
            if self._call.done():  # a prompt before this one was cut short: a new call
                self._call = self.clients[0].relay_call(self.clients[1:], self._step_timeout_s)
            for request in requests:
                self._step_id += 1
                request.step_id = self._step_id
            written: list[float] = []  # when each was written
            writer = asyncio.create_task(self._write(requests, written))
            try:
                for k, request in enumerate(requests):
                    reply = await self._read(request.step_id)
                    hops = self._hops(reply, time.perf_counter() - written[k])
                    answered(k, hops)
                await writer
            except BaseException as exc:
                writer.cancel()
                self._call.cancel()  # answers of unread chunks must never be read as others'
                if isinstance(exc, RingFailed):
                    self._failure = exc
                raise

    async def _write(self, requests: list[pb.ForwardRequest], written: list[float]) -> None:
        try:
            for request in requests:
                written.append(time.perf_counter())
                await self._call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call ended: the read that follows says why

    async def _read(self, step_id: int) -> pb.ForwardResponse:
        try:
            async with asyncio.timeout(self._answer_timeout_s):
                reply = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise self._failed(exc.code(), exc.details(), exc.trailing_metadata()) from exc
        except TimeoutError as exc:
            lost = WorkerUnavailable(
                f"worker {self.clients[0].name} answered no prompt chunk within "
                f"{self._answer_timeout_s:g} s"
            )
            lost.code = grpc.StatusCode.DEADLINE_EXCEEDED
            raise RingFailed(0, self.clients[0], lost) from exc
        if reply is grpc.aio.EOF:
            raise self._failed(*await ended_status(self._call))
        if reply.HasField("failure"):
            raise self._failed(*failure_status(reply.failure))
        if reply.step_id != step_id:
            raise RingFailed(
                0,
                self.clients[0],
                ClusterError(
                    f"worker {self.clients[0].name}: answer to step {reply.step_id}, "
                    f"expected {step_id}"
                ),
            )
        return reply

    def _hops(self, reply: pb.ForwardResponse, round_trip: float) -> list[HopTiming]:
        """Each stage's part of a chunk's `round_trip`: from the hop into it to its answer,
        less the time further down, and its compute (chunks overlap: a hop's time counts
        its wait behind the chunk before). Each client keeps its hop's network time."""
        compute, relay = list(reply.stage_compute_seconds), list(reply.stage_relay_seconds)
        n = len(self.clients)
        if len(compute) != n or len(relay) != n - 1:
            raise RingFailed(
                0,
                self.clients[0],
                ClusterError(f"a prompt chunk's answer times {len(compute)} of {n} stages"),
            )
        trips, further = [round_trip, *relay], [*relay, 0.0]
        hops = [HopTiming(0.0, trips[i] - further[i], compute[i], 0.0) for i in range(n)]
        for client, hop in zip(self.clients, hops, strict=True):
            client.last_step_network_s = hop.network
        return hops

    def _failed(self, code: grpc.StatusCode, details: str | None, metadata: object) -> RingFailed:
        return relay_failure(self.clients, code, details, metadata)

    async def close(self) -> None:
        """Half-close and let the first stage end the call (once the prompt going through
        is done); cancel it if it does not."""
        async with self._turn:
            await close_call(self._call, CLOSE_WAIT_S)
