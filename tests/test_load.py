"""Many concurrent streams: each completes or is refused with 429, none is lost or hangs.

The smaller sibling of `python -m benchmarks.load_test`, with in-process workers
and the tiny model; it reuses the benchmark's request, classification and
worker checks.
"""

from __future__ import annotations

import asyncio

import httpx

from benchmarks.load_test import chat_body, fire, reserve_tokens, tally, wait_until_idle
from mlx_cluster.contract.config import LimitsConfig

REQUESTS = 64
MAX_TOKENS = 8
ROOM = 20  # requests each worker's KV budget holds at once


async def test_concurrent_streams_complete_or_are_refused_and_leave_nothing(
    serve_cluster, tiny_llama
):
    reserve = reserve_tokens(tiny_llama, MAX_TOKENS, REQUESTS)
    limits = LimitsConfig(max_tokens_ceiling=MAX_TOKENS, default_max_tokens=MAX_TOKENS)
    url, cluster = await serve_cluster(settings=limits, kv_budget_tokens=ROOM * reserve)

    async with asyncio.timeout(120):  # a hang fails here, not at pytest's global timeout
        outcomes = await fire(url, REQUESTS, lambda i: chat_body(i, MAX_TOKENS), timeout=60)

    counts = tally(outcomes, REQUESTS)
    assert len(outcomes) == REQUESTS
    assert counts.all_accounted, counts  # completed, or 429 with Retry-After; no error kind
    assert counts.completed >= ROOM and counts.refused >= 1, counts
    assert set(counts.finish_reasons) <= {"stop", "length"}, counts

    for state in await wait_until_idle([stage.client for stage in cluster.stages]):
        assert (state.sessions_open, state.kv_used_tokens) == (0, 0), state

    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        body = {**chat_body(0, MAX_TOKENS), "stream": False}
        reply = await http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in {"stop", "length"}
