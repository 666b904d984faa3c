"""The cluster's health: each worker's Info, asked concurrently with a short deadline."""

from __future__ import annotations

import asyncio
from typing import Any

from mlx_cluster.contract.errors import ClusterError
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.coordinator.engine.pipeline import Stage

INFO_TIMEOUT_S = 2.0


def _worker_entry(stage: Stage, info: pb.InfoResponse | BaseException) -> dict[str, Any]:
    client, planned = stage.client, stage.layers
    entry: dict[str, Any] = {
        "name": client.name,
        "address": client.address,
        "layers": [planned.start, planned.end],
    }
    if isinstance(info, BaseException):
        entry.update(status="unavailable", error=str(info))
        return entry
    serving = (info.layer_start, info.layer_end) == (planned.start, planned.end)
    caps = info.capabilities
    entry.update(
        status="ok" if serving else "not_loaded",
        device={"kind": caps.device_kind, "name": caps.device_name},
        memory={
            "total_bytes": caps.memory_total_bytes,
            "available_bytes": caps.memory_available_bytes,
            "weight_bytes": info.weight_bytes,
        },
        kv_tokens={"used": info.kv_used_tokens, "capacity": info.kv_capacity_tokens},
        sessions_open=info.sessions_open,
        last_round_trip_ms=(
            round(client.last_round_trip_s * 1000, 3) if client.last_round_trip_s else None
        ),
    )
    return entry


async def cluster_health(model: str, stages: list[Stage]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 when every worker serves its layers, 503 otherwise."""

    async def ask(stage: Stage) -> pb.InfoResponse | BaseException:
        try:
            return await stage.client.info(timeout=INFO_TIMEOUT_S)
        except (ClusterError, TimeoutError) as exc:
            return exc

    infos = await asyncio.gather(*(ask(s) for s in stages))
    workers = [_worker_entry(s, i) for s, i in zip(stages, infos, strict=True)]
    serving = sum(w["status"] == "ok" for w in workers)
    status = "ok" if serving == len(workers) else "degraded" if serving else "unavailable"
    body = {"status": status, "model": model, "workers": workers}
    return (200 if status == "ok" else 503), body
