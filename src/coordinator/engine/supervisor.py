"""Keep every worker serving its planned slice.

A worker that restarts comes back empty. The supervisor asks each worker's
Info every few seconds and, when a reachable worker does not hold its planned
layers, loads them again; the cluster returns to `ok` by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mlx_cluster.contract.errors import ClusterError
from mlx_cluster.coordinator.engine.pipeline import Stage

log = logging.getLogger(__name__)


class Supervisor:
    """Re-loads slices on workers that lost them."""

    def __init__(self, model: str, stages: list[Stage]) -> None:
        self.model = model
        self.stages = stages
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0  # slices re-sent since start

    def start(self, every_s: float = 2.0) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(every_s))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.check_all()

    async def check_all(self) -> None:
        """Check every worker once; reload those that lost their slice."""
        await asyncio.gather(*(self._check(s) for s in self.stages))

    async def _check(self, stage: Stage) -> None:
        planned = stage.layers
        try:
            info = await stage.client.info(timeout=2.0)
            if (info.model, info.layer_start, info.layer_end) == (
                self.model,
                planned.start,
                planned.end,
            ):
                return
            log.warning(
                "worker %s holds %r [%d, %d), planned %s: loading its slice again",
                stage.client.name,
                info.model,
                info.layer_start,
                info.layer_end,
                planned,
            )
            await stage.client.load_layers(
                self.model, planned.start, planned.end, stage.kv_budget_tokens, stage.session_ttl_s
            )
            self.reloads += 1
        except ClusterError as exc:
            log.debug("worker %s not reachable: %s", stage.client.name, exc)
