"""The chain: prompts through the stages in layer order, the decode ring, and recovery.

A prompt's chunks go along a relay (prompt_relay.py): the coordinator sends their
token ids to the first stage, which embeds them, and each worker sends its hidden
states straight on to the next, so the stages overlap a long prompt's chunks.
Recovery replays as a star instead (coordinator -> w1 -> coordinator -> w2 -> ...),
timing every hop. Decoding runs as a ring on the workers (ring.py): the coordinator
opens it here and is out of the per-token path.

A step carries a set of rows (requests), each extending its own session by the
same number of tokens. The chain times every hop (a HopEvent for subscribers),
turns a lost worker into `StageFailed`, and recovers: the stage goes to its
restarted worker or a standby, each row's session is reopened on every stage
and its history replayed with the same chunk boundaries (so every cache is
rebuilt exactly), and the step is tried again. Callers see the step succeed or
a contract error; `StageFailed` never leaves this module's public calls.

Liveness: every hop has a deadline (`LivenessConfig`: one for a decode step, a larger
one for a prompt chunk); a hop past it is a lost worker. Ending a request's sessions
never holds its caller longer than `end_wait_s`: the rest finishes in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import mlx.core as mx

from mlx_cluster.contract.config import LivenessConfig
from mlx_cluster.contract.errors import (
    RECOVERABLE,
    ClusterError,
    KVCapacityExceeded,
    PrefixNotFound,
    WorkerUnavailable,
)
from mlx_cluster.coordinator.engine.admission import Admission
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.events import EventBus, HopEvent, HopTiming
from mlx_cluster.coordinator.engine.prefixes import PrefixIndex, keep_prefix
from mlx_cluster.coordinator.engine.request import RequestState
from mlx_cluster.coordinator.engine.ring import Ring, RingFailed
from mlx_cluster.coordinator.engine.stages import StageManager
from mlx_cluster.coordinator.engine.streams import Streams

log = logging.getLogger(__name__)

MAX_RECOVERIES = 2  # per step


class StageFailed(ClusterError):
    """A step failed on one stage in a way a replay can repair; `cause` says how."""

    def __init__(self, index: int, client: WorkerClient, cause: ClusterError) -> None:
        super().__init__(str(cause))
        self.index, self.client, self.cause = index, client, cause
        self.code = cause.code


@dataclass
class StepTiming:
    """Where one step's time went over every stage (seconds, summed)."""

    hops: float = 0.0  # encode + round trip + decode
    compute: float = 0.0  # the workers' own compute


