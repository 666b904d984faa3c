"""Keepalive: a Forward step may keep its stream silent far longer than the ping interval.

Clients ping every `keepalive_time_ms`; a server that does not expect those pings
ends the connection with GOAWAY "too_many_pings" after a few of them, which used to
kill Forward streams during long prefill steps on slow CPUs (after a minute or two
with the 30 s interval). Here a real worker (`create_server` on port 0) takes a slow
first step, clients ping every second, the shortest interval gRPC clients keep to,
and the worker stays silent for six of them.

The worker builds its server options for clients pinging as often as gRPC lets them
(MIN_KEEPALIVE_TIME_MS); the tests swap the `server_options` its factory calls for
one built for the clients' interval here, and the control for one with gRPC's
default ping policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import mlx.core as mx
import pytest

from mlx_cluster import tensor
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import client_channel_options, server_options
from mlx_cluster.worker import server as worker_server

KEEPALIVE_MS = 1_000  # the clients' ping interval here (gRPC clients wait at least 1 s anyway)
SILENCE_S = 6.0  # the first step's silence; gRPC's default policy ends a stream after ~4
HIDDEN = 64  # the tiny models' hidden size

ServerOptions = Callable[[int], list[tuple[str, int]]]


def keepalive_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The worker's own options, for clients pinging every KEEPALIVE_MS."""
    return server_options(max_message_bytes, client_keepalive_time_ms=KEEPALIVE_MS)


def grpc_default_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message sizes only: gRPC's default ping policy."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


async def slow_then_quick_step(
    start_workers, model, monkeypatch: pytest.MonkeyPatch, options: ServerOptions
) -> list[int]:
    """A silent step, then a quick one, on one Forward stream to a real worker, from a
    client pinging every second; returns the step ids answered."""
    monkeypatch.setattr(worker_server, "server_options", options)
    (client,) = await start_workers(1)
    await client.load_layers(str(model), 0, 2)
    await client.open_session("s")

    runtime = start_workers.servers[client.address].servicer.runtime
    forward = runtime.forward
    silences = [SILENCE_S]

    def slow_forward(*args: object) -> mx.array:
        time.sleep(silences.pop() if silences else 0.0)  # on the compute thread: nothing is sent
        return forward(*args)

    monkeypatch.setattr(runtime, "forward", slow_forward)

    client_opts = client_channel_options(
        keepalive_time_ms=KEEPALIVE_MS, keepalive_timeout_ms=5 * KEEPALIVE_MS
    )
    async with grpc.aio.insecure_channel(client.address, options=client_opts) as channel:
        call = pb_grpc.LayerServiceStub(channel).Forward(timeout=3 * SILENCE_S)
        answered = []
        for step_id, offset in ((1, 0), (2, 1)):
            hidden = tensor.encode(mx.ones((1, 1, HIDDEN)))
            await call.write(
                pb.ForwardRequest(
                    step_id=step_id, session_ids=["s"], offsets=[offset], hidden=hidden
                )
            )
            answered.append((await call.read()).step_id)
        await call.done_writing()
        return answered


async def test_worker_accepts_client_keepalive_pings_during_a_silent_step(
    start_workers, tiny_llama, monkeypatch
):
    answered = await slow_then_quick_step(start_workers, tiny_llama, monkeypatch, keepalive_options)
    assert answered == [1, 2]


async def test_a_worker_with_grpc_defaults_ends_the_silent_stream(
    start_workers, tiny_llama, monkeypatch
):
    """The control: these clients do ping, and gRPC's default ping policy refuses them."""
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await slow_then_quick_step(start_workers, tiny_llama, monkeypatch, grpc_default_options)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failure.value.details() == "Too many pings"
