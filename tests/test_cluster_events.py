"""The dashboard's HTTP side: `/` by content negotiation, its packaged assets, and the
live snapshots of /v1/cluster/events (with API keys on, too)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from mlx_cluster.coordinator.api.app import create_app
from mlx_cluster.coordinator.api.server import HttpServer
from mlx_cluster.coordinator.engine.cluster import Cluster

API_KEY = "sk-dashboard"


async def first_snapshot(http: httpx.AsyncClient, **headers: str) -> dict:
    async with http.stream("GET", "/v1/cluster/events", headers=headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                return json.loads(line[6:])
    raise AssertionError("the stream ended without a snapshot")


async def test_root_is_the_page_for_browsers_and_json_for_clients(serve_cluster):
    url, cluster = await serve_cluster()
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        page = await http.get("/", headers={"Accept": browser})
        described = await http.get("/", headers={"Accept": "application/json"})
        anything = await http.get("/")
        script = await http.get("/dashboard/dashboard.js")
        style = await http.get("/dashboard/dashboard.css")
        missing = await http.get("/dashboard/other.js")
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="/dashboard/dashboard.js"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    for body in (described.json(), anything.json()):
        assert body["model"] == cluster.model_id and "GET /v1/cluster/events" in body["endpoints"]
    for asset in (script, style):  # nothing from a CDN: the page works offline
        assert "http://" not in asset.text and "https://" not in asset.text
    assert script.headers["content-type"].startswith("text/javascript")
    assert "/v1/cluster/events" in script.text
    assert style.headers["content-type"].startswith("text/css")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_a_snapshot_has_the_map_and_the_figures(serve_cluster):
    url, cluster = await serve_cluster()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        # Greedy: a sampled first token may end the answer at once, with no token to count.
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
        assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200
        async with http.stream("GET", "/v1/cluster/events") as stream:
            await anext(stream.aiter_lines())
            metrics = (await http.get("/metrics")).text
        snapshot = await first_snapshot(http)
    # A page's open stream is not a request in flight (the /metrics scrape itself is).
    assert "mlx_cluster_requests_in_flight 1.0" in metrics
    assert snapshot["status"] == "ok" and snapshot["model"] == cluster.model_id
    assert snapshot["total_layers"] == 8
    assert [w["layers"] for w in snapshot["workers"]] == [[0, 4], [4, 8]]
    for worker in snapshot["workers"]:
        assert worker["status"] == "ok" and worker["kv_tokens"]["capacity"] > 0
        assert {"bytes", "capacity_bytes"} <= set(worker["prefix_cache"])
        assert worker["last_round_trip_ms"] is not None and worker["sessions_open"] == 0
    perf = snapshot["performance"]
    assert len(perf["points"]) == 300 // perf["bucket_s"]
    assert sum(p["tokens_per_s"] for p in perf["points"]) * perf["bucket_s"] >= 1
    assert any(p["ttft_ms"] for p in perf["points"])
    split = perf["token_split_ms"]
    assert split is not None and set(split) == {"compute", "hop", "coordinator", "stages"}
    assert split["compute"] > 0
    # Each stage's compute, in chain order, adds up to the step's.
    assert len(split["stages"]) == 2 and all(ms > 0 for ms in split["stages"])
    assert sum(split["stages"]) == pytest.approx(split["compute"], rel=0.01, abs=0.01)


async def test_events_need_a_key_when_keys_are_on_and_the_page_does_not(serve_cluster):
    url, _ = await serve_cluster(api_keys=[API_KEY])
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        refused = await http.get("/v1/cluster/events")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert (await http.get("/", headers={"Accept": "text/html"})).status_code == 200
        assert (await http.get("/dashboard/dashboard.js")).status_code == 200
        snapshot = await first_snapshot(http, Authorization=f"Bearer {API_KEY}")
    assert snapshot["status"] == "ok"


async def test_the_stream_ends_when_the_server_stops(start_workers, tiny_llama):
    clients = await start_workers(2)
    cluster = await Cluster.start(tiny_llama, [c.address for c in clients])
    server = HttpServer(create_app(cluster), "127.0.0.1", 0, shutdown_grace_s=1)
    await server.start()
    try:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=30) as http,
            http.stream("GET", "/v1/cluster/events") as stream,
        ):
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            started = time.perf_counter()
            stopping = asyncio.create_task(server.stop())
            _ = [line async for line in lines]  # the server ends the stream
            await asyncio.wait_for(stopping, 10)
        # Within a snapshot's interval, well before uvicorn's backstop (grace + 5 s).
        assert time.perf_counter() - started < 3
    finally:
        await cluster.close()
