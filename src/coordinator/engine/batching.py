"""Continuous batching: requests decode together, in micro-batches that keep every stage busy.

A request prefills on its own (chunk by chunk, between other requests' decode
steps) and samples its first token on its own, exactly as it would alone. It
then joins a *lane*. A lane is a micro-batch: its members step together, one
token each, as one Forward of [B, 1, D] through every stage, over the lane's
own streams; each member samples with its own parameters. Members join and
leave at token boundaries.

There are as many lanes as stages by default. Each lane runs its steps in its
own task, so while the last stage computes lane A's step, the first computes
lane B's, and the coordinator samples lane C's: with one request in flight the
stages take turns, with many they work at once.

Scheduling is first come, first served: a request waits for a free place when
`max_batch` requests are decoding (the KV admission queue of Pipeline.session
still decides who may open a session at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import cast

import mlx.core as mx

from mlx_cluster.contract.errors import ClusterError
from mlx_cluster.coordinator.engine.client import ForwardStream, WorkerClient
from mlx_cluster.coordinator.engine.pipeline import (
    MAX_RECOVERIES,
    Pipeline,
    PipelineSession,
    StageFailed,
)
from mlx_cluster.coordinator.engine.sampling import TokenPicker

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32
DEFAULT_STEP_TIMEOUT_S = 300.0  # one decode step through every worker

# What a member's queue carries: a token and its logprobs, an error, or the end.
Item = tuple[int, mx.array] | BaseException | None


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


@dataclass(eq=False)
class Member:
    """One request decoding in a lane."""

    session: PipelineSession
    picker: TokenPicker
    pending: mx.array  # the token to feed next, [1]
    remaining: int  # tokens still to produce
    out: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    leaving: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set once the lane let go


class Lane:
    """One micro-batch of members stepping together, with a Forward stream per stage."""

    def __init__(self, pipeline: Pipeline, index: int, step_timeout_s: float) -> None:
        self.pipeline = pipeline
        self.index = index
        self.step_timeout_s = step_timeout_s  # a worker that hangs fails the step
        self.members: list[Member] = []
        self.joining: list[Member] = []
        self.streams: list[tuple[WorkerClient, ForwardStream] | None] = []
        self.profile = StepProfile()
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # streams of replaced workers

    def __len__(self) -> int:
        return len(self.members) + len(self.joining)

    def join(self, member: Member) -> None:
        self.joining.append(member)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"decode-lane-{self.index}")

    async def release(self, member: Member) -> None:
        """Take a member out; returns once no step of this lane carries it any more."""
        member.leaving = True
        if member in self.joining:
            self.joining.remove(member)
        if member not in self.members:  # no step carries it; else the next boundary lets go
            member.gone.set()
        await member.gone.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_streams()

    # --- the lane's task -----------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                self._admit()
                if not self.members:
                    return
                try:
                    await self._step_with_recovery()
                except Exception as exc:  # the whole step failed: every member gets the error
                    log.warning(
                        "lane %d: step failed for %d requests: %s",
                        self.index,
                        len(self.members),
                        exc,
                    )
                    for member in self.members:
                        member.out.put_nowait(exc)
                        member.gone.set()
                    self.members = []
                    await self._close_streams()
        finally:
            self._task = None
            if self.members or self.joining:  # cancelled: nobody may wait forever
                for member in self.members + self.joining:
                    member.out.put_nowait(ClusterError("the decode batch was stopped"))
                    member.gone.set()
                self.members, self.joining = [], []

    def _admit(self) -> None:
        """At a token boundary: drop members that left or are done, let new ones in."""
        staying = []
        for member in self.members:
            if member.leaving or member.remaining <= 0:
                member.gone.set()
            else:
                staying.append(member)
        self.members = staying + [m for m in self.joining if not m.leaving]
        self.joining = []

    async def _step_with_recovery(self) -> None:
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                async with asyncio.timeout(self.step_timeout_s):
                    await self._step()
                return
            except StageFailed as failure:
                await self._close_streams()
                if attempt == MAX_RECOVERIES:
                    raise failure.cause from failure
                self._admit()  # those that left need no recovery (their sessions may be gone)
                for member in self.members:
                    await member.session.recover(failure)

    async def _step(self) -> None:
        started = time.perf_counter()
        members = self.members
        sessions = [m.session for m in members]
        pipeline = self.pipeline
        tokens = mx.concatenate([m.pending for m in members])[:, None]
        hidden = pipeline.edges.embed(tokens)
        ids = [s.session_id for s in sessions]
        offsets = [s.offset for s in sessions]
        last = len(pipeline.stages) - 1
        profile = self.profile
        for i in range(len(pipeline.stages)):
            client, stream = self._stream(i)
            hidden, timing = await pipeline.step_stage(
                i, client, stream, ids, hidden, offsets, last_position_only=i == last
            )
            profile.hops += timing.encode + timing.round_trip + timing.decode
            profile.compute += timing.compute
        sampling = time.perf_counter()
        logits = pipeline.edges.head(hidden)[:, -1, :]
        picked = [m.picker.pick(m.pending, logits[row : row + 1]) for row, m in enumerate(members)]
        next_tokens = mx.concatenate([token.reshape(1) for token, _ in picked]).astype(mx.uint32)
        mx.eval(next_tokens, [logprobs for _, logprobs in picked])
        token_ids = cast(list[int], next_tokens.tolist())  # one read for the whole batch
        profile.sample += time.perf_counter() - sampling
        for row, (member, (_, logprobs)) in enumerate(zip(members, picked, strict=True)):
            member.session.history.append(member.pending)
            member.session.offset += 1
            member.pending = next_tokens[row : row + 1]
            member.remaining -= 1
            member.out.put_nowait((token_ids[row], logprobs.squeeze(0)))
            if member.remaining <= 0:
                member.out.put_nowait(None)
        profile.steps += 1
        profile.rows += len(members)
        profile.largest = max(profile.largest, len(members))
        profile.wall += time.perf_counter() - started

    def _stream(self, index: int) -> tuple[WorkerClient, ForwardStream]:
        """This lane's stream to stage `index`, (re)opened if the stage has a new worker."""
        while len(self.streams) <= index:
            self.streams.append(None)
        client = self.pipeline.stages[index].client
        current = self.streams[index]
        if current is not None and current[0] is client:
            return current
        if current is not None:  # the old worker's stream: close it in the background
            closing = asyncio.create_task(current[1].close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        opened = (client, client.open_stream(None))
        self.streams[index] = opened
        return opened

    async def _close_streams(self) -> None:
        streams = [s for _, s in filter(None, self.streams)]
        self.streams = []
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)


