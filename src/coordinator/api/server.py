"""Run the HTTP API with uvicorn inside the caller's event loop.

The Cluster's gRPC channels live on that loop, so uvicorn must too. Signals
stay with the caller: it decides when to stop (`HttpServer.stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from mlx_cluster.contract.config import CoordinatorConfig
from mlx_cluster.coordinator.api.state import state_of


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the caller handles signals
        yield


# The config's default (coordinator.shutdown_grace_s), for servers made without a config.
SHUTDOWN_GRACE_S: float = CoordinatorConfig.model_fields["shutdown_grace_s"].default


class HttpServer:
    """uvicorn serving `app` on host:port (port 0 picks a free one)."""

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        log_level: str = "warning",
        shutdown_grace_s: float = SHUTDOWN_GRACE_S,
    ) -> None:
        # The app ends its own generations at the grace deadline (see responses.Drain);
        # uvicorn's own limit is the backstop a little later.
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            lifespan="off",
            timeout_graceful_shutdown=int(shutdown_grace_s) + 5,
        )
        self.app = app
        self.shutdown_grace_s = shutdown_grace_s
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None
        self.host = host
        self.port = port

    async def start(self) -> None:
        """Start serving; returns once the socket accepts connections."""
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the start-up error
                raise RuntimeError(f"HTTP server on {self.host}:{self.port} stopped at start-up")
            await asyncio.sleep(0.01)
        sockets = self._server.servers[0].sockets
        self.port = sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def wait(self) -> None:
        assert self._task is not None
        await self._task

    async def stop(self) -> None:
        """Stop accepting; requests in flight get the grace period, then end with an error."""
        state_of(self.app).drain.begin(self.shutdown_grace_s)
        self._server.should_exit = True
        if self._task is not None:
            await self._task
