"""Start and stop a worker's gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from contract.proto import layer_service_pb2_grpc as pb_grpc
from contract.rpc import CHANNEL_OPTIONS, LAYER_SERVICE_NAME
from worker.capabilities import detect
from worker.runtime import WorkerRuntime, WorkerSettings
from worker.servicer import LayerServicer

log = logging.getLogger(__name__)


@dataclass
class RunningWorker:
    server: grpc.aio.Server
    port: int
    servicer: LayerServicer
    health: health.aio.HealthServicer
    _evictor: asyncio.Task[None]

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop taking calls, finish those in flight (up to `grace` s) and the step in progress."""
        self._evictor.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.servicer.close()


async def create_server(
    address: str, settings: WorkerSettings, evict_every_s: float = 10.0
) -> RunningWorker:
    """Build and start a worker on `address` ("host:port"; port 0 picks a free one).

    Raises:
        RuntimeError: if the address cannot be bound.
    """
    health_servicer = health.aio.HealthServicer()
    servicer = LayerServicer(WorkerRuntime(settings, detect()), health_servicer)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    pb_grpc.add_LayerServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await server.start()
    # The process serves once started; LayerService only once it holds layers.
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(LAYER_SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    evictor = asyncio.create_task(servicer.evict_idle_sessions(evict_every_s))
    return RunningWorker(server, port, servicer, health_servicer, evictor)


async def serve(address: str, settings: WorkerSettings) -> None:
    """Run a worker until SIGINT/SIGTERM.

    Prints one JSON line `{"event": "ready", "port": N, ...}` on stdout once it
    accepts calls, so that launchers wait on readiness rather than sleep.
    """
    worker = await create_server(address, settings)
    host = address.rsplit(":", 1)[0]
    log.info("worker %s listening on %s:%d", settings.name, host, worker.port)
    print(
        json.dumps({"event": "ready", "name": settings.name, "address": f"{host}:{worker.port}"}),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("worker %s stopping", settings.name)
    await worker.stop(grace=5.0)
    sys.stdout.flush()
