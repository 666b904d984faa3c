"""A coordinator's sessions live as long as its lease: a crashed coordinator's KV is freed.

The coordinator here is a real process that holds sessions on two workers and is
killed with SIGKILL, as a crash would: no EndSession, no clean close.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import pytest

from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import CHANNEL_OPTIONS

BUDGET = 100  # each worker's KV budget, in tokens
GRACE_S = 0.5  # lease grace of the workers here

COORDINATOR = """
import asyncio, sys
import mlx.core as mx
from mlx_cluster.coordinator.engine.client import WorkerClient

async def main():
    for address in sys.argv[1:]:
        client = WorkerClient(address)
        await client.open_session("stepped", 40)
        await client.open_session("idle", 40)
        await client.open_stream().step(["stepped"], mx.ones((1, 2, 64)), [0])
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def wait_until(predicate, within_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def held(client) -> tuple[int, int]:
    info = await client.info()
    return info.sessions_open, info.kv_used_tokens


@pytest.mark.slow
async def test_a_killed_coordinators_sessions_end_on_every_worker(start_workers, tiny_llama):
    workers = await start_workers(2, kv_budget_tokens=BUDGET)
    for client, (start, end) in zip(workers, [(0, 4), (4, 8)], strict=True):
        await client.load_layers(str(tiny_llama), start, end)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    coordinator = subprocess.Popen(
        [sys.executable, "-c", COORDINATOR, *(c.address for c in workers)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert coordinator.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(coordinator.stdout.readline), 60)
        assert line.strip() == "ready"
        assert [await held(c) for c in workers] == [(2, 80), (2, 80)]
    finally:
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(timeout=30)

    async def all_freed() -> bool:
        return [await held(c) for c in workers] == [(0, 0), (0, 0)]

    await wait_until(all_freed, within_s=8.0)
    for client in workers:  # the freed KV takes a session that needs all of it
        await client.open_session("whole-budget", BUDGET)


@pytest.fixture
async def worker(start_workers, tiny_llama):
    (client,) = await start_workers(1, lease_grace_s=GRACE_S, lease_heartbeat_s=0.2)
    await client.load_layers(str(tiny_llama), 0, 2)
    channel = grpc.aio.insecure_channel(client.address, options=CHANNEL_OPTIONS)
    yield client, pb_grpc.LayerServiceStub(channel)
    await channel.close()


async def sessions_open(stub) -> int:
    return (await stub.Info(pb.InfoRequest(), timeout=5)).sessions_open


async def test_the_lease_sends_heartbeats(worker):
    _, stub = worker
    call = stub.Lease(pb.LeaseRequest(lease_id="L"), timeout=5)
    started = asyncio.get_running_loop().time()
    for _ in range(3):
        assert isinstance(await call.read(), pb.LeaseEvent)
    assert asyncio.get_running_loop().time() - started < 2.0
    call.cancel()


async def test_a_lease_that_attaches_again_within_the_grace_keeps_its_sessions(worker):
    _, stub = worker
    await stub.OpenSession(pb.OpenSessionRequest(session_id="s", lease_id="L"), timeout=5)
    first = stub.Lease(pb.LeaseRequest(lease_id="L"))
    await first.read()
    first.cancel()
    second = stub.Lease(pb.LeaseRequest(lease_id="L"))
    await second.read()
    await asyncio.sleep(3 * GRACE_S)
    assert await sessions_open(stub) == 1
    second.cancel()
    await wait_until(lambda: no_sessions(stub), within_s=3.0)


async def test_a_lease_that_never_attaches_ends_its_sessions_after_the_grace(worker):
    _, stub = worker
    await stub.OpenSession(pb.OpenSessionRequest(session_id="s", lease_id="never"), timeout=5)
    await wait_until(lambda: no_sessions(stub), within_s=3.0)


async def test_sessions_without_a_lease_keep_living_by_the_ttl_alone(worker):
    _, stub = worker
    await stub.OpenSession(pb.OpenSessionRequest(session_id="s"), timeout=5)
    await asyncio.sleep(3 * GRACE_S)
    assert await sessions_open(stub) == 1


async def test_closing_the_client_ends_its_sessions_after_the_grace(worker, start_workers):
    client, stub = worker
    await client.open_session("s")  # the client holds its lease from its first session on
    await asyncio.sleep(3 * GRACE_S)
    assert await sessions_open(stub) == 1
    await client.close()
    start_workers.clients.remove(client)
    await wait_until(lambda: no_sessions(stub), within_s=3.0)


async def no_sessions(stub) -> bool:
    return await sessions_open(stub) == 0
