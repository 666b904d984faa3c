"""The coordinator's client retries a failed EndSession until the worker has ended the ids."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mlx_cluster.contract.errors import WorkerUnavailable
from mlx_cluster.coordinator.engine import client as client_module


def flaky(call, failures: int):
    """`call`, failing with UNAVAILABLE the first `failures` times, as a dropped connection does."""
    left = [failures]

    def maybe_fail(*args, **kwargs):
        if left[0]:
            left[0] -= 1
            empty = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, empty, empty, "reset")
        return call(*args, **kwargs)

    return maybe_fail


async def wait_for_no_sessions(client, within_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while (info := await client.info()).sessions_open:
        assert asyncio.get_running_loop().time() < deadline, f"{info.sessions_open} still open"
        await asyncio.sleep(0.05)


@pytest.fixture
async def client(start_workers, tiny_llama):
    (client,) = await start_workers(1)
    await client.load_layers(str(tiny_llama), 0, 2)
    await client.open_session("a")
    await client.open_session("b")
    return client


async def test_a_failed_end_session_is_retried_in_the_background(client, monkeypatch):
    monkeypatch.setattr(client._stub, "EndSession", flaky(client._stub.EndSession, 2))
    with pytest.raises(WorkerUnavailable):
        await client.end_sessions(["a", "b"])
    await wait_for_no_sessions(client, within_s=5.0)


async def test_the_next_successful_call_retries_at_once(client, monkeypatch):
    monkeypatch.setattr(client_module, "END_RETRY_FIRST_S", 600.0)  # no background retry soon
    monkeypatch.setattr(client._stub, "EndSession", flaky(client._stub.EndSession, 1))
    with pytest.raises(WorkerUnavailable):
        await client.end_sessions(["a"])
    await client.open_session("c")  # a call that succeeds
    await client.end_sessions(["b", "c"])
    await wait_for_no_sessions(client, within_s=3.0)
