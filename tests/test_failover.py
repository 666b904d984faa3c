"""Losing workers: clean errors, recovery by itself, failover by replay, admission queueing.

Every scenario takes the default path: the cluster starts from its spec
(`start_from_config`), and requests go through `Cluster.generate` (or the HTTP
API over it) and decode in continuous-batching lanes. A worker that dies is a
subprocess killed with SIGKILL at a point the streams themselves mark: once
each has produced a few tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

import httpx
import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

from mlx_cluster.contract.config import (
    ClusterConfig,
    KVConfig,
    LimitsConfig,
    SpeculativeConfig,
    WorkerEntry,
)
from mlx_cluster.contract.errors import KVCapacityExceeded
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.coordinator.api.app import create_app
from mlx_cluster.coordinator.api.server import HttpServer
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.coordinator.engine.events import Event, StepEvent
from mlx_cluster.coordinator.engine.startup import start_from_config
from mlx_cluster.models.slicing import load_edges

PROMPTS = [
    [11, 52, 7, 99, 23, 64, 5, 180],
    [200, 13, 13, 47, 150],
    [31, 41, 59, 26, 53, 58, 97, 93],
    [5, 6, 7],
]
# Long enough that no lane can finish while the test waits for every stream to reach
# KILL_AFTER (lanes go on decoding while a reader waits: their queues are unbounded).
NEW_TOKENS = 192
KILL_AFTER = 4  # tokens every stream has produced when its worker dies; far from NEW_TOKENS


# --- workers and the cluster's spec -------------------------------------------------------


def spawn(names: Sequence[str], listen: str) -> list[tuple[subprocess.Popen, str]]:
    """Worker subprocesses, started together; each with the address it printed once ready."""
    command = [sys.executable, "-m", "mlx_cluster", "worker", "--log-level", "WARNING"]
    procs = [
        subprocess.Popen([*command, "--listen", listen, "--name", name], stdout=subprocess.PIPE)
        for name in names
    ]
    started = []
    for name, proc in zip(names, procs, strict=True):
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            stop(procs)
            pytest.fail(f"worker {name} exited with code {proc.returncode} before it was ready")
        started.append((proc, json.loads(line)["address"]))
    return started


def stop(procs: Sequence[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def worker_processes() -> Iterator[Callable[..., list[tuple[subprocess.Popen, str]]]]:
    """`spawn(*names, listen=...)` starts worker subprocesses; all are stopped at teardown."""
    spawned: list[subprocess.Popen] = []

    def spawn_more(*names: str, listen: str = "127.0.0.1:0") -> list[tuple[subprocess.Popen, str]]:
        started = spawn(names, listen)
        spawned.extend(proc for proc, _ in started)
        return started

    yield spawn_more
    stop(spawned)


@pytest.fixture
async def start_cluster() -> AsyncIterator[Callable[[ClusterConfig], Awaitable[Cluster]]]:
    """`start(spec)` starts a cluster from its spec; all are closed at teardown."""
    clusters: list[Cluster] = []

    async def start(config: ClusterConfig) -> Cluster:
        clusters.append(await start_from_config(config))
        return clusters[-1]

    yield start
    for cluster in clusters:
        await cluster.close()


def spec(
    model, workers: Sequence[tuple[str, str]], standby: Sequence[tuple[str, str]] = (), **sections
) -> ClusterConfig:
    """The spec of a cluster over `workers` (name, address), in chain order."""
    return ClusterConfig(
        model=str(model),
        workers=[WorkerEntry(name=name, address=address) for name, address in workers],
        standby=[WorkerEntry(name=name, address=address) for name, address in standby],
        **sections,
    )


async def sessions_left(addresses: Sequence[str]) -> list[tuple[int, int]]:
    """(sessions open, KV tokens in use) of each worker."""
    left = []
    for address in addresses:
        client = WorkerClient(address)
        try:
            info = await client.info()
        finally:
            await client.close()
        left.append((info.sessions_open, info.kv_used_tokens))
    return left


class DecodeSteps:
    """The decode steps the cluster's lanes report, split at `mark()`."""

    def __init__(self, cluster: Cluster) -> None:
        self.before: list[StepEvent] = []
        self.after: list[StepEvent] = []
        self._marked = False
        cluster.events.subscribe(self._on)

    def _on(self, event: Event) -> None:
        if isinstance(event, StepEvent):
            (self.after if self._marked else self.before).append(event)

    def mark(self) -> None:
        self._marked = True


