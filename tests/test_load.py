"""Many concurrent streams: each completes or is refused with 429, none is lost or hangs.

The smaller sibling of `python -m benchmarks.load_test`, with in-process workers
and the tiny model; it reuses the benchmark's request, classification and
worker checks. The cluster starts from its configuration, as `mlx-cluster
coordinator` starts it, with the admission queue set here: each worker's KV
budget holds ROOM requests, QUEUE more may wait for room, the rest get 429.
"""

from __future__ import annotations

import asyncio

import httpx

from benchmarks.load_test import chat_body, fire, reserve_tokens, tally, wait_until_idle
from mlx_cluster.contract.config import ClusterConfig, KVConfig, LimitsConfig, WorkerEntry
from mlx_cluster.coordinator.api.app import create_app
from mlx_cluster.coordinator.api.server import HttpServer
from mlx_cluster.coordinator.engine.startup import start_from_config

REQUESTS = 64
MAX_TOKENS = 8
ROOM = 20  # requests each worker's KV budget holds at once
QUEUE = 8  # requests that may wait for KV room; ROOM + QUEUE < REQUESTS
QUEUE_TIMEOUT_S = 30.0  # far longer than a request takes: those that wait get room


def overloaded_config(model, addresses: list[str], reserve: int) -> ClusterConfig:
    """Workers whose KV budget is ROOM requests of `reserve` tokens, and the queue above."""
    return ClusterConfig(
        model=str(model),
        workers=[WorkerEntry(address=a) for a in addresses],
        kv=KVConfig(budget_tokens=ROOM * reserve, max_session_tokens=ROOM * reserve),
        limits=LimitsConfig(
            max_tokens_ceiling=MAX_TOKENS,
            default_max_tokens=MAX_TOKENS,
            queue_length=QUEUE,
            queue_timeout_s=QUEUE_TIMEOUT_S,
        ),
    )


async def test_requests_beyond_the_kv_room_wait_in_the_queue_or_get_429_and_leave_nothing(
    start_workers, tiny_llama
):
    reserve = reserve_tokens(tiny_llama, MAX_TOKENS, REQUESTS)
    clients = await start_workers(2)
    config = overloaded_config(tiny_llama, [c.address for c in clients], reserve)
    cluster = await start_from_config(config)
    server = HttpServer(create_app(cluster, config.limits), "127.0.0.1", 0)
    await server.start()
    try:
        for client in clients:  # the premise: room for exactly ROOM requests
            assert (await client.info()).kv_capacity_tokens == ROOM * reserve

        async with asyncio.timeout(120):  # a hang fails here, not at pytest's global timeout
            outcomes = await fire(
                server.url, REQUESTS, lambda i: chat_body(i, MAX_TOKENS), timeout=60
            )

        counts = tally(outcomes, REQUESTS)
        assert len(outcomes) == REQUESTS
        assert counts.all_accounted, counts  # completed, or 429 with Retry-After; no error kind
        assert set(counts.finish_reasons) <= {"stop", "length"}, counts
        # More than the budget holds completed (the queue let some wait for room),
        # and more than it holds plus the queue arrived at once (some got 429).
        assert counts.completed > ROOM and counts.refused >= 1, counts

        for state in await wait_until_idle(clients):
            assert (state.sessions_open, state.kv_used_tokens) == (0, 0), state

        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            body = {**chat_body(0, MAX_TOKENS), "stream": False}
            reply = await http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] in {"stop", "length"}
    finally:
        await server.stop()
        await cluster.close()
