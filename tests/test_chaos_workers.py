"""Chaos: frozen workers, workers killed and restarted, a coordinator killed; each in bounded time.

Workers are subprocesses (tests/test_failover.py's helpers). A frozen worker is one
stopped with SIGSTOP: its sockets stay open and silent, like a hung machine or a
link that drops packets. Each test states the bound it checks, from the cluster's
`liveness` settings (scaled down here so that each test takes seconds).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import httpx
import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

from mlx_cluster.contract.config import LimitsConfig, LivenessConfig
from mlx_cluster.contract.errors import WorkerUnavailable
from mlx_cluster.contract.rpc import SESSION_DEADLINE_S
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.coordinator.api.app import create_app
from mlx_cluster.coordinator.api.server import HttpServer
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.coordinator.engine.startup import start_from_config
from tests import test_failover
from tests.test_failover import PROMPTS, sessions_left, spec

# The subprocess workers and clusters of test_failover, stopped and closed at teardown.
worker_processes = test_failover.worker_processes
start_cluster = test_failover.start_cluster

# Pings every second, a link dropped after a ping unanswered for a second, a decode
# step on one worker bounded by 3 s: a frozen worker is lost within about 2 s.
LIVENESS = LivenessConfig(
    ping_interval_s=1, ping_timeout_s=1, decode_hop_timeout_s=3, probe_timeout_s=1
)
# A request in flight on a frozen worker hears an error within this (no standby): the
# link's loss, or the hop's deadline, then a probe of the failed worker, then its ends.
IN_FLIGHT_BOUND_S = LIVENESS.decode_hop_timeout_s + LIVENESS.probe_timeout_s + 1.5
# A new request's OpenSession on a frozen worker fails at its deadline, then the probe.
NEW_REQUEST_BOUND_S = SESSION_DEADLINE_S + LIVENESS.probe_timeout_s + 1.5
LEASE_FREE_BOUND_S = 6.0  # the workers' --lease-grace-s (2 s) and slack
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


async def tokens(cluster: Cluster, prompt: Sequence[int], params: SamplingParams = PARAMS):
    return [c.token async for c in cluster.generate(prompt, params) if c.token is not None]


async def drained(addresses: Sequence[str], within_s: float) -> float:
    """Seconds until every worker holds no session and no KV token (fails past `within_s`)."""
    started = time.monotonic()
    while (left := await sessions_left(addresses)) != [(0, 0)] * len(addresses):
        assert time.monotonic() - started < within_s, f"still held after {within_s} s: {left}"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


# --- a worker frozen mid-stream -------------------------------------------------------------


@pytest.mark.slow
async def test_a_frozen_worker_fails_its_requests_in_bounded_time_then_serves_again(
    tiny_llama, worker_processes, start_cluster
):
    (_, a0), (w1, a1) = worker_processes("w0", "w1")
    limits = LimitsConfig(default_max_tokens=8)
    cluster = await start_cluster(
        spec(tiny_llama, [("w0", a0), ("w1", a1)], limits=limits, liveness=LIVENESS)
    )
    want = await tokens(cluster, PROMPTS[0])
    server = HttpServer(create_app(cluster, limits), "127.0.0.1", 0)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:

            async def in_flight() -> tuple[float, dict]:
                body = {"prompt": "the river", "max_tokens": 4000, "stream": True}
                events: list[str] = []
                async with http.stream("POST", "/generate", json=body) as stream:
                    async for line in stream.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        events.append(line[6:])
                        if len(events) == 3:
                            os.kill(w1.pid, signal.SIGSTOP)
                            frozen.set()
                            stopped = time.monotonic()
                assert events[-1] == "[DONE]"
                return time.monotonic() - stopped, json.loads(events[-2])["error"]

            async def new_request() -> tuple[float, httpx.Response]:
                await frozen.wait()
                started = time.monotonic()
                reply = await http.post("/generate", json={"prompt": "x", "max_tokens": 4})
                return time.monotonic() - started, reply

            frozen = asyncio.Event()
            try:
                (heard_s, error), (refused_s, reply) = await asyncio.gather(
                    in_flight(), new_request()
                )
            finally:
                os.kill(w1.pid, signal.SIGCONT)
        print(f"frozen worker: in flight heard in {heard_s:.1f} s, new request {refused_s:.1f} s")
        assert heard_s < IN_FLIGHT_BOUND_S, heard_s
        assert error["code"] == "worker_unavailable" and "w1" in error["message"], error
        assert reply.status_code == 503, reply.text
        assert refused_s < NEW_REQUEST_BOUND_S, refused_s
        # Thawed: nothing of the failed requests is left, and the cluster serves again.
        await drained([a0, a1], within_s=LEASE_FREE_BOUND_S)
        assert await tokens(cluster, PROMPTS[0]) == want
        await drained([a0, a1], within_s=1.0)
    finally:
        await server.stop()


# --- a worker killed and restarted on its port while requests arrive -------------------------


@pytest.mark.slow
async def test_requests_wait_for_a_restarted_worker_and_succeed(
    tiny_llama, worker_processes, start_cluster
):
    (_, a0), (w1, a1) = worker_processes("w0", "w1")
    cluster = await start_cluster(spec(tiny_llama, [("w0", a0), ("w1", a1)], liveness=LIVENESS))
    cluster.stage_manager.supervise(every_s=0.2)
    long = SamplingParams(max_tokens=48, ignore_eos=True)
    want = await asyncio.gather(tokens(cluster, PROMPTS[0], long), tokens(cluster, PROMPTS[1]))
    reached = asyncio.Event()

    async def decoding() -> list[int]:
        got = []
        async for chunk in cluster.generate(PROMPTS[0], long):
            if chunk.token is not None:
                got.append(chunk.token)
            if len(got) == 3:
                reached.set()
        return got

    async def arriving(delay_s: float) -> tuple[float, list[int]]:
        await asyncio.sleep(delay_s)
        started = time.monotonic()
        got = await tokens(cluster, PROMPTS[1])
        return time.monotonic() - started, got

    running = asyncio.create_task(decoding())
    async with asyncio.timeout(10):
        await reached.wait()
    w1.kill()
    w1.wait(timeout=10)
    killed = time.monotonic()
    arrivals = [asyncio.create_task(arriving(d)) for d in (0.0, 0.3, 0.8)]
    await asyncio.to_thread(worker_processes, "w1", listen=a1)  # blocks until it listens
    restarted_s = time.monotonic() - killed
    async with asyncio.timeout(LIVENESS.restart_wait_s + 10):
        results = await asyncio.gather(*arrivals, running)
    *served, recovered = results
    waits = [wait for wait, _ in served]
    print(f"worker restarted after {restarted_s:.1f} s; requests waited {waits}")
    assert recovered == want[0]
    assert [got for _, got in served] == [want[1]] * 3
    assert max(waits) < LIVENESS.restart_wait_s + 2, waits
    await drained([a0, a1], within_s=2.0)


# --- a coordinator killed, another started on the same workers -------------------------------

HOLDER = """
import asyncio, sys
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.contract.sampling import SamplingParams

