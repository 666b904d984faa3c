"""Run the coordinator's HTTP API until a signal, and coroutines that Ctrl-C may cancel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine, Sequence
from typing import Any

from mlx_cluster.coordinator.api.app import create_app
from mlx_cluster.coordinator.api.server import HttpServer
from mlx_cluster.coordinator.engine.cluster import Cluster

log = logging.getLogger("mlx_cluster")


def _on_signals(callback: Any) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, callback)


async def serve_http(cluster: Cluster, api_keys: Sequence[str] = ()) -> None:
    """Serve the HTTP API until SIGINT/SIGTERM; requests in flight get the grace period.

    Where and how come from the cluster's spec (`coordinator`, `limits`). With
    `api_keys`, requests need `Authorization: Bearer KEY` (see coordinator.api.auth).
    """
    settings = cluster.config.coordinator
    shutdown_grace_s = settings.shutdown_grace_s
    host, port = settings.http_listen.rsplit(":", 1)
    app = create_app(cluster, cluster.config.limits, settings.cors_origins, api_keys)
    server = HttpServer(app, host, int(port), shutdown_grace_s=shutdown_grace_s)
    await server.start()
    cluster.stage_manager.supervise()
    log.warning("serving %s on %s", cluster.model_id, server.url)
    stop = asyncio.Event()
    _on_signals(stop.set)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait(
        [waiter, asyncio.ensure_future(server.wait())], return_when="FIRST_COMPLETED"
    )
    log.warning("shutting down: requests in flight get %.0f s", shutdown_grace_s)
    await server.stop()


def run_until_signal(main: Coroutine[Any, Any, int]) -> int:
    """Run a coroutine; SIGINT/SIGTERM cancel it so its cleanup runs. Exit code 130 then."""

    async def wrapper() -> int:
        task = asyncio.ensure_future(main)
        _on_signals(task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            return 130

    return asyncio.run(wrapper())
