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

from mlx_cluster.contract.auth import TOKEN_ENV, TlsFiles, is_loopback
from mlx_cluster.contract.config import ConfigError
from mlx_cluster.contract.discovery import Advert
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import (
    LAYER_SERVICE_NAME,
    MAX_UNIX_PATH_BYTES,
    PACKAGE_VERSION,
    PROTOCOL_VERSION,
    is_unix_address,
    server_options,
    unix_socket_path,
)
from mlx_cluster.models.weight_store import WeightStore
from mlx_cluster.tensor.shared import Probe
from mlx_cluster.worker.advertise import Advertiser, advertisable
from mlx_cluster.worker.auth import TokenInterceptor
from mlx_cluster.worker.capabilities import detect
from mlx_cluster.worker.relay import Peers
from mlx_cluster.worker.runtime import WorkerRuntime
from mlx_cluster.worker.servicer import LayerServicer
from mlx_cluster.worker.settings import WorkerSettings
from mlx_cluster.worker.weights import WeightServicer

log = logging.getLogger(__name__)


@dataclass
class RunningWorker:
    server: grpc.aio.Server
    port: int  # the TCP port; 0 on a Unix domain socket
    address: str  # what clients dial: "host:port" or "unix:PATH"
    servicer: LayerServicer
    health: health.aio.HealthServicer
    _evictor: asyncio.Task[None]

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop taking calls, finish those in flight (up to `grace` s) and the step in progress."""
        self._evictor.cancel()
        await self.health.enter_graceful_shutdown()
        self.servicer.stop_leases()  # Lease calls never end on their own
        await self.server.stop(grace)
        await self.servicer.close_peers()
        self.servicer.close()


async def create_server(
    address: str,
    settings: WorkerSettings,
    evict_every_s: float = 10.0,
    token: str | None = None,
    tls: TlsFiles | None = None,
) -> RunningWorker:
    """Build and start a worker on `address`.

    Args:
        address: "host:port" (port 0 picks a free one), or "unix:PATH": a Unix domain
            socket, for clients on this host (a stale socket file there is replaced).
        token: the cluster token every call except health checks must carry; None: none.
        tls: the worker's certificate and key; with `tls.ca`, clients need a certificate
            signed by that CA (mutual TLS). None: plaintext.

    Raises:
        RuntimeError: if the address cannot be bound.
        ConfigError: if a TLS file cannot be read, or a Unix socket path is too long.
    """
    _check_unix_path(address)
    # First: making a segment may start Python's resource tracker, a fork best done
    # before gRPC's threads run. Peers on this host open the probe.
    probe = Probe() if settings.shared_memory_min_bytes else None
    credentials = tls.server_credentials() if tls else None
    health_servicer = health.aio.HealthServicer()
    # The next stage of the ring is called with this worker's own token and TLS files.
    peers = Peers(token, tls, settings.max_message_bytes, settings.shared_memory_min_bytes)
    runtime = WorkerRuntime(settings, detect(), probe.name if probe else "")
    servicer = LayerServicer(runtime, health_servicer, peers, probe)
    interceptors = [TokenInterceptor(token)] if token else []
    options = server_options(settings.max_message_bytes)
    server = grpc.aio.server(options=options, interceptors=interceptors)
    pb_grpc.add_LayerServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Files a coordinator sends go beside the model cache (MLX_CLUSTER_HOME).
    pb_grpc.add_WeightServiceServicer_to_server(WeightServicer(WeightStore()), server)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc raises for an address it cannot bind
        raise RuntimeError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    if is_unix_address(address):
        port, bound = 0, address
    else:
        bound = f"{address.rsplit(':', 1)[0]}:{port}"
    _warn_if_open(settings.name, bound, token, tls)
    await server.start()
    # The process serves once started; LayerService only once it holds layers.
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(LAYER_SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    evictor = asyncio.create_task(servicer.evict_idle_sessions(evict_every_s))
    return RunningWorker(server, port, bound, servicer, health_servicer, evictor)


def _check_unix_path(address: str) -> None:
    if not is_unix_address(address):
        return
    size = len(unix_socket_path(address).encode())
    if size > MAX_UNIX_PATH_BYTES:
        raise ConfigError(
            f"cannot listen on {address}: a Unix socket path may have at most "
            f"{MAX_UNIX_PATH_BYTES} bytes, this one has {size}"
        )


def _warn_if_open(name: str, address: str, token: str | None, tls: TlsFiles | None) -> None:
    """Warn loudly when anyone beyond this host may call the worker unchecked.

    A Unix domain socket, like loopback, only takes calls from this host.
    """
    if token or (tls and tls.ca) or is_unix_address(address):
        return
    if is_loopback(address.rsplit(":", 1)[0]):
        return
    log.warning(
        "\n!!! SECURITY: worker %s listens on %s with NO cluster token.\n"
        "!!! Anyone who can reach this port can load models on it, read and write its\n"
        "!!! hidden states and use its memory. Set a token (%s or --token-file FILE)\n"
        "!!! and give the coordinator the same one (auth.token or auth.token_file),\n"
        "!!! or listen on 127.0.0.1 or a Unix socket (unix:PATH) only.",
        name,
        address,
        TOKEN_ENV,
    )


async def serve(
    address: str,
    settings: WorkerSettings,
    token: str | None = None,
    tls: TlsFiles | None = None,
    advertise: bool | None = None,
) -> None:
    """Run a worker until SIGINT/SIGTERM (`token` and `tls` as for create_server).

    With `advertise` (None: unless it listens on loopback or a Unix socket) the worker's
    record goes on the local network for coordinators that discover workers.
    Prints one JSON line `{"event": "ready", "name": ..., "address": ...}` on stdout
    once it accepts calls, so that launchers wait on readiness rather than sleep;
    `address` is the one clients dial ("host:port" with the port picked, or "unix:PATH").
    """
    if advertise and is_unix_address(address):
        raise ConfigError(f"--advertise needs a TCP address to advertise, not {address}")
    worker = await create_server(address, settings, token=token, tls=tls)
    security = ("mutual TLS" if tls.ca else "TLS") if tls else "plaintext"
    log.info(
        "worker %s listening on %s (%s, %s)",
        settings.name,
        worker.address,
        security,
        "cluster token required" if token else "no cluster token",
    )
    advertiser = None
    if advertise or (advertise is None and advertisable(worker.address)):
        advertiser = Advertiser(_advert(worker, token is not None, tls is not None))
        await advertiser.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    # Only now: a launcher may send SIGTERM as soon as it reads this line.
    ready = {"event": "ready", "name": settings.name, "address": worker.address}
    print(json.dumps(ready), flush=True)
    await stop.wait()
    log.info("worker %s stopping", settings.name)
    if advertiser is not None:
        await advertiser.close()
    await worker.stop(grace=5.0)
    sys.stdout.flush()


def _advert(worker: RunningWorker, token_required: bool, tls: bool) -> Advert:
    runtime = worker.servicer.runtime
    capabilities = runtime.capabilities
    return Advert(
        name=runtime.settings.name,
        address=worker.address,
        version=PACKAGE_VERSION,
        protocol=PROTOCOL_VERSION,
        token_required=token_required,
        tls=tls,
        device=f"{capabilities.device_kind} {capabilities.device_name}",
        memory_gb=capabilities.memory_available_bytes / 1e9,
    )
