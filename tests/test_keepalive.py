"""Keepalive: a Forward step may keep its stream silent far longer than the ping interval.

Clients ping every `keepalive_time_ms`; a server that does not expect those pings
ends the connection with GOAWAY "too_many_pings" after a few of them, which used to
kill Forward streams during long prefill steps on slow CPUs (after a minute or two
with the 30 s interval). Here clients ping every second, the shortest interval gRPC
clients keep to, and the server stays silent for six of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from contract.rpc import client_channel_options, server_options

SERVICE = "test.Slow"
METHOD = f"/{SERVICE}/Stream"
KEEPALIVE_MS = 1_000  # the clients' ping interval here (gRPC clients wait at least 1 s anyway)
SILENCE_S = 6.0  # the first step's silence; gRPC's default policy ends a stream after ~4


async def start_slow_server(options: list[tuple[str, int]]) -> tuple[grpc.aio.Server, int]:
    """A server whose one bidi method answers the first message after SILENCE_S of silence,
    the others at once."""

    async def stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        silence = SILENCE_S
        async for message in requests:
            await asyncio.sleep(silence)  # a long step: nothing is sent meanwhile
            silence = 0.0
            yield message

    server = grpc.aio.server(options=options)
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Stream": grpc.stream_stream_rpc_method_handler(stream)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def slow_then_quick_step(server_opts: list[tuple[str, int]]) -> list[bytes]:
    """A silent step, then a quick one, on one stream from a client pinging every second."""
    server, port = await start_slow_server(server_opts)
    client_opts = client_channel_options(
        keepalive_time_ms=KEEPALIVE_MS, keepalive_timeout_ms=5 * KEEPALIVE_MS
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=client_opts) as channel:
            call = channel.stream_stream(METHOD)(timeout=3 * SILENCE_S)
            replies = []
            for message in (b"slow step", b"quick step"):
                await call.write(message)
                replies.append(await call.read())
            await call.done_writing()
            return replies
    finally:
        await server.stop(None)


async def test_server_accepts_client_keepalive_pings_during_a_silent_step():
    options = server_options(client_keepalive_time_ms=KEEPALIVE_MS)
    assert await slow_then_quick_step(options) == [b"slow step", b"quick step"]


async def test_a_server_with_grpc_defaults_ends_the_silent_stream():
    """The control: these clients do ping, and gRPC's default ping policy refuses them."""
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await slow_then_quick_step([])
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failure.value.details() == "Too many pings"