async def main():
    cluster = await Cluster.start(sys.argv[1], sys.argv[2:])
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    held = [cluster.generate([5, 6, 7, i], params) for i in range(3)]
    for stream in held:
        await anext(stream)  # its session stays open on every worker
    for stage in cluster.stages:  # sessions that no Forward stream ever carried: only
        for i in range(2):  # the coordinator's lease ties them to it
            await stage.client.open_session(f"leased-{i}")
    print("holding", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.slow
async def test_a_killed_coordinators_sessions_are_freed_and_a_new_one_serves_at_once(
    tiny_llama, worker_processes, start_cluster
):
    (_, a0), (_, a1) = worker_processes("w0", "w1")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tiny_llama), a0, a1], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.to_thread(holder.stdout.readline)
        assert line.strip() == b"holding", f"the coordinator exited with {holder.poll()}"
        held = await sessions_left([a0, a1])
        assert [sessions for sessions, _ in held] == [5, 5], held
    finally:
        holder.kill()
        holder.wait(timeout=10)
    freed_s = await drained([a0, a1], within_s=LEASE_FREE_BOUND_S)
    started = time.monotonic()
    cluster = await start_cluster(spec(tiny_llama, [("w0", a0), ("w1", a1)]))
    got = await tokens(cluster, PROMPTS[0])
    served_s = time.monotonic() - started
    print(
        f"killed coordinator: sessions freed in {freed_s:.1f} s, new one served in {served_s:.1f} s"
    )
    model, _ = load_model(tiny_llama)
    steps = generate_step(mx.array(PROMPTS[0]), model, max_tokens=PARAMS.max_tokens)
    assert got == [t for t, _ in steps]
    assert served_s < 10, served_s
    await drained([a0, a1], within_s=1.0)


