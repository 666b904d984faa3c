"""The coordinator's end of the decode ring: one Decode call to the first stage.

The first stage runs the decode loop (the worker's ring.py): it feeds each row's
token through the stages, the last samples, and the token goes straight into
the next step; the coordinator only adds rows, drops them, and reads one event
per step. So a token costs the stages' compute and one hop per stage, and none
of the coordinator's time.

A failure anywhere on the ring ends the call; `RingFailed` says which stage
failed (the first stage relays what the others sent) so that the chain can
replace it and replay the rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from mlx_cluster.contract.errors import ClusterError, WorkerUnavailable, error_from_status
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.rpc import failed_stage
from mlx_cluster.contract.streams import close_call, ended_status
from mlx_cluster.coordinator.engine.client import WorkerClient

# A closed ring's first stage has this long to end the call before it is cancelled.
CLOSE_WAIT_S = 1.0


class RingFailed(ClusterError):
    """The ring broke: `cause` as the failed stage sent it, `index` the stage that failed,
    `client` the worker that held it then."""

    def __init__(self, index: int, client: WorkerClient, cause: ClusterError) -> None:
        super().__init__(str(cause))
        self.index, self.client, self.cause = index, client, cause
        self.code = cause.code


def relay_failure(
    clients: Sequence[WorkerClient], code: grpc.StatusCode, details: str | None, metadata: object
) -> RingFailed:
    """How a call relaying along `clients` ended: the stage its trailing metadata names
    (the first stage reports the others' failures), and the error."""
    index = min(failed_stage(metadata), len(clients) - 1)
    client = clients[index]
    # A relayed failure names the failed worker by its address: name it as configured.
    details = (details or "stream closed").removeprefix(f"worker {client.address}: ")
    cause = error_from_status(code, details, client.name, metadata)  # type: ignore[arg-type]
    return RingFailed(index, client, cause)


class Ring:
    """A Decode call to the first of `clients`, relaying along the others in order."""

    def __init__(
        self,
        clients: Sequence[WorkerClient],
        step_timeout_s: float,
        draft_step_timeout_s: float | None = None,
    ) -> None:
        """`step_timeout_s` per stage and step; `draft_step_timeout_s` (default: the same)
        for a step that verifies drafts."""
        self.clients = list(clients)  # the stages when the ring was opened
        self._draft_step_timeout_s = draft_step_timeout_s or step_timeout_s
        self._call = self.clients[0].decode_call(
            self.clients[1:], step_timeout_s, self._draft_step_timeout_s
        )
        # no event for this long while rows decode: the first stage is lost (the others are
        # timed by the first stage, which reports them)
        self.event_timeout_s = step_timeout_s * (len(self.clients) + 1)

    def expect_drafts(self) -> None:
        """Rows that draft ride the ring: a step may take a step with drafts' time."""
        self.event_timeout_s = max(
            self.event_timeout_s, self._draft_step_timeout_s * (len(self.clients) + 1)
        )

    @property
    def done(self) -> bool:
        return self._call.done()

    async def send(self, add: Sequence[pb.DecodeRow] = (), drop: Sequence[str] = ()) -> None:
        """Rows in, rows out; the first stage applies them before its next step."""
        try:
            await self._call.write(pb.DecodeCommand(add=add, drop=drop))
        except grpc.aio.AioRpcError as exc:
            raise self._failed(exc.code(), exc.details(), exc.trailing_metadata()) from exc
        except asyncio.InvalidStateError:  # the call ended already: say why
            raise await self._ended() from None

    async def next_event(self) -> pb.DecodeEvent:
        """The next step's event.

        Raises:
            RingFailed: the ring broke, or its first stage sent nothing in time.
        """
        try:
            async with asyncio.timeout(self.event_timeout_s):
                event = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise self._failed(exc.code(), exc.details(), exc.trailing_metadata()) from exc
        except TimeoutError as exc:
            self._call.cancel()
            lost = WorkerUnavailable(
                f"worker {self.clients[0].name} sent no decode step within "
                f"{self.event_timeout_s:g} s"
            )
            lost.code = grpc.StatusCode.DEADLINE_EXCEEDED
            raise RingFailed(0, self.clients[0], lost) from exc
        except BaseException:
            self._call.cancel()
            raise
        if event is grpc.aio.EOF:
            raise await self._ended()
        return event

    async def _ended(self) -> RingFailed:
        return self._failed(*await ended_status(self._call))

    def _failed(self, code: grpc.StatusCode, details: str | None, metadata: object) -> RingFailed:
        return relay_failure(self.clients, code, details, metadata)

    async def close(self) -> None:
        """Half-close and let the first stage end the call; cancel it if it does not."""
        await close_call(self._call, CLOSE_WAIT_S)