class Batcher:
    """The decode lanes of one pipeline, and the cap on requests decoding at once."""

    def __init__(
        self,
        pipeline: Pipeline,
        lanes: int = 0,
        max_batch: int = DEFAULT_MAX_BATCH,
        step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
    ) -> None:
        self.pipeline = pipeline
        count = lanes or len(pipeline.stages)
        self.lanes = [Lane(pipeline, i, step_timeout_s) for i in range(count)]
        self.max_batch = max_batch
        self._places = asyncio.Semaphore(max_batch)

    def profile(self) -> StepProfile:
        """Decode steps over all lanes: how many, how full, where their time went."""
        total = StepProfile()
        for lane in self.lanes:
            total.add(lane.profile)
        return total

    @property
    def steps(self) -> int:
        return self.profile().steps

    @property
    def rows_stepped(self) -> int:
        return self.profile().rows

    @property
    def largest_batch(self) -> int:
        return self.profile().largest

    @property
    def decoding(self) -> int:
        return sum(len(lane) for lane in self.lanes)

    async def decode(
        self, session: PipelineSession, picker: TokenPicker, first: mx.array, count: int
    ) -> AsyncGenerator[tuple[int, mx.array], None]:
        """Yield `count` more (token, logprobs [vocab]) of a session whose last token is `first`."""
        if count <= 0:
            return
        async with self._places:
            lane = min(self.lanes, key=len)
            member = Member(session, picker, first.reshape(1).astype(mx.uint32), count)
            session.batch_exit = member.gone  # the session ends only once the lane let go
            lane.join(member)
            try:
                while (item := await member.out.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                await asyncio.shield(lane.release(member))

    async def close(self) -> None:
        await asyncio.gather(*(lane.close() for lane in self.lanes))
