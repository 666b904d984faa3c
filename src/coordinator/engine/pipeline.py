"""Chain hidden states through the workers, in layer order, for one session at a time.

Topology: a star. The coordinator sends each worker's output to the next
worker itself (coordinator -> w1 -> coordinator -> w2 -> ...). This costs one
extra transfer per hop compared with workers forwarding to each other, but it
keeps workers independent of each other's addresses, lets the coordinator see
and time every hop, and keeps failure handling in one place.

Failure handling: a session remembers the token chunks it sent, in order. When
a worker fails mid-session, the stage is handed to a standby (or to the same
worker if it is back), the session is reopened on every stage and its chunks
are replayed with the same boundaries, so every cache is rebuilt exactly and
generation continues with the tokens it would have produced anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from mlx_cluster.contract.errors import (
    RECOVERABLE,
    ClusterError,
    KVCapacityExceeded,
    WorkerUnavailable,
)
from mlx_cluster.contract.layers import LayerRange
from mlx_cluster.coordinator.engine.client import ForwardStream, HopTiming, WorkerClient
from mlx_cluster.coordinator.engine.events import EventBus, HopEvent
from mlx_cluster.models.slicing import ModelEdges

log = logging.getLogger(__name__)

MAX_RECOVERIES = 2  # per step
BATCH_EXIT_WAIT_S = 60.0  # longest wait for a decode batch to let go of a closing session


@dataclass
class Stage:
    """One worker, the layers it holds, and what it was loaded with."""

    client: WorkerClient
    layers: LayerRange
    kv_budget_tokens: int = 0  # 0 = the worker's default
    session_ttl_s: float = 0.0  # 0 = the worker's default


class StageFailed(ClusterError):
    """A step failed on one stage; `cause` says how."""

    def __init__(self, index: int, client: WorkerClient, cause: ClusterError) -> None:
        super().__init__(str(cause))
        self.index, self.client, self.cause = index, client, cause
        self.code = cause.code


@dataclass
class Admission:
    """Sessions waiting for KV room: at most `max_waiting`, each for at most `max_wait_s`."""

    max_waiting: int = 0  # 0 = refuse at once when full
    max_wait_s: float = 30.0
    waiting: int = 0
    freed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.freed.set()

    async def wait_for_room(self, error: KVCapacityExceeded, deadline: float) -> None:
        """Wait until some session ends, or re-raise `error` if the queue is full or time is up."""
        loop = asyncio.get_running_loop()
        if self.waiting >= self.max_waiting or loop.time() >= deadline:
            raise error
        self.waiting += 1
        self.freed.clear()
        try:
            async with asyncio.timeout_at(deadline):
                await self.freed.wait()
        except TimeoutError:
            raise error from None
        finally:
            self.waiting -= 1


class PipelineSession:
    """One session open on every stage, with the history needed to rebuild it."""

    def __init__(self, pipeline: Pipeline, reserve_tokens: int, timeout: float | None) -> None:
        self.pipeline = pipeline
        self.edges = pipeline.edges
        self.reserve_tokens = reserve_tokens
        self.timeout = timeout
        self.session_id = ""
        self.stages: list[Stage] = []
        self.streams: list[ForwardStream] = []
        self.offset = 0  # tokens cached on every stage
        self.history: list[mx.array] = []  # token chunks sent, in order
        self.recoveries = 0
        self.batch_exit: asyncio.Event | None = None  # set once no decode batch carries it

    # --- opening and closing ------------------------------------------------------

    async def open(self) -> None:
        """Open the session on every current stage (all or nothing)."""
        self.session_id = uuid.uuid4().hex
        stages = list(self.pipeline.stages)
        results = await asyncio.gather(
            *(s.client.open_session(self.session_id, self.reserve_tokens) for s in stages),
            return_exceptions=True,
        )
        opened = [s for s, r in zip(stages, results, strict=True) if r is None]
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                await self._end(opened, [])
                if isinstance(result, RECOVERABLE):
                    raise StageFailed(i, stages[i].client, result) from result
                raise result
        self.stages = stages
        self.streams = [s.client.open_stream(self.timeout) for s in stages]

    async def close(self) -> None:
        if self.batch_exit is not None:  # a step in flight may still carry this session
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.batch_exit.wait(), BATCH_EXIT_WAIT_S)
        await self._end(self.stages, self.streams)
        self.stages, self.streams = [], []
        self.pipeline.admission.notify()

    async def _end(self, stages: list[Stage], streams: list[ForwardStream]) -> None:
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
        await asyncio.gather(
            *(s.client.end_sessions([self.session_id]) for s in stages), return_exceptions=True
        )

    # --- stepping ----------------------------------------------------------------------

    async def forward(self, tokens: mx.array) -> mx.array:
        """Run token ids [L] through every stage; returns hidden states [1, 1, D] of the last.

        Each worker appends these L tokens to its cache for this session. A worker
        lost on the way is replaced and the session replayed (up to MAX_RECOVERIES).
        """
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                hidden = await self._step(tokens, self.offset)
                break
            except StageFailed as failure:
                if attempt == MAX_RECOVERIES:
                    raise failure.cause from failure
                await self.recover(failure)
        self.history.append(tokens)
        self.offset += tokens.shape[0]
        return hidden

    async def prefill(self, chunks: Sequence[mx.array]) -> None:
        """Run prompt chunks [L_k] through every stage, overlapped across stages.

        Stage i takes chunk k+1 while stage i+1 takes chunk k, so a long prompt
        keeps every worker busy. Each worker sees the same chunks at the same
        offsets, in order, as with `forward` one chunk at a time.
        """
        if len(chunks) <= 1 or len(self.streams) <= 1:
            for chunk in chunks:
                await self.forward(chunk)
            return
        done_before = len(self.history)
        try:
            await self._overlapped(chunks)
        except StageFailed as failure:
            done = len(self.history) - done_before
            await self.recover(failure)
            for chunk in chunks[done:]:
                await self.forward(chunk)

    async def _overlapped(self, chunks: Sequence[mx.array]) -> None:
        last = len(self.streams) - 1
        starts = [self.offset]
        for chunk in chunks[:-1]:
            starts.append(starts[-1] + chunk.shape[0])
        inboxes: list[asyncio.Queue[tuple[int, mx.array]]] = [asyncio.Queue() for _ in self.streams]
        for k, chunk in enumerate(chunks):
            inboxes[0].put_nowait((k, self.edges.embed(chunk[None])))

        async def stage(i: int) -> None:
            for _ in chunks:
                k, hidden = await inboxes[i].get()
                out = await self._hop(i, hidden, starts[k], last_position_only=(i == last))
                if i < last:
                    inboxes[i + 1].put_nowait((k, out))
                else:
                    self.history.append(chunks[k])
                    self.offset += chunks[k].shape[0]

        try:
            async with asyncio.TaskGroup() as group:
                for i in range(len(self.streams)):
                    group.create_task(stage(i))
        except* StageFailed as failures:
            raise failures.exceptions[0] from None

    async def logits(self, tokens: mx.array) -> mx.array:
        """Run token ids [L] through the model; returns the last position's logits [1, vocab]."""
        hidden = await self.forward(tokens)
        return self.edges.head(hidden)[:, -1, :]

    async def _step(self, tokens: mx.array, offset: int) -> mx.array:
        hidden = self.edges.embed(tokens[None])
        last = len(self.streams) - 1
        for i in range(len(self.streams)):
            hidden = await self._hop(i, hidden, offset, last_position_only=(i == last))
        return hidden

    async def _hop(
        self, i: int, hidden: mx.array, offset: int, last_position_only: bool
    ) -> mx.array:
        out, _ = await self.pipeline.step_stage(
            i,
            self.stages[i].client,
            self.streams[i],
            [self.session_id],
            hidden,
            [offset],
            last_position_only,
        )
        return out

    async def recover(self, failure: StageFailed) -> None:
        """Replace the failed stage's worker, reopen everywhere, replay the history."""
        log.warning(
            "session %s: worker %s failed (%s); recovering",
            self.session_id,
            failure.client.name,
            failure.cause,
        )
        await self.pipeline.replace_stage(failure.index, failure.client)
        await self._end(self.stages, self.streams)
        await self.open()
        offset = 0
        for chunk in self.history:
            await self._step(chunk, offset)
            offset += chunk.shape[0]
        self.recoveries += 1
        log.warning("session %s: replayed %d tokens onto the new chain", self.session_id, offset)


