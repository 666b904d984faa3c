"""Losing workers: clean errors, recovery by itself, failover by replay, admission queueing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

from mlx_cluster.contract.config import LimitsConfig
from mlx_cluster.coordinator.api.app import create_app
from mlx_cluster.coordinator.api.server import HttpServer
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.coordinator.engine.generation import generate_tokens
from mlx_cluster.coordinator.engine.pipeline import Admission
from mlx_cluster.coordinator.engine.sampling import SamplingParams
from mlx_cluster.models.slicing import load_edges
from tests.conftest import make_pipeline

PROMPT = [11, 52, 7, 99, 23, 64, 5, 180]


def start_worker(name: str, listen: str = "127.0.0.1:0") -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_cluster", "worker", "--listen", listen, "--name", name,
         "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())["address"]


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.mark.slow
async def test_killed_worker_ends_requests_with_503_then_the_cluster_heals(tiny_llama):
    w0, a0 = start_worker("w0")
    w1, a1 = start_worker("w1")
    cluster = await Cluster.start(tiny_llama, [a0, a1])
    cluster.supervisor.start(every_s=0.2)
    server = HttpServer(create_app(cluster, LimitsConfig(default_max_tokens=64)), "127.0.0.1", 0)
    await server.start()
    reborn = None
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            body = {"prompt": "the river", "max_tokens": 4000, "stream": True}
            started = time.monotonic()
            async with http.stream("POST", "/generate", json=body) as stream:
                events = []
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 3:
                            os.kill(w1.pid, signal.SIGKILL)
            assert time.monotonic() - started < 10
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == "worker_unavailable" and "w1" in error["message"]
            health = await http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "degraded"
            assert [w["status"] for w in health.json()["workers"]] == ["ok", "unavailable"]
            reply = await http.post("/generate", json={"prompt": "x", "max_tokens": 4})
            assert reply.status_code == 503
            # The worker comes back, empty, on its old address: the cluster heals by itself.
            reborn, _ = start_worker("w1", a1)
            for _ in range(100):
                health = await http.get("/health")
                if health.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert health.json()["status"] == "ok" and cluster.supervisor.reloads >= 1
            reply = await http.post("/generate", json={"prompt": "x", "max_tokens": 4})
            assert reply.status_code == 200
    finally:
        await server.stop()
        await cluster.close()
        stop(w0, w1, *([reborn] if reborn else []))


@pytest.mark.slow
async def test_failover_to_a_standby_replays_and_gives_the_same_tokens(tiny_llama):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    model, _ = load_model(tiny_llama)
    want = [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=40)]
    procs = [start_worker(name) for name in ("w0", "w1", "spare")]
    (w0, a0), (w1, a1), (spare, a_spare) = procs
    standby = WorkerClient(a_spare)
    cluster = await Cluster.start(tiny_llama, [a0, a1])
    cluster.pipeline.standbys.append(standby)
    try:
        got = []
        async with cluster.pipeline.session() as session:
            async for token, _ in generate_tokens(session, PROMPT, params):
                got.append(token)
                if len(got) == 12:
                    os.kill(w1.pid, signal.SIGKILL)
                    w1.wait(timeout=10)
            assert session.recoveries == 1
        assert got == want
        assert cluster.stages[1].client is standby
        info = await standby.info()
        assert (info.layer_start, info.layer_end, info.sessions_open) == (4, 8, 0)
    finally:
        await cluster.close()
        stop(w0, w1, spare)


async def test_admission_queues_for_kv_room_then_refuses(start_workers, tiny_llama):
    clients = await start_workers(2, kv_budget_tokens=60)
    pipeline = await make_pipeline(tiny_llama, clients, [4, 4])
    params = SamplingParams(max_tokens=30, ignore_eos=True)

    async def run() -> list[int]:
        async with pipeline.session(len(PROMPT) + 30) as session:
            return [t async for t, _ in generate_tokens(session, PROMPT, params)]

    pipeline.admission = Admission(max_waiting=1, max_wait_s=30)
    first, second = await asyncio.gather(run(), run())  # the second waits for the first
    assert first == second
    pipeline.admission = Admission(max_waiting=0)
    results = await asyncio.gather(run(), run(), return_exceptions=True)
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 1 and "38 tokens needed" in str(refused[0])
    for client in clients:
        assert (await client.info()).sessions_open == 0


def test_edges_know_their_model_path(tiny_llama):
    assert load_edges(tiny_llama).path == tiny_llama
