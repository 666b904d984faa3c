"""Routes for operators: `/` (what this is), `/health` (every worker), `/metrics`.

`/health` answers 200 only while every stage's worker serves its layers, so a
load balancer can use it as the readiness check.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from mlx_cluster.contract.plan_report import plan_as_dict
from mlx_cluster.coordinator.api.state import State
from mlx_cluster.coordinator.engine.health import ClusterHealth, StageHealth
from mlx_cluster.coordinator.engine.weights import Transfer

router = APIRouter()

ENDPOINTS = {
    "POST /v1/chat/completions": "OpenAI chat completions (streaming with stream=true)",
    "POST /v1/completions": "OpenAI text completions",
    "POST /generate": "prompt in; text, usage and timings out",
    "GET /v1/models": "the served model",
    "GET /health": "status of every worker and its layers",
}


@router.get("/")
async def root(state: State) -> dict[str, Any]:
    return {
        "service": "mlx-cluster",
        "description": "one model served by a pipeline of MLX workers",
        "model": state.cluster.model_id,
        "endpoints": ENDPOINTS,
    }


@router.get("/health")
async def health(state: State) -> JSONResponse:
    cluster = state.cluster
    report = await cluster.health()
    body = health_body(report)
    body["context_tokens"] = cluster.context_length
    body["plan"] = plan_as_dict(cluster.plan)
    return JSONResponse(body, status_code=200 if report.serving else 503)


@router.get("/metrics")
async def prometheus(state: State) -> Response:
    for stage in (await state.cluster.health()).stages:
        state.metrics.set_worker(stage)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# --- the /health body ----------------------------------------------------------------


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
