"""Sessions whose Forward call dies, or whose step fails inside the layers, are ended.

A cache whose coordinator is gone, or that a failed step left past its recorded
offset, must not linger: the next step on it gets NOT_FOUND, which the
coordinator answers by replaying the session.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import mlx.core as mx
import pytest

from mlx_cluster import tensor
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.worker import stage as worker_stage

HIDDEN = 64  # the tiny models' hidden size


@pytest.fixture
async def stub(worker_channel, tiny_llama):
    return pb_grpc.LayerServiceStub(await worker_channel(tiny_llama, 0, 2))


def request(session_ids: list[str], offsets: list[int], length: int = 1) -> pb.ForwardRequest:
    hidden = tensor.encode(mx.ones((len(session_ids), length, HIDDEN)))
    return pb.ForwardRequest(session_ids=session_ids, offsets=offsets, hidden=hidden)


async def open_sessions(stub, *session_ids: str) -> None:
    for sid in session_ids:
        await stub.OpenSession(pb.OpenSessionRequest(session_id=sid), timeout=5)


async def sessions_open(stub) -> int:
    return (await stub.Info(pb.InfoRequest(), timeout=5)).sessions_open


async def wait_for_sessions(stub, expected: int, within_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while (count := await sessions_open(stub)) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"{count} sessions open"
        await asyncio.sleep(0.05)


async def test_a_forward_call_cancelled_during_a_step_ends_the_sessions_it_stepped(
    stub, start_workers, monkeypatch
):
    await open_sessions(stub, "a", "b", "idle")
    call = stub.Forward(timeout=10)
    await call.write(request(["a", "b"], [0, 0]))
    await call.read()
    runtime = next(iter(start_workers.servers.values())).servicer.runtime
    forward = runtime.forward

    def slow_forward(*args):
        time.sleep(0.5)  # on the compute thread, while the client cancels
        return forward(*args)

    monkeypatch.setattr(runtime, "forward", slow_forward)
    await call.write(request(["a"], [1]))
    await asyncio.sleep(0.1)
    call.cancel()
    await wait_for_sessions(stub, 1)  # only "idle", never stepped on that call, is left
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await single_step(stub, request(["b"], [1]))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


KILLED_CLIENT = """
import asyncio, sys
import grpc
import mlx.core as mx
from mlx_cluster import tensor
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc

async def main():
    stub = pb_grpc.LayerServiceStub(grpc.aio.insecure_channel(sys.argv[1]))
    call = stub.Forward()
    hidden = tensor.encode(mx.ones((1, 1, 64)))
    await call.write(pb.ForwardRequest(session_ids=["a"], offsets=[0], hidden=hidden))
    await call.read()
    print("stepped", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_forward_call_whose_client_dies_ends_the_sessions_it_stepped(stub, start_workers):
    """Sessions opened without a lease: only the dead Forward call can end them early."""
    await open_sessions(stub, "a", "idle")
    (address,) = start_workers.servers
    client = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, address], stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(client.stdout.readline), 60)
        assert line.strip() == "stepped"
    finally:
        client.kill()
        client.wait(timeout=30)
    await wait_for_sessions(stub, 1)  # "idle" has no lease and lives by its TTL


async def test_a_forward_call_half_closed_by_the_client_keeps_its_sessions(stub):
    await open_sessions(stub, "a")
    await single_step(stub, request(["a"], [0]))
    await asyncio.sleep(0.3)
    assert await sessions_open(stub) == 1
    await single_step(stub, request(["a"], [1]))


async def test_a_step_failing_inside_the_layers_ends_its_sessions(stub, monkeypatch):
    """The layers ran (caches grew) and then failed: the sessions' caches are past their offset."""
    forward_rows = worker_stage.forward_rows

    def fail_after_the_layers(*args, **kwargs):
        forward_rows(*args, **kwargs)
        raise RuntimeError("out of memory in the middle of a step")

    await open_sessions(stub, "a", "bystander")
    await single_step(stub, request(["bystander"], [0]))
    monkeypatch.setattr(worker_stage, "forward_rows", fail_after_the_layers)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await single_step(stub, request(["a"], [0], length=3))
    details = failure.value.details() or ""
    assert "out of memory" in details and "ended" in details, details
    monkeypatch.undo()
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await single_step(stub, request(["a"], [0], length=3))
    assert again.value.code() == grpc.StatusCode.NOT_FOUND
    await single_step(stub, request(["bystander"], [1]))  # other sessions are untouched


async def single_step(stub, forward_request: pb.ForwardRequest) -> pb.ForwardResponse:
    call = stub.Forward(timeout=10)
    await call.write(forward_request)
    reply = await call.read()
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    return reply
