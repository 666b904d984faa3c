"""A bare gRPC echo over the transport the pipeline uses: the floor a hop cannot beat.

The server (`python -m benchmarks.echo`) runs in its own process, as a worker
does, with one bidirectional streaming method that sends every message back,
on TCP loopback or a Unix domain socket as the workers of the same run.
Messages are raw bytes (identity serializers, generic handlers), so no proto
is involved; the client writes a message of a given size on one persistent
stream and times until the same bytes come back, as `ForwardStream.step` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from mlx_cluster.contract.rpc import CHANNEL_OPTIONS, is_unix_address, server_options
from mlx_cluster.local import Transport

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Stream"
READY_TIMEOUT_S = 60.0
REPO_ROOT = Path(__file__).resolve().parents[1]
LARGE_MESSAGE_BYTES = 1 << 20


@dataclass
class EchoResult:
    """Round trips of one message size."""

    message_bytes: int
    iterations: int
    mean_s: float
    median_s: float
    min_s: float


# --- server -------------------------------------------------------------------------


async def _echo(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


async def create_server(address: str) -> tuple[grpc.aio.Server, int]:
    """Start an echo server on `address` (HOST:PORT, port 0 picks one; or unix:PATH).

    Returns:
        The server and its port (meaningless for a Unix socket).
    """
    server = grpc.aio.server(options=server_options())
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Stream": grpc.stream_stream_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


async def serve(address: str) -> None:
    """Serve until killed; print one JSON ready line with the address first."""
    server, port = await create_server(address)
    if not is_unix_address(address):
        address = f"{address.rsplit(':', 1)[0]}:{port}"
    print(json.dumps({"event": "ready", "address": address}), flush=True)
    await server.wait_for_termination()


# --- client -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def echo_server_process(transport: Transport = "tcp") -> AsyncIterator[str]:
    """Start the echo server as a subprocess on loopback or a Unix socket; yields its address."""
    if transport == "tcp":
        async with _echo_process("127.0.0.1:0") as address:
            yield address
        return
    with tempfile.TemporaryDirectory(prefix="mlx-cluster-echo-") as socket_dir:
        async with _echo_process(f"unix:{socket_dir}/echo.sock") as address:
            yield address


@contextlib.asynccontextmanager
async def _echo_process(listen: str) -> AsyncIterator[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.echo",
        "--listen",
        listen,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"echo server exited with code {await process.wait()}")
        yield json.loads(line)["address"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def measure(address: str, sizes: list[int], iterations: int) -> list[EchoResult]:
    """Round trips of a message of each size on one persistent stream, after a warm-up."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = channel.stream_stream(METHOD)()
        results = [
            await _round_trips(call, size, iterations_for(size, iterations)) for size in sizes
        ]
        await call.done_writing()
        return results


async def _round_trips(call: grpc.aio.StreamStreamCall, size: int, iterations: int) -> EchoResult:
    payload = bytes(size)
    warmup = max(iterations // 10, 2)
    times = []
    for _ in range(warmup + iterations):
        started = time.perf_counter()
        await call.write(payload)
        reply = await call.read()
        times.append(time.perf_counter() - started)
        if reply is grpc.aio.EOF or len(reply) != size:
            raise RuntimeError(f"echo of {size} bytes came back as {reply!r:.80}")
    times = times[warmup:]
    return EchoResult(
        size, iterations, statistics.fmean(times), statistics.median(times), min(times)
    )


def iterations_for(size: int, iterations: int) -> int:
    """Fewer round trips for large messages: each one already takes milliseconds."""
    return iterations if size < LARGE_MESSAGE_BYTES else max(iterations // 10, 10)


async def measure_in_subprocess(
    sizes: list[int], iterations: int, transport: Transport = "tcp"
) -> list[EchoResult]:
    """Start an echo server process, measure every size, stop it."""
    async with echo_server_process(transport) as address:
        return await measure(address, sizes, iterations)


def main() -> None:
    parser = argparse.ArgumentParser(description="bare gRPC echo server (bytes, bidi stream)")
    parser.add_argument(
        "--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks one) or unix:PATH"
    )
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
