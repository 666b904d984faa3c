"""Decode lanes: requests that step together, one token each, over their own streams.

A lane is a micro-batch. Its members step together as one Forward of [B, 1, D]
through every stage, and each samples with its own parameters; a batch of one
is a lane too. A request joining a lane first prefills there, chunk by chunk:
the lane alternates a few prefill chunks of each newcomer (overlapped across the
stages) with a decode step of its members, so decoding never waits for a whole
long prompt.
Members join and leave at token boundaries.

Each lane runs in its own task, so while the last stage computes lane A's step
the first computes lane B's: with many requests in flight the stages work at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass

import mlx.core as mx

from mlx_cluster.contract.errors import ClusterError
from mlx_cluster.coordinator.engine.chain import Chain
from mlx_cluster.coordinator.engine.events import StepEvent
from mlx_cluster.coordinator.engine.request import RequestState, pick_rows

log = logging.getLogger(__name__)


@dataclass
class StepProfile:
    """Decode steps: how many, how full, and where their time went (seconds, summed)."""

    steps: int = 0
    rows: int = 0  # requests carried, summed over steps (/ steps = mean batch)
    largest: int = 0  # most requests one step carried
    wall: float = 0.0  # the whole step, embedding to delivery
    hops: float = 0.0  # every stage's encode + round trip + decode
    compute: float = 0.0  # the workers' own compute, as they measured it
    sample: float = 0.0  # LM head, processors, samplers (evaluated)

    def add(self, other: StepProfile) -> None:
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, max(mine, theirs) if f.name == "largest" else mine + theirs)

    def per_step_ms(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {k: 1e3 * getattr(self, k) / n for k in ("wall", "hops", "compute", "sample")}


class Lane:
    """One micro-batch of requests, with a Forward stream per stage."""

    def __init__(self, chain: Chain, index: int, step_timeout_s: float, prefill_turn: int) -> None:
        self.chain = chain
        self.index = index
        self.step_timeout_s = step_timeout_s  # a worker that hangs fails the step
        self.prefill_turn = prefill_turn  # prefill chunks between two decode steps
        self.streams = chain.streams()
        self.members: list[RequestState] = []  # decoding
        self.prefilling: list[RequestState] = []  # in order of arrival
        self.joining: list[RequestState] = []
        self.profile = StepProfile()
        self._task: asyncio.Task[None] | None = None

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

    # --- the lane's task -----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while self._admit():
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

    def _admit(self) -> bool:
        """At a token boundary: let go of those that left or are done, let newcomers in.

        Returns whether the lane has work left.
        """
        for request in self.members + self.prefilling:
            if request.leaving or request.remaining <= 0:
                request.gone.set()
        self.members = [r for r in self.members if not r.gone.is_set()]
        self.prefilling = [r for r in self.prefilling if not r.gone.is_set()]
        self.prefilling += [r for r in self.joining if not r.leaving]
        self.joining = []
        return bool(self.members or self.prefilling)

    async def _prefill_turn(self) -> None:
        """The next prompt chunks of every newcomer, all at once (the stages overlap them)."""
        await asyncio.gather(*(self._prefill_some(r) for r in list(self.prefilling)))

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
        if not request.to_prefill:
            self.prefilling.remove(request)
            self.members.append(request)

    async def _decode_turn(self) -> None:
        members = self.members
        try:
            async with asyncio.timeout(self.step_timeout_s):
                await self._decode_step(members)
        except Exception as exc:  # the whole step failed: every member gets the error
            log.warning("lane %d: step failed for %d requests: %s", self.index, len(members), exc)
            for request in members:
                request.fail(exc)
            self.members = []

    async def _decode_step(self, members: list[RequestState]) -> None:
        started = time.perf_counter()
        tokens = mx.concatenate([m.pending for m in members])[:, None]
        hidden, timing = await self.chain.step(self.streams, members, tokens)
        sampling = time.perf_counter()
        pick_rows(members, self.chain.logits(hidden))
        done = time.perf_counter()
        profile = self.profile
        profile.steps += 1
        profile.rows += len(members)
        profile.largest = max(profile.largest, len(members))
        profile.wall += done - started
        profile.hops += timing.hops
        profile.compute += timing.compute
        profile.sample += done - sampling
        self.chain.events.publish(
            StepEvent(
                self.index,
                len(members),
                done - started,
                timing.hops,
                timing.compute,
                done - sampling,
            )
        )