# --- a step that stalls on a worker that still answers pings and Info ------------------------


@pytest.fixture
def stall(start_workers, monkeypatch):
    """`stall(client)`: that in-process worker's decode steps (or, `stall(client, prompt=True)`,
    its prompt chunks) block (its compute thread hangs) until the returned event is set, or
    the test ends; Info and keepalive pings are answered all along."""
    releases: list[threading.Event] = []

    def arm(client, prompt: bool = False) -> threading.Event:
        """Stall decode steps (one token a row), or with `prompt` the prompt chunks."""
        released = threading.Event()
        releases.append(released)
        runtime = start_workers.servers[client.address].servicer.runtime
        for name in ("forward", "forward_sample"):  # a step that ends here, or that samples
            monkeypatch.setattr(runtime, name, stalling(getattr(runtime, name), prompt, released))
        return released

    def stalling(step, prompt: bool, released: threading.Event):
        def stalled_step(session_ids, hidden, *args, **kwargs):
            token_ids = kwargs.get("token_ids", args[-1] if args else None)
            length = (hidden if hidden is not None else token_ids).shape[1]
            if (length > 1) == prompt:
                released.wait(30)
            return step(session_ids, hidden, *args, **kwargs)

        return stalled_step

    yield arm
    for released in releases:
        released.set()


async def test_a_stalled_decode_step_fails_its_stage_within_the_hop_deadline(
    tiny_llama, start_workers, stall
):
    w0, w1, spare = await start_workers(3)
    liveness = LivenessConfig(decode_hop_timeout_s=1.0, end_wait_s=0.5)
    workers = [("w0", w0.address), ("w1", w1.address)]

    alone = await start_from_config(spec(tiny_llama, workers, liveness=liveness))
    want = await tokens(alone, PROMPTS[0])
    released = stall(w1)
    started = time.monotonic()
    with pytest.raises(WorkerUnavailable, match="did not answer a 1-token step within 1 s"):
        await tokens(alone, PROMPTS[0])
    heard_s = time.monotonic() - started
    await alone.close()
    released.set()  # its compute thread is free again, for the next cluster to load it
    # No probe and no wait for a worker that stalled: the hop's deadline, then the ends.
    assert heard_s < liveness.decode_hop_timeout_s + liveness.end_wait_s + 1.0, heard_s

    standby = [("spare", spare.address)]
    failover = await start_from_config(spec(tiny_llama, workers, standby, liveness=liveness))
    stall(w1)
    try:
        started = time.monotonic()
        assert await tokens(failover, PROMPTS[0]) == want  # finished on the standby
        assert time.monotonic() - started < liveness.decode_hop_timeout_s + 2.0
        assert [s.client.name for s in failover.stages] == ["w0", "spare"]
    finally:
        await failover.close()


async def test_a_stalled_prompt_chunk_fails_its_stage_within_the_prefill_deadline(
    tiny_llama, start_workers, stall
):
    w0, w1 = await start_workers(2)
    liveness = LivenessConfig(prefill_hop_timeout_s=1.0, end_wait_s=0.5)
    workers = [("w0", w0.address), ("w1", w1.address)]
    cluster = await start_from_config(spec(tiny_llama, workers, liveness=liveness))
    released = stall(w1, prompt=True)
    try:
        started = time.monotonic()
        with pytest.raises(WorkerUnavailable, match="step within 1 s"):
            await tokens(cluster, PROMPTS[0])  # its 7 first tokens make one prompt chunk
        heard_s = time.monotonic() - started
        assert heard_s < liveness.prefill_hop_timeout_s + liveness.end_wait_s + 1.0, heard_s
    finally:
        released.set()
        await cluster.close()
