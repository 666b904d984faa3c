"""A user's streams to the stages: one Forward stream per stage, and a prompt relay
along them all (`Streams`)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.forward_stream import ForwardStream
from mlx_cluster.coordinator.engine.prompt_relay import PromptRelay
from mlx_cluster.coordinator.engine.stages import StageManager


class Streams:
    """One Forward stream to each stage, and a prompt relay along them all, opened lazily,
    reopened when a stage's worker changes or its call has ended (a failed worker's
    stream is never used again).

    Steps on one stream are answered in order, so each user that steps on its own
    (a decode lane) holds its own Streams.
    """

    def __init__(self, stages: StageManager) -> None:
        self._stages = stages
        self._open: dict[int, tuple[WorkerClient, ForwardStream]] = {}
        self._relay: PromptRelay | None = None
        self._closing: set[asyncio.Task[None]] = set()  # streams to replaced workers

    def __getitem__(self, index: int) -> tuple[WorkerClient, ForwardStream]:
        client = self._stages.stages[index].client
        current = self._open.get(index)
        if current is not None and current[0] is client and not current[1].done:
            return current
        if current is not None:  # the old worker's stream: close it in the background
            self._close_later(current[1].close())
        opened = (client, client.open_stream(None))
        self._open[index] = opened
        return opened

    def relay(self, step_timeout_s: float) -> PromptRelay:
        """A prompt relay along every stage, reopened when a stage's worker changes or its
        call has ended; chunks may take `step_timeout_s` per stage."""
        clients = [stage.client for stage in self._stages.stages]
        current = self._relay
        if current is not None and current.clients == clients and not current.done:
            return current
        if current is not None:
            self._close_later(current.close())
        self._relay = PromptRelay(clients, step_timeout_s)
        return self._relay

    def _close_later(self, closing: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(closing)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        streams: list[ForwardStream | PromptRelay] = [s for _, s in self._open.values()]
        if self._relay is not None:
            streams.append(self._relay)
        self._open, self._relay = {}, None
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
