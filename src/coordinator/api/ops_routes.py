"""Routes for operators: `/` (the dashboard, or what this is as JSON), `/health` (every
worker), `/metrics`.

`/health` answers 200 only while every stage's worker serves its layers, so a
load balancer can use it as the readiness check.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from mlx_cluster.contract.plan_report import plan_as_dict
from mlx_cluster.coordinator.api import dashboard_routes
from mlx_cluster.coordinator.api.health_body import health_body
from mlx_cluster.coordinator.api.state import State

router = APIRouter()

ENDPOINTS = {
    "POST /v1/chat/completions": "OpenAI chat completions (streaming with stream=true)",
    "POST /v1/completions": "OpenAI text completions",
    "POST /generate": "prompt in; text, usage and timings out",
    "GET /v1/models": "the served model",
    "GET /health": "status of every worker and its layers",
    "GET /v1/cluster/events": "a snapshot of the cluster every second (server-sent events)",
}


@router.get("/", response_model=None)
async def root(request: Request, state: State) -> dict[str, Any] | HTMLResponse:
    """The dashboard for browsers (that ask for HTML); what this is, as JSON, for others."""
    if _prefers_html(request.headers.get("accept", "")):
        return dashboard_routes.page()
    return {
        "service": "mlx-cluster",
        "description": "one model served by a pipeline of MLX workers",
        "model": state.cluster.model_id,
        "endpoints": ENDPOINTS,
        "dashboard": "GET / with Accept: text/html",
    }


def _prefers_html(accept: str) -> bool:
    """Whether an Accept header names HTML before JSON (browsers send text/html first)."""
    types = [part.split(";")[0].strip() for part in accept.split(",")]
    if "text/html" not in types:
        return False
    return "application/json" not in types or types.index("text/html") < types.index(
        "application/json"
    )


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