# --- a worker lost mid-decode -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "prompt_lookup"])
async def test_a_worker_killed_mid_decode_hands_its_lanes_to_a_standby_and_no_token_changes(
    tiny_llama, worker_processes, start_cluster, method
):
    model, _ = load_model(tiny_llama)
    want = [
        [t for t, _ in generate_step(mx.array(p), model, max_tokens=NEW_TOKENS)] for p in PROMPTS
    ]
    (_, a0), (w1, a1), (_, a_spare) = worker_processes("w0", "w1", "spare")
    drafting = SpeculativeConfig(method=method)  # replay keeps drafted tokens too
    cluster = await start_cluster(
        spec(tiny_llama, [("w0", a0), ("w1", a1)], [("spare", a_spare)], speculative=drafting)
    )
    steps = DecodeSteps(cluster)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    reached = [asyncio.Event() for _ in PROMPTS]
    resume = asyncio.Event()
    drafted = [0] * len(PROMPTS)

    async def run(i: int) -> list[int]:
        """Generate for PROMPTS[i]; at KILL_AFTER tokens, say so and wait for the kill."""
        tokens: list[int] = []
        try:
            async for chunk in cluster.generate(PROMPTS[i], params):
                if chunk.token is not None:
                    tokens.append(chunk.token)
                if chunk.performance is not None:
                    drafted[i] = chunk.performance.draft_tokens
                if len(tokens) == KILL_AFTER and not reached[i].is_set():
                    reached[i].set()
                    await resume.wait()
        finally:
            reached[i].set()  # a request that failed early must not leave the test waiting
        return tokens

    runs = [asyncio.create_task(run(i)) for i in range(len(PROMPTS))]
    async with asyncio.timeout(60):
        await asyncio.gather(*(event.wait() for event in reached))
    finished = [r for r in runs if r.done()]
    for r in finished:
        r.result()  # a request's own error fails the test with its message
    assert not finished, "every request is still generating when the worker dies"

    steps.mark()
    os.kill(w1.pid, signal.SIGKILL)
    w1.wait(timeout=10)
    resume.set()
    async with asyncio.timeout(60):
        got = await asyncio.gather(*runs)

    assert got == want
    assert (sum(drafted) > 0) == (method == "prompt_lookup"), drafted
    # Two lanes (one per stage), two requests each: the last step of each lane
    # before the kill and its first step after it carried both, so both were
    # mid-decode when the worker died and were recovered together.
    assert {e.lane: e.rows for e in steps.before} == {0: 2, 1: 2}, steps.before
    assert {e.lane: e.rows for e in reversed(steps.after)} == {0: 2, 1: 2}, steps.after
    health = await cluster.health()
    assert health.status == "ok", health
    assert [(s.name, s.status) for s in health.stages] == [("w0", "ok"), ("spare", "ok")]
    assert await sessions_left([a0, a_spare]) == [(0, 0), (0, 0)]


# --- a worker lost with no standby: errors, then healing ----------------------------------


@pytest.mark.slow
async def test_killed_worker_ends_requests_with_503_then_the_cluster_heals(
    tiny_llama, worker_processes, start_cluster
):
    (_, a0), (w1, a1) = worker_processes("w0", "w1")
    limits = LimitsConfig(default_max_tokens=64)
    cluster = await start_cluster(spec(tiny_llama, [("w0", a0), ("w1", a1)], limits=limits))
    steps = DecodeSteps(cluster)
    cluster.stage_manager.supervise(every_s=0.2)
    server = HttpServer(create_app(cluster, limits), "127.0.0.1", 0)
    await server.start()
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
            assert steps.before, "the request decoded in a lane"
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == "worker_unavailable" and "w1" in error["message"]
            health = await http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "degraded"
            assert [w["status"] for w in health.json()["workers"]] == ["ok", "unavailable"]
            reply = await http.post("/generate", json={"prompt": "x", "max_tokens": 4})
            assert reply.status_code == 503
            # The worker comes back, empty, on its old address: the supervisor gives
            # it its slice again and the cluster heals by itself.
            worker_processes("w1", listen=a1)
            deadline = time.monotonic() + 10
            while (health := await http.get("/health")).status_code != 200:
                assert time.monotonic() < deadline, f"not healed in 10 s: {health.json()}"
                await asyncio.sleep(0.1)
            assert [w["status"] for w in health.json()["workers"]] == ["ok", "ok"]
            reply = await http.post("/generate", json={"prompt": "x", "max_tokens": 4})
            assert reply.status_code == 200, reply.text
        assert await sessions_left([a0, a1]) == [(0, 0), (0, 0)]
    finally:
        await server.stop()


# --- the admission queue ------------------------------------------------------------------


async def test_admission_queues_for_kv_room_then_refuses(start_workers, tiny_llama):
    """Each worker's KV budget holds one request; a second waits in the queue, or is refused."""
    clients = await start_workers(2)
    addresses = [c.address for c in clients]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    kv = KVConfig(budget_tokens=60, max_session_tokens=60)  # one request needs 8 + 30

    async def run(cluster: Cluster) -> list[int]:
        return [c.token async for c in cluster.generate(PROMPTS[0], params) if c.token is not None]

    async def both(queue_length: int) -> list[list[int] | BaseException]:
        limits = LimitsConfig(queue_length=queue_length, queue_timeout_s=30)
        named = [(f"w{i}", a) for i, a in enumerate(addresses)]
        cluster = await start_from_config(spec(tiny_llama, named, kv=kv, limits=limits))
        try:
            return await asyncio.gather(run(cluster), run(cluster), return_exceptions=True)
        finally:
            await cluster.close()

    first, second = await both(queue_length=1)  # the second waits for the first
    assert isinstance(first, list) and len(first) == 30 and second == first
    assert await sessions_left(addresses) == [(0, 0), (0, 0)]

    results = await both(queue_length=0)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], KVCapacityExceeded), results
    assert "38 tokens needed" in str(refused[0])
    assert await sessions_left(addresses) == [(0, 0), (0, 0)]


def test_edges_know_their_model_path(tiny_llama):
    assert load_edges(tiny_llama).path == tiny_llama