class Chain:
    """The stages in layer order; sessions, prompt steps and decode rings for requests."""

    def __init__(
        self,
        vocab_size: int,
        stages: StageManager,
        admission: Admission | None = None,
        events: EventBus | None = None,
        liveness: LivenessConfig | None = None,
        prefixes: PrefixIndex | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.prefixes = prefixes  # what the stages keep of ended sessions; None: nothing
        self.stages = stages
        self.admission = admission or Admission()
        self.events = events or EventBus()
        self.liveness = liveness or LivenessConfig()
        self.replays = 0  # sessions replayed onto a new chain since start
        self._ending: set[asyncio.Future[Any]] = set()  # ends past end_wait_s

    def streams(self) -> Streams:
        return Streams(self.stages)

    def ring(self) -> Ring:
        """A decode ring over the current stages (the first stage runs the loop)."""
        clients = [s.client for s in self.stages.stages]
        liveness = self.liveness
        return Ring(clients, liveness.decode_hop_timeout_s, liveness.prefill_hop_timeout_s)

    # --- sessions ---------------------------------------------------------------------------

    async def open(self, request: RequestState, timeout: float | None = None) -> None:
        """Open the request's session on every stage (all or nothing).

        A full KV budget waits in the admission queue (at most `timeout` seconds).
        """
        await self._open_admitted(request, timeout)

    async def end(self, request: RequestState, keep: bool = False) -> None:
        """End the request's session on every stage (a failed end is retried by the client);
        with `keep` (and a prefix index), keep what its caches hold as a prefix.

        Waits at most `liveness.end_wait_s`: a worker that does not answer never holds
        the caller; its end goes on in the background.
        """
        if keep and self.prefixes is not None and request.offset > 0 and not request.failed:
            clients = [s.client for s in self.stages.stages]
            await self._wait(keep_prefix(clients, self.prefixes, request))
        else:
            await self._end(request.session_id)

    async def ends_done(self) -> None:
        """Until every end in progress is done, the prefixes it keeps filed."""
        while self._ending:
            await asyncio.wait(list(self._ending))

    async def _wait(self, work: Awaitable[Any], notify: bool = True) -> None:
        """Run `work` (ending sessions) at most `end_wait_s`; the rest in the background.
        With `notify`, waiting requests learn when it is done (room freed, or not: retried)."""
        ending = asyncio.ensure_future(work)
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)
        if notify:
            ending.add_done_callback(lambda _: self.admission.notify())
        await asyncio.wait([ending], timeout=self.liveness.end_wait_s)

    async def _open_admitted(self, request: RequestState, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(self.admission.max_wait_s, timeout or 1e9)
        failures = 0
        while True:
            seen = self.admission.version
            try:
                await self._open(request)
                return
            except PrefixNotFound:  # a stage no longer keeps it: forget it, start over
                if self.prefixes is not None and request.prefix is not None:
                    self.prefixes.forget(request.prefix.prefix.prefix_id)
                request.start_from(None)
            except KVCapacityExceeded as full:
                await self.admission.wait_for_room(full, deadline, seen)
            except StageFailed as failure:
                failures += 1
                if failures > MAX_RECOVERIES:
                    raise failure.cause from failure
                await self.stages.replace(failure.index, failure.client, failure.cause)

    async def _open(self, request: RequestState) -> None:
        """Open a new session for `request` on every current stage (all or nothing)."""
        session_id = request.new_session()
        stages = list(self.stages.stages)
        clients = [s.client for s in stages]
        last = len(clients) - 1
        prefix = request.prefix
        # the last stage's processors and matcher see every token: the prefix's too
        processed = prefix is not None and request.params.sees_every_token
        history = list(request.prompt[: prefix.length]) if prefix and processed else []

        def start(i: int) -> tuple[str, int, list[int]] | None:
            if prefix is None:
                return None
            return (prefix.prefix.prefix_id, prefix.length, history if i == last else [])

        try:  # the last stage samples: it alone needs the sampling parameters
            results = await asyncio.gather(
                *(
                    c.open_session(
                        session_id,
                        request.reserve_tokens,
                        request.params if i == last else None,
                        start(i),
                    )
                    for i, c in enumerate(clients)
                ),
                return_exceptions=True,
            )
        except asyncio.CancelledError:  # some stages may have opened it: end it there
            await asyncio.shield(self._end(session_id, clients, notify=False))
            raise
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                # its own half-open session is no room freed: no notify, or a full
                # budget makes the caller retry at once instead of waiting (or a 429)
                await self._end(session_id, clients, notify=False)
                if isinstance(result, RECOVERABLE):
                    raise StageFailed(i, stages[i].client, result) from result
                raise result

    async def _end(
        self, session_id: str, clients: Sequence[WorkerClient] | None = None, notify: bool = True
    ) -> None:
        if clients is None:
            clients = [s.client for s in self.stages.stages]
        ends = (c.end_sessions([session_id]) for c in clients)
        await self._wait(asyncio.gather(*ends, return_exceptions=True), notify)

    # --- steps ----------------------------------------------------------------------------

    async def step(
        self, streams: Streams, rows: list[RequestState], tokens: mx.array
    ) -> StepTiming:
        """Run tokens [B, L] (row b for rows[b]) into every stage's caches; advance every row.

        Returns where the time went. A lost worker is replaced and the rows replayed, up
        to MAX_RECOVERIES times.
        """
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                offsets = [row.offset for row in rows]
                timing = await self._through(streams, rows, tokens, offsets)
                break
            except StageFailed as failure:
                if attempt == MAX_RECOVERIES:
                    raise failure.cause from failure
                await self._recover(streams, rows, failure)
        for row, chunk in zip(rows, tokens, strict=True):
            row.advance(chunk)
        return timing

    async def prefill(self, streams: Streams, row: RequestState, chunks: list[mx.array]) -> None:
        """Run prompt chunks [L_k] of one request through every stage.

        With several stages the chunks go along a prompt relay (prompt_relay.py): the
        stages overlap them, and hidden states go from worker to worker. Each worker
        sees the same chunks at the same offsets, in order, as with one `step` per chunk.
        """
        if len(self.stages) <= 1:
            for chunk in chunks:
                await self.step(streams, [row], chunk[None])
            return
        done_before = len(row.history)

        def answered(k: int, hops: list[HopTiming]) -> None:
            row.advance(chunks[k])
            for stage, hop in zip(self.stages.stages, hops, strict=True):
                self._published(stage.client, 1, chunks[k].shape[0], hop)

        relay = streams.relay(self.liveness.prefill_hop_timeout_s)
        try:
            await relay.run(row.session_id, chunks, row.offset, answered)
            return
        except RingFailed as exc:
            if not isinstance(exc.cause, RECOVERABLE):
                raise exc.cause from exc
            failure = StageFailed(exc.index, exc.client, exc.cause)
        await self._recover(streams, [row], failure)
        for chunk in chunks[len(row.history) - done_before :]:
            await self.step(streams, [row], chunk[None])

    # --- one pass ------------------------------------------------------------------------

    async def _through(
        self, streams: Streams, rows: list[RequestState], tokens: mx.array, offsets: list[int]
    ) -> StepTiming:
        ids = [row.session_id for row in rows]
        timing = StepTiming()
        hidden = None
        for i in range(len(self.stages)):
            hidden = await self._hop(streams, i, ids, tokens, hidden, offsets, timing)
        return timing

    async def _hop(
        self,
        streams: Streams,
        index: int,
        session_ids: list[str],
        tokens: mx.array,
        hidden: mx.array | None,
        offsets: list[int],
        timing: StepTiming | None = None,
    ) -> mx.array:
        """One step of `tokens` [B, L] on stage `index`: the first stage gets the tokens, the
        others the previous stage's hidden states, the last the tokens too (its sessions
        sample: their logits processors see every token). A loss a replay can repair
        raises StageFailed; so does a worker that does not answer within the hop's deadline.
        """
        client, stream = streams[index]
        last = index == len(self.stages) - 1
        decode = tokens.shape[1] == 1
        bound = (
            self.liveness.decode_hop_timeout_s if decode else self.liveness.prefill_hop_timeout_s
        )
        token_ids = tokens if index == 0 or last else None
        try:
            async with asyncio.timeout(bound):
                out, hop = await stream.step(session_ids, hidden, offsets, last, token_ids)
        except RECOVERABLE as exc:
            raise StageFailed(index, client, exc) from exc
        except TimeoutError as exc:  # the step's call was cancelled: the stream is not reused
            setting = "decode_hop_timeout_s" if decode else "prefill_hop_timeout_s"
            lost = WorkerUnavailable(
                f"worker {client.name} did not answer a {tokens.shape[1]}-token step "
                f"within {bound:g} s (liveness.{setting})"
            )
            lost.code = grpc.StatusCode.DEADLINE_EXCEEDED  # as a call past its deadline
            raise StageFailed(index, client, lost) from exc
        if timing is not None:
            timing.hops += hop.encode + hop.round_trip + hop.decode
            timing.compute += hop.compute
        self._published(client, len(session_ids), tokens.shape[1], hop)
        return out

    def _published(self, client: WorkerClient, rows: int, tokens: int, hop: HopTiming) -> None:
        event = HopEvent(
            client.name, rows, tokens, hop.encode, hop.network, hop.compute, hop.decode
        )
        self.events.publish(event)

    # --- recovery ------------------------------------------------------------------------

    async def recover(
        self,
        streams: Streams,
        rows: list[RequestState],
        index: int,
        client: WorkerClient,
        cause: ClusterError,
    ) -> None:
        """Stage `index` failed (its worker `client`, by `cause`): replace it and replay
        `rows` onto the new chain (the decode ring's recovery)."""
        await self._recover(streams, rows, StageFailed(index, client, cause))

    async def _recover(
        self, streams: Streams, rows: list[RequestState], failure: StageFailed
    ) -> None:
        """Replace the failed stage's worker, reopen each row's session, replay its history.

        A failure during recovery starts it again, up to MAX_RECOVERIES times in all.

        Raises:
            ClusterError: what the last failure was (WorkerUnavailable when no worker
                could take the stage), never StageFailed.
        """
        for attempt in range(MAX_RECOVERIES + 1):
            log.warning(
                "worker %s failed (%s); recovering %d requests",
                failure.client.name,
                failure.cause,
                len(rows),
            )
            try:
                await self.stages.replace(failure.index, failure.client, failure.cause)
                if self.prefixes is not None:  # the new worker keeps none of them
                    self.prefixes.clear()
                for row in rows:
                    await self._replay(streams, row)
                return
            except StageFailed as exc:
                if attempt == MAX_RECOVERIES:
                    raise exc.cause from exc
                failure = exc

    async def _replay(self, streams: Streams, row: RequestState) -> None:
        await self._end(row.session_id)
        row.prefix = None  # its history holds the prefix's tokens: every stage replays them
        await self._open(row)
        offset = 0
        for chunk in row.history:
            await self._through(streams, [row], chunk[None], [offset])
            offset += chunk.shape[0]
        self.replays += 1
        log.warning("session %s: replayed %d tokens onto the new chain", row.session_id, offset)
