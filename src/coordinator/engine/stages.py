"""The stages: which worker serves which layers, kept serving.

`StageManager` owns membership. It loads each stage's slice, hands a failed
stage to its restarted worker or a standby (`replace`), reloads slices that
workers lost (the supervisor loop) and answers health, all with the one rule
of `health.serves`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from mlx_cluster.contract.config import LivenessConfig
from mlx_cluster.contract.errors import ClusterError, WorkerUnavailable
from mlx_cluster.contract.layers import LayerRange
from mlx_cluster.contract.worker_info import LoadedSlice, WorkerInfo
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.health import (
    INFO_TIMEOUT_S,
    ClusterHealth,
    StageHealth,
    Standby,
    cluster_status,
    serves,
)
from mlx_cluster.coordinator.engine.weights import WeightSender

log = logging.getLogger(__name__)

SUPERVISE_EVERY_S = 2.0
RELOAD_WARN_AFTER = 3  # failed reloads of one stage in a row before each is a WARNING


@dataclass(frozen=True)
class Stage:
    """One worker, the layers it holds, and what it is loaded with."""

    client: WorkerClient
    layers: LayerRange
    kv_budget_tokens: int = 0  # 0 = the worker's default
    session_ttl_s: float = 0.0  # 0 = the worker's default


class StageManager:
    """The stages in chain order, the standbys, and the supervisor that keeps them serving."""

    def __init__(
        self,
        model_ref: str,
        stages: list[Stage],
        standbys: list[WorkerClient] | None = None,
        liveness: LivenessConfig | None = None,
        draft_model: str = "",
        prefix_cache_bytes: int = 0,
        weights: WeightSender | None = None,
    ) -> None:
        """With `weights`, each worker is sent its slice's files before it loads them (and
        `model_ref` is the key they are kept under)."""
        self.model_ref = model_ref  # what workers are told to load
        self.weights = weights
        self.draft_model = draft_model  # the first stage's, for speculative decoding
        self.prefix_cache_bytes = prefix_cache_bytes  # each worker's, for ended sessions
        self.stages = stages
        self.standbys = list(standbys or [])
        self.liveness = liveness or LivenessConfig()
        self.reloads = 0  # slices the supervisor re-sent since start
        self._failed_reloads = [0] * len(stages)
        self._replacing = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self.stages)

    def clients(self) -> list[WorkerClient]:
        return [s.client for s in self.stages] + self.standbys

    # --- loading -------------------------------------------------------------------------

    async def load_all(self, on_loaded: Callable[[Stage, WorkerInfo], None] | None = None) -> None:
        """Give every stage's worker its slice; check that each chains onto the one before.

        `on_loaded` is called as each worker has loaded its slice (for progress bars)."""

        async def load(stage: Stage) -> WorkerInfo:
            info = await self._load(stage)
            if on_loaded is not None:
                on_loaded(stage, info)
            return info

        infos = await asyncio.gather(*(load(stage) for stage in self.stages))
        first = infos[0]
        for stage, info in zip(self.stages, infos, strict=True):
            if (info.hidden_size, info.dtype) != (first.hidden_size, first.dtype):
                raise ClusterError(
                    f"worker {stage.client.name} loaded hidden size {info.hidden_size} "
                    f"{info.dtype}, the first stage's embedding gives {first.hidden_size} "
                    f"{first.dtype}"
                )

    async def _load(self, stage: Stage) -> WorkerInfo:
        loaded = await self._send_slice(stage.client, stage)
        info = loaded.info
        parts = [p for p, held in (("embedding", info.embedding), ("head", info.head)) if held]
        log.info(
            "worker %s at %s holds layers %s%s (%.1f MB)",
            stage.client.name,
            stage.client.address,
            stage.layers,
            f" and the {' and '.join(parts)}" if parts else "",
            info.weight_bytes / 1e6,
        )
        return info

    def add_standby(self, client: WorkerClient) -> None:
        """A worker that may take over a failed stage (e.g. one discovered later)."""
        self.standbys.append(client)
        log.info("worker %s at %s is a standby", client.name, client.address)

    async def _send_slice(self, client: WorkerClient, stage: Stage) -> LoadedSlice:
        r = stage.layers
        if self.weights is not None:
            await self.weights.send(client, r)
        return await client.load_layers(
            self.model_ref,
            r.start,
            r.end,
            stage.kv_budget_tokens,
            stage.session_ttl_s,
            embedding=r.start == 0,  # the first stage embeds, the last samples
            head=r.end == r.total,
            draft_model=self.draft_model if r.start == 0 else "",
            prefix_cache_bytes=self.prefix_cache_bytes,
        )

    # --- failover ------------------------------------------------------------------------

    async def replace(
        self, index: int, failed: WorkerClient, cause: ClusterError | None = None
    ) -> None:
        """Give stage `index` a serving worker: the same one if it is back, else a standby.

        The failed worker is asked first, briefly (`liveness.probe_timeout_s`), then each
        standby; only then, if the failed worker refused the connection (it may be
        restarting), is it waited for, up to `liveness.restart_wait_s`. A worker that
        does not answer at all (frozen, or its link gone silent) is not waited for, and
        one that failed by `cause` not answering in time (its compute stalled while it
        still answers Info) is not asked again: only standbys may take its stage.

        Raises:
            WorkerUnavailable: neither the worker nor any standby can take the slice.
        """
        async with self._replacing:
            stage = self.stages[index]
            if stage.client is not failed:
                return  # another request already replaced it
            candidates = [failed, *self.standbys]
            stalled = cause is not None and _late(cause)
            refusal = None
            for client in candidates[1:] if stalled else candidates:
                error = await self._takes(client, stage)
                if error is None:
                    return self._hand(index, client, failed, candidates)
                if client is failed:
                    refusal = error
            restarting = refusal is not None and not _late(refusal)
            wait_s = self.liveness.restart_wait_s
            if restarting and wait_s > 0 and await self._takes(failed, stage, wait_s) is None:
                return self._hand(index, failed, failed, candidates)
            raise WorkerUnavailable(
                f"worker {failed.name} holding layers {stage.layers} is down"
                + (f" (not back within {wait_s:g} s)" if restarting else "")
                + (f" ({cause})" if stalled else "")
                + f" and no standby could take its place ({len(self.standbys)} standbys)"
            )

    def _hand(
        self, index: int, client: WorkerClient, failed: WorkerClient, candidates: list[WorkerClient]
    ) -> None:
        """Stage `index` is `client`'s now; the other candidates are the standbys."""
        stage = self.stages[index]
        self.standbys = [c for c in candidates if c is not client]
        self.stages[index] = Stage(
            client, stage.layers, stage.kv_budget_tokens, stage.session_ttl_s
        )
        if client is not failed:
            log.warning(
                "stage %s moved from %s to standby %s", stage.layers, failed.name, client.name
            )

    async def _takes(
        self, client: WorkerClient, stage: Stage, ready_wait_s: float = 0.0
    ) -> ClusterError | None:
        """Load the slice on `client` if it must; None if it serves `stage` now, else why not.

        Asks its Info within `liveness.probe_timeout_s`, or, with `ready_wait_s`, first
        waits that long for it to accept connections and report SERVING.
        """
        try:
            if ready_wait_s > 0:
                info = await client.wait_ready(ready_wait_s)
            else:
                info = await client.info(timeout=self.liveness.probe_timeout_s)
            if not serves(info, self.model_ref, stage.layers):
                await self._send_slice(client, stage)
            return None
        except ClusterError as exc:
            log.info("worker %s cannot take layers %s: %s", client.name, stage.layers, exc)
            return exc

    # --- the supervisor --------------------------------------------------------------------

    def supervise(self, every_s: float = SUPERVISE_EVERY_S) -> None:
        """Check every stage every `every_s` seconds; reload slices that workers lost."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(every_s), name="supervisor")

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None

    async def _supervise(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.check_all()

    async def check_all(self) -> None:
        """Check every stage once; reload the slice of a reachable worker that lost it."""
        await asyncio.gather(*(self._check(i) for i in range(len(self.stages))))

    async def _check(self, index: int) -> None:
        stage = self.stages[index]
        if await self._lost_slice(stage, INFO_TIMEOUT_S) is None:
            return
        async with self._replacing:  # failover may have loaded it meanwhile: ask again
            info = await self._lost_slice(stage, self.liveness.probe_timeout_s)
            if info is None or self.stages[index] is not stage:
                return
            await self._reload(index, info)

    async def _lost_slice(self, stage: Stage, timeout: float) -> WorkerInfo | None:
        """The Info of a reachable worker that does not serve `stage`, else None."""
        try:
            info = await stage.client.info(timeout=timeout)
        except ClusterError as exc:
            log.debug("worker %s not reachable: %s", stage.client.name, exc)
            return None
        return None if serves(info, self.model_ref, stage.layers) else info

    async def _reload(self, index: int, info: WorkerInfo) -> None:
        stage = self.stages[index]
        log.warning(
            "worker %s holds %r [%d, %d), planned %s: loading its slice again",
            stage.client.name,
            info.model,
            info.layer_start,
            info.layer_end,
            stage.layers,
        )
        try:
            await self._send_slice(stage.client, stage)
        except ClusterError as exc:
            self._failed_reloads[index] += 1
            failures = self._failed_reloads[index]
            level = logging.WARNING if failures >= RELOAD_WARN_AFTER else logging.INFO
            log.log(
                level, "reloading %s failed (%d in a row): %s", stage.client.name, failures, exc
            )
            return
        self._failed_reloads[index] = 0
        self.reloads += 1

    # --- health ------------------------------------------------------------------------------

    async def health(self, model_id: str) -> ClusterHealth:
        """Every stage's worker asked now, concurrently, with a short deadline."""
        stages = await asyncio.gather(*(self._stage_health(s) for s in self.stages))
        standbys = [Standby(c.name, c.address) for c in self.standbys]
        transfers = (
            [dataclasses.replace(t) for t in self.weights.transfers.values()]
            if self.weights
            else []
        )
        return ClusterHealth(cluster_status(stages), model_id, stages, standbys, transfers)

    async def _stage_health(self, stage: Stage) -> StageHealth:
        client = stage.client
        started = time.perf_counter()
        try:
            info = await client.info(timeout=INFO_TIMEOUT_S)
        except (ClusterError, TimeoutError) as exc:
            return StageHealth(
                client.name, client.address, stage.layers, "unavailable", error=str(exc)
            )
        return StageHealth(
            client.name,
            client.address,
            stage.layers,
            "ok" if serves(info, self.model_ref, stage.layers) else "not_loaded",
            info,
            round_trip_s=time.perf_counter() - started,
            step_network_s=client.last_step_network_s,
        )

    async def close(self) -> None:
        await self.stop()
        await asyncio.gather(*(c.close() for c in self.clients()), return_exceptions=True)


def _late(error: ClusterError) -> bool:
    """Whether `error` is a worker that did not answer in time (rather than one refusing)."""
    return error.code == grpc.StatusCode.DEADLINE_EXCEEDED
