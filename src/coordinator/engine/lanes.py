"""Decode lanes: requests that step together, one token each, on one decode ring.

A lane is a micro-batch. A request joining a lane first prefills its prompt
there, chunk by chunk, through the stages (the chain's star path, overlapped
across stages); then it joins the lane's ring (ring.py), where the first stage
steps all the lane's rows together, the last samples each with its own
parameters, and the tokens come back as one event per step. A batch of one is
a lane too. While newcomers prefill, the ring keeps decoding the others; their
tokens are delivered after each prefill turn, so decoding never waits for a
whole long prompt.

Rows join and leave at token boundaries; a row also leaves the ring by itself
after its last token or a stop token. When the ring breaks, the failed stage
is replaced, the lane's rows are replayed onto the new chain and a new ring
takes them on from where they were.

Each lane runs in its own task and ring, so while the last stage computes lane
A's step the first computes lane B's: with many requests in flight the stages
work at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass

from mlx_cluster.contract.errors import RECOVERABLE, ClusterError
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.sampling import SampledToken
from mlx_cluster.contract.speculation import split_rows
from mlx_cluster.coordinator.engine.chain import MAX_RECOVERIES, Chain
from mlx_cluster.coordinator.engine.events import StepEvent
from mlx_cluster.coordinator.engine.request import RequestState
from mlx_cluster.coordinator.engine.ring import Ring, RingFailed

log = logging.getLogger(__name__)


@dataclass
class StepProfile:
    """Decode steps: how many, how full, and where their time went (seconds, summed)."""

    steps: int = 0
    rows: int = 0  # requests carried, summed over steps (/ steps = mean batch)
    largest: int = 0  # most requests one step carried
    wall: float = 0.0  # between two steps' arrival: the time a token takes
    hops: float = 0.0  # on the ring beyond the stages' compute
    compute: float = 0.0  # the workers' own compute (sampling included), as they measured it

    def add(self, other: StepProfile) -> None:
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, max(mine, theirs) if f.name == "largest" else mine + theirs)

    def per_step_ms(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {k: 1e3 * getattr(self, k) / n for k in ("wall", "hops", "compute")}


class Lane:
    """One micro-batch of requests: Forward streams per stage for prompts, a ring to decode."""

    def __init__(self, chain: Chain, index: int, step_timeout_s: float, prefill_turn: int) -> None:
        self.chain = chain
        self.index = index
        self.step_timeout_s = step_timeout_s  # a worker that hangs fails the step
        self.prefill_turn = prefill_turn  # prefill chunks between two deliveries of tokens
        self.streams = chain.streams()
        self.ring: Ring | None = None
        self.members: list[RequestState] = []  # rows of the ring
        self.prefilling: list[RequestState] = []  # in order of arrival
        self.joining: list[RequestState] = []
        self.profile = StepProfile()
        self._task: asyncio.Task[None] | None = None
        self._dropped: set[str] = set()  # sessions asked to leave the ring
        self._last_event = 0.0  # when the ring's previous step arrived
        self._failures = 0  # rings broken in a row with no step in between

    def __len__(self) -> int:
        return len(self.members) + len(self.prefilling) + len(self.joining)

    def join(self, request: RequestState) -> None:
        self.joining.append(request)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"lane-{self.index}")

    async def release(self, request: RequestState) -> None:
        """Take a request out; returns once no step of this lane carries it any more."""
        request.leaving = True
        if request in self.joining:
            self.joining.remove(request)
            request.gone.set()
        if self._task is None:  # the lane stopped: nothing carries it
            request.gone.set()
        await request.gone.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.streams.close()
        await self._close_ring()

    async def _close_ring(self) -> None:
        ring, self.ring = self.ring, None
        if ring is not None:
            await ring.close()

    # --- the lane's task -----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while await self._admit():
                if self.prefilling:
                    await self._prefill_turn()
                if self.members:
                    await self._decode_turn()
        finally:
            self._task = None
            stopped = ClusterError("the decode lane was stopped")
            for request in self.members + self.prefilling + self.joining:
                request.fail(stopped)  # cancelled: nobody may wait forever
            self.members, self.prefilling, self.joining = [], [], []
            self._dropped = set()

    async def _admit(self) -> bool:
        """At a token boundary: ask the ring to let go of those that left, let newcomers in.

        Returns whether the lane has work left.
        """
        for request in self.prefilling:
            if request.leaving:
                request.gone.set()
        self.prefilling = [r for r in self.prefilling if not r.gone.is_set()]
        leaving = [
            r.session_id for r in self.members if r.leaving and r.session_id not in self._dropped
        ]
        if leaving and self.ring is not None:
            self._dropped.update(leaving)
            await self._send(drop=leaving)
        self.prefilling += [r for r in self.joining if not r.leaving]
        self.joining = []
        return bool(self.members or self.prefilling)

    async def _prefill_turn(self) -> None:
        """The next prompt chunks of every newcomer, all at once (the stages overlap them)."""
        await asyncio.gather(*(self._prefill_some(r) for r in list(self.prefilling)))
        ready = [r for r in self.prefilling if not r.to_prefill]
        if ready:
            self.prefilling = [r for r in self.prefilling if r.to_prefill]
            await self._enter(ready)

    async def _prefill_some(self, request: RequestState) -> None:
        """A few of a newcomer's prompt chunks (all of them if nobody decodes)."""
        count = len(request.to_prefill) if not self.members else self.prefill_turn
        chunks = request.to_prefill[:count]
        try:
            async with asyncio.timeout(self.step_timeout_s):
                await self.chain.prefill(self.streams, request, chunks)
        except Exception as exc:  # this request fails alone
            log.warning("lane %d: prefill failed: %s", self.index, exc)
            self.prefilling.remove(request)
            request.fail(exc)
            return
        del request.to_prefill[:count]

    async def _enter(self, requests: list[RequestState]) -> None:
        """Requests whose prompts are cached join the ring (opened if the lane has none)."""
        if self.ring is None or self.ring.done:
            await self._close_ring()
            self.ring = self.chain.ring()
        if not self.members:  # the ring was idle: time the next step from now
            self._last_event = time.perf_counter()
        if any(r.speculation.enabled for r in requests):
            self.ring.expect_drafts()
        self.members += requests
        await self._send(add=[r.decode_row() for r in requests])

    async def _send(
        self, add: list[pb.DecodeRow] | None = None, drop: list[str] | None = None
    ) -> None:
        """A command to the ring; a ring that broke is dealt with at the next event."""
        assert self.ring is not None
        with contextlib.suppress(RingFailed):
            await self.ring.send(add or (), drop or ())

    async def _decode_turn(self) -> None:
        assert self.ring is not None
        try:
            event = await self.ring.next_event()
        except RingFailed as failure:
            await self._recover(failure)
            return
        if event.session_ids:
            self._failures = 0
        self._deliver(event)

    def _deliver(self, event: pb.DecodeEvent) -> None:
        members = {r.session_id: r for r in self.members}
        counts = list(event.counts) or [1] * len(event.session_ids)
        drafted = list(event.drafted) or [0] * len(event.session_ids)
        try:
            if not len(counts) == len(drafted) == len(event.session_ids):
                raise ValueError(f"counts {counts} and drafts {drafted} for the rows")
            rows = split_rows(event.sampled, counts)
        except ValueError as exc:
            raise ClusterError(
                f"a decode event for {len(event.session_ids)} rows does not add up: {exc}"
            ) from exc
        for session_id, tokens, drafts in zip(event.session_ids, rows, drafted, strict=True):
            request = members.get(session_id)
            if request is None:
                continue
            for sampled in tokens:
                request.stepped(SampledToken.from_proto(sampled))
            request.drafted(drafts, min(len(tokens) - 1, drafts))
        for session_id in event.left:  # done, stopped or dropped: no step carries it now
            request = members.get(session_id)
            if request is not None:
                self.members.remove(request)
                self._dropped.discard(session_id)
                request.finish()
                request.gone.set()
        if event.session_ids:
            self._profile(event)

    def _profile(self, event: pb.DecodeEvent) -> None:
        now = time.perf_counter()
        wall, self._last_event = now - self._last_event, now
        rows = len(event.session_ids)
        profile = self.profile
        profile.steps += 1
        profile.rows += rows
        profile.largest = max(profile.largest, rows)
        profile.wall += wall
        profile.hops += event.relay_seconds
        profile.compute += event.compute_seconds
        stages = tuple(event.stage_compute_seconds)
        self.chain.events.publish(
            StepEvent(self.index, rows, wall, event.relay_seconds, event.compute_seconds, stages)
        )

    async def _recover(self, failure: RingFailed) -> None:
        """The ring broke: replace the failed stage, replay the rows, carry on in a new ring.

        An error no replay repairs, or a recovery that fails, fails every row.
        """
        await self._close_ring()
        rows, self.members, self._dropped = self.members, [], set()
        for request in rows:
            if request.leaving:
                request.gone.set()
        rows = [r for r in rows if not r.gone.is_set() and not r.ended]
        if not rows:
            return
        log.warning(
            "lane %d: the ring broke at stage %d (%s); %d requests recovering",
            self.index,
            failure.index,
            failure.cause,
            len(rows),
        )
        self._failures += 1
        try:
            if not isinstance(failure.cause, RECOVERABLE):
                raise failure.cause
            if self._failures > MAX_RECOVERIES:  # every new ring broke before its first step
                raise failure.cause
            async with asyncio.timeout(self.step_timeout_s):
                await self.chain.recover(
                    self.streams, rows, failure.index, failure.client, failure.cause
                )
        except Exception as exc:
            log.warning("lane %d: recovery failed for %d requests: %s", self.index, len(rows), exc)
            for request in rows:
                request.fail(exc)
            return
        await self._enter(rows)
