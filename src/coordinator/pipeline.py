"""Chain hidden states through the workers, in layer order, for one session at a time.

Topology: a star. The coordinator sends each worker's output to the next
worker itself (coordinator -> w1 -> coordinator -> w2 -> ...). This costs one
extra transfer per hop compared with workers forwarding to each other, but it
keeps workers independent of each other's addresses, lets the coordinator see
and time every hop, and keeps failure handling (a lost worker, a replay on a
standby) in one place. With [1, 1, D] hidden states per decode step the extra
transfer is a few KB on a persistent stream; see benchmarks/ for the measured
cost of a hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import mlx.core as mx

from contract.layers import LayerRange
from coordinator.client import ForwardStream, HopTiming, WorkerClient
from models.slicing import ModelEdges

# (worker name, serialize s, network s, compute s, deserialize s) for one step on one worker.
HopObserver = Callable[[str, float, float, float, float], None]


@dataclass
class Stage:
    """One worker, the layers it holds, and what it was loaded with."""

    client: WorkerClient
    layers: LayerRange
    kv_budget_tokens: int = 0  # 0 = the worker's default
    session_ttl_s: float = 0.0  # 0 = the worker's default


@dataclass
class PipelineSession:
    """One session open on every worker: its streams and how many tokens it has cached."""

    session_id: str
    edges: ModelEdges
    stages: list[Stage]
    streams: list[ForwardStream]
    offset: int = 0
    timings: list[HopTiming] = field(default_factory=list)  # per stage, summed over steps
    hop_observer: HopObserver | None = None

    async def forward(self, tokens: mx.array) -> mx.array:
        """Run token ids [L] through every stage; returns hidden states [1, 1, D] of the last.

        Each worker appends these L tokens to its cache for this session.
        """
        hidden = self.edges.embed(tokens[None])
        last = len(self.streams) - 1
        for i, stream in enumerate(self.streams):
            hidden, timing = await stream.step(
                [self.session_id], hidden, [self.offset], last_position_only=(i == last)
            )
            self.timings[i].add(timing)
            if self.hop_observer is not None:
                name = self.stages[i].client.name
                self.hop_observer(
                    name, timing.encode, timing.network, timing.compute, timing.decode
                )
        self.offset += tokens.shape[0]
        return hidden

    async def logits(self, tokens: mx.array) -> mx.array:
        """Run token ids [L] through the model; returns the last position's logits [1, vocab]."""
        hidden = await self.forward(tokens)
        return self.edges.head(hidden)[:, -1, :]


class Pipeline:
    """The workers, in layer order, plus the coordinator's embedding and head."""

    def __init__(self, edges: ModelEdges, stages: list[Stage]) -> None:
        self.edges = edges
        self.stages = stages
        self.hop_observer: HopObserver | None = None  # called once per step per worker

    @contextlib.asynccontextmanager
    async def session(
        self, reserve_tokens: int = 0, timeout: float | None = None
    ) -> AsyncIterator[PipelineSession]:
        """Open a session on every worker; end it on every worker whatever happens.

        Args:
            reserve_tokens: KV tokens each worker reserves for it (prompt + max new tokens).
            timeout: deadline in seconds for the session's Forward streams.
        """
        session_id = uuid.uuid4().hex
        opened: list[Stage] = []
        streams: list[ForwardStream] = []
        try:
            results = await asyncio.gather(
                *(s.client.open_session(session_id, reserve_tokens) for s in self.stages),
                return_exceptions=True,
            )
            opened = [s for s, r in zip(self.stages, results, strict=True) if r is None]
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            streams = [s.client.open_stream(timeout) for s in self.stages]
            yield PipelineSession(
                session_id,
                self.edges,
                self.stages,
                streams,
                timings=[HopTiming() for _ in self.stages],
                hop_observer=self.hop_observer,
            )
        finally:
            await asyncio.shield(self._close(session_id, opened, streams))

    @staticmethod
    async def _close(session_id: str, opened: list[Stage], streams: list[ForwardStream]) -> None:
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
        await asyncio.gather(
            *(s.client.end_sessions([session_id]) for s in opened), return_exceptions=True
        )