class Pipeline:
    """The workers, in layer order, plus the coordinator's embedding and head."""

    def __init__(
        self,
        edges: ModelEdges,
        stages: list[Stage],
        standbys: list[WorkerClient] | None = None,
        admission: Admission | None = None,
        model_ref: str | None = None,
    ) -> None:
        self.edges = edges
        self.stages = stages
        self.model_ref = model_ref or str(edges.path)  # what workers are told to load
        self.standbys = list(standbys or [])
        self.admission = admission or Admission()
        self.events = EventBus()  # a HopEvent per step per worker
        self._replacing = asyncio.Lock()

    async def step_stage(
        self,
        index: int,
        client: WorkerClient,
        stream: ForwardStream,
        session_ids: list[str],
        hidden: mx.array,
        offsets: list[int],
        last_position_only: bool,
    ) -> tuple[mx.array, HopTiming]:
        """One step on stage `index`'s worker, told to the hop observer.

        Raises:
            StageFailed: the worker lost the sessions' state (a replay can restore it).
        """
        try:
            out, timing = await stream.step(session_ids, hidden, offsets, last_position_only)
        except RECOVERABLE as exc:
            raise StageFailed(index, client, exc) from exc
        self.events.publish(
            HopEvent(
                client.name,
                len(session_ids),
                hidden.shape[1],
                timing.encode,
                timing.network,
                timing.compute,
                timing.decode,
            )
        )
        return out, timing

    @contextlib.asynccontextmanager
    async def session(
        self, reserve_tokens: int = 0, timeout: float | None = None
    ) -> AsyncIterator[PipelineSession]:
        """Open a session on every worker; end it on every worker whatever happens.

        Args:
            reserve_tokens: KV tokens each worker reserves for it (prompt + max new tokens).
            timeout: deadline in seconds for the session's Forward streams, and for
                waiting in the admission queue.
        """
        session = PipelineSession(self, reserve_tokens, timeout)
        await self._open(session)
        try:
            yield session
        finally:
            await asyncio.shield(session.close())

    async def _open(self, session: PipelineSession) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(self.admission.max_wait_s, session.timeout or 1e9)
        for _ in range(MAX_RECOVERIES + 1):
            try:
                await session.open()
                return
            except KVCapacityExceeded as full:
                await self.admission.wait_for_room(full, deadline)
            except StageFailed as failure:
                await self.replace_stage(failure.index, failure.client)
        await session.open()

    async def replace_stage(self, index: int, failed: WorkerClient) -> None:
        """Give stage `index` a serving worker: the same one if it is back, else a standby.

        Raises:
            WorkerUnavailable: if neither the worker nor any standby can take the slice.
        """
        async with self._replacing:
            stage = self.stages[index]
            if stage.client is not failed:
                return  # another session already replaced it
            candidates = [failed, *self.standbys]
            for client in candidates:
                if await self._load_on(client, stage):
                    self.standbys = [c for c in candidates if c is not client]
                    self.stages[index] = Stage(
                        client, stage.layers, stage.kv_budget_tokens, stage.session_ttl_s
                    )
                    if client is not failed:
                        log.warning(
                            "stage %s moved from %s to standby %s",
                            stage.layers,
                            failed.name,
                            client.name,
                        )
                    return
            raise WorkerUnavailable(
                f"worker {failed.name} holding layers {stage.layers} is down and "
                f"no standby could take its place ({len(self.standbys)} standbys)"
            )

    async def _load_on(self, client: WorkerClient, stage: Stage) -> bool:
        r = stage.layers
        try:
            info = await client.info(timeout=2.0)
            if (info.model, info.layer_start, info.layer_end) != (
                self.model_ref,
                r.start,
                r.end,
            ):
                await client.load_layers(
                    self.model_ref,
                    r.start,
                    r.end,
                    stage.kv_budget_tokens,
                    stage.session_ttl_s,
                )
            return True
        except ClusterError as exc:
            log.info("worker %s cannot take layers %s: %s", client.name, r, exc)
            return False
