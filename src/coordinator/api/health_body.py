"""The body of `/health` (and of the dashboard's snapshots): the cluster's status and each
stage's worker as it answered its Info just now."""

from __future__ import annotations

from typing import Any

from mlx_cluster.coordinator.engine.health import ClusterHealth, StageHealth
from mlx_cluster.coordinator.engine.weights import Transfer


def health_body(report: ClusterHealth) -> dict[str, Any]:
    """The cluster's status, each stage's worker as it answered, and the standbys."""
    return {
        "status": report.status,
        "model": report.model,
        "workers": [_stage_entry(s) for s in report.stages],
        "standby": [{"name": s.name, "address": s.address} for s in report.standbys],
        "weight_transfers": [_transfer_entry(t) for t in report.transfers],
    }


def _transfer_entry(transfer: Transfer) -> dict[str, Any]:
    """A worker's latest transfer of its slice's files (weights that travel)."""
    return {
        "worker": transfer.worker,
        "address": transfer.address,
        "layers": [transfer.layers.start, transfer.layers.end],
        "total_bytes": transfer.total_bytes,
        "verified_bytes": transfer.verified_bytes,
        "sent_bytes": transfer.sent_bytes,
        "refused_chunks": transfer.refused_chunks,
        "done": transfer.done,
    }


def _stage_entry(stage: StageHealth) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": stage.name,
        "address": stage.address,
        "layers": [stage.layers.start, stage.layers.end],
        "status": stage.status,
    }
    info = stage.info
    if info is None:
        entry["error"] = stage.error
        return entry
    caps = info.capabilities
    entry.update(
        device={"kind": caps.device_kind, "name": caps.device_name},
        memory={
            "total_bytes": caps.memory_total_bytes,
            "available_bytes": caps.memory_available_bytes,
            "weight_bytes": info.weight_bytes,
        },
        kv_tokens={"used": info.kv_used_tokens, "capacity": info.kv_capacity_tokens},
        sessions_open=info.sessions_open,
        prefix_cache={
            "prefixes": info.prefixes,
            "tokens": info.prefix_tokens,
            "bytes": info.prefix_bytes,
            "capacity_bytes": info.prefix_capacity_bytes,
        },
        last_round_trip_ms=_ms(stage.round_trip_s),
        last_step_network_ms=_ms(stage.step_network_s),
    )
    return entry


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
