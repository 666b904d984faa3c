"""The dashboard: its page and assets (shipped in this package, `static/`), and the live
cluster view it follows (`GET /v1/cluster/events`).

The page and its assets are open, like `/`; the event stream needs an API key when
keys are on (the page sends it with fetch, which can set headers where EventSource
cannot). The stream sends one JSON snapshot a second: /health's workers, the model's
depth, and the recent figures (live_figures), until the client goes or the server
shuts down.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from mlx_cluster.coordinator.api.errors import ApiError
from mlx_cluster.coordinator.api.health_body import health_body
from mlx_cluster.coordinator.api.state import ApiState, State

router = APIRouter()

ASSETS_PATH = "/dashboard"  # where the page's script and style are served (open)
EVENTS_PATH = "/v1/cluster/events"
SNAPSHOT_INTERVAL_S = 1.0
ASSET_TYPES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


def _static(name: str) -> bytes:
    return (resources.files("mlx_cluster.coordinator.api") / "static" / name).read_bytes()


def page() -> HTMLResponse:
    """The dashboard's page (what a browser gets at `/`)."""
    return HTMLResponse(_static("index.html"), headers={"Cache-Control": "no-cache"})


@router.get(ASSETS_PATH + "/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSET_TYPES:
        raise ApiError(404, f"no dashboard asset {name!r}", code="not_found")
    return Response(
        _static(name), media_type=ASSET_TYPES[name], headers={"Cache-Control": "no-cache"}
    )


@router.get(EVENTS_PATH, include_in_schema=False)
async def cluster_events(request: Request, state: State) -> StreamingResponse:
    """Server-sent events: a snapshot of the cluster every SNAPSHOT_INTERVAL_S."""

    async def events() -> AsyncIterator[str]:
        while not state.drain.draining and not await request.is_disconnected():
            yield f"data: {json.dumps(await snapshot(state))}\n\n"
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def snapshot(state: ApiState) -> dict[str, Any]:
    """The cluster now: its workers as /health gives them, the model's depth in layers,
    and the recent performance."""
    cluster = state.cluster
    report = await cluster.health()
    body = health_body(report)
    body["total_layers"] = cluster.plan.workers[0].layers.total
    body["context_tokens"] = cluster.context_length
    body["performance"] = state.live.snapshot()
    return body
