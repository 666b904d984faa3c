"""Shared fixtures: tiny random models on disk, and real workers on port 0."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from mlx_lm.utils import load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub

from mlx_cluster.contract.config import BatchingConfig
from mlx_cluster.contract.layers import split_by_counts
from mlx_cluster.contract.rpc import CHANNEL_OPTIONS
from mlx_cluster.coordinator.engine.chain import Chain
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.core import Engine
from mlx_cluster.coordinator.engine.prefixes import PrefixIndex
from mlx_cluster.coordinator.engine.stages import Stage, StageManager
from mlx_cluster.coordinator.engine.startup import vocab_size
from mlx_cluster.models.random_model import build_random_model
from mlx_cluster.worker.runtime import WorkerSettings
from mlx_cluster.worker.server import RunningWorker, create_server

TINY_LAYERS = 8


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build (once per argument set) a tiny random model directory."""
    built: dict[tuple, Path] = {}

    def make(model_type: str = "llama", **kwargs: object) -> Path:
        key = (model_type, repr(sorted(kwargs.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"model-{model_type}")
            kwargs.setdefault("num_layers", TINY_LAYERS)
            built[key] = build_random_model(out, model_type, **kwargs)  # type: ignore[arg-type]
        return built[key]

    return make


@pytest.fixture
def tiny_llama(model_factory: Callable[..., Path]) -> Path:
    return model_factory("llama")


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama trained to answer tests/trained_models.py's weather question with a
    tool call (Hermes-style `<tool_call>` JSON; mlx-lm reads it with json_tools)."""
    from tests.trained_models import build_tool_model

    path, _ = build_tool_model(tmp_path_factory.mktemp("tool-model"))
    return path


@pytest.fixture(scope="session")
def thinking_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama trained to answer a greeting with a `<think>` block, then an answer
    (or the answer alone when the template turns thinking off)."""
    from tests.trained_models import build_thinking_model

    path, _ = build_thinking_model(tmp_path_factory.mktemp("thinking-model"))
    return path


class WorkerPool:
    """In-process gRPC workers on port 0; `await pool(n)` starts n and returns clients."""

    def __init__(self) -> None:
        self.servers: dict[str, RunningWorker] = {}  # by address
        self.clients: list[WorkerClient] = []

    async def __call__(self, count: int, **settings: object) -> list[WorkerClient]:
        new = []
        for _ in range(count):
            name = f"worker-{len(self.servers)}"
            worker = await create_server("127.0.0.1:0", WorkerSettings(name=name, **settings))  # type: ignore[arg-type]
            client = WorkerClient(f"127.0.0.1:{worker.port}")
            self.servers[client.address] = worker
            self.clients.append(client)
            new.append(client)
        return new

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for worker in self.servers.values():
            await worker.stop(grace=None)


@pytest.fixture
async def start_workers() -> AsyncIterator[WorkerPool]:
    """A WorkerPool whose workers are all stopped at teardown."""
    pool = WorkerPool()
    yield pool
    await pool.close()


@pytest.fixture
async def worker_channel(
    start_workers,
) -> AsyncIterator[Callable[..., Awaitable[grpc.aio.Channel]]]:
    """`await worker_channel(model, start, end)`: a raw gRPC channel to a new in-process
    worker holding layers [start, end) of `model` (for calls below the client)."""
    channels: list[grpc.aio.Channel] = []

    async def make(model: Path, start: int, end: int) -> grpc.aio.Channel:
        (client,) = await start_workers(1)
        await client.load_layers(str(model), start, end)
        channels.append(grpc.aio.insecure_channel(client.address, options=CHANNEL_OPTIONS))
        return channels[-1]

    yield make
    for channel in channels:
        await channel.close()


async def make_engine(
    model: Path,
    clients: Sequence[WorkerClient],
    counts: Sequence[int],
    draft_model: Path | None = None,
    prefix_cache_bytes: int = 0,
    **batching: Any,
) -> Engine:
    """Load `counts` layers on each client, in order (the first with `draft_model`, if
    given); the Engine over them, keeping ended sessions as prefixes in up to
    `prefix_cache_bytes` on each worker (0: none).

    `batching` are BatchingConfig fields (e.g. prefill_chunk=16, micro_batches=1).
    """
    config = load_config(model)
    ranges = split_by_counts(list(counts), config["num_hidden_layers"])
    stages = StageManager(
        str(model),
        [Stage(c, r) for c, r in zip(clients, ranges, strict=True)],
        draft_model=str(draft_model or ""),
        prefix_cache_bytes=prefix_cache_bytes,
    )
    await stages.load_all()
    prefixes = PrefixIndex() if prefix_cache_bytes else None
    chain = Chain(vocab_size(config), stages, prefixes=prefixes)
    return Engine(chain, BatchingConfig(**batching))


@pytest.fixture
async def serve_cluster(start_workers, tiny_llama) -> AsyncIterator[Callable[..., object]]:
    """Start workers, a Cluster over them and the HTTP API on port 0; returns its URL."""
    from mlx_cluster.contract.config import LimitsConfig
    from mlx_cluster.coordinator.api.app import create_app
    from mlx_cluster.coordinator.api.server import HttpServer
    from mlx_cluster.coordinator.engine.cluster import Cluster

    servers: list[HttpServer] = []
    clusters: list[Cluster] = []

    async def start(
        model: Path | None = None,
        workers: int = 2,
        counts: Sequence[int] | None = None,
        settings: LimitsConfig | None = None,
        cors_origins: Sequence[str] = (),
        kv: dict[str, Any] | None = None,
        api_keys: Sequence[str] = (),
        **worker_settings: object,
    ) -> tuple[str, Cluster]:
        """`settings` are the cluster's limits (the API's too), `kv` its kv section;
        with `api_keys` the API asks for one of them."""
        clients = await start_workers(workers, **worker_settings)
        addresses = [c.address for c in clients]
        limits = settings or LimitsConfig()
        cluster = await Cluster.start(
            model or tiny_llama, addresses, counts, limits=limits, kv=kv or {}
        )
        clusters.append(cluster)
        server = HttpServer(create_app(cluster, limits, cors_origins, api_keys), "127.0.0.1", 0)
        await server.start()
        servers.append(server)
        return server.url, cluster

    yield start
    for server in servers:
        await server.stop()
    for cluster in clusters:
        await cluster.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """MLX wants its streams cleared by each thread before exit (the main thread too)."""
    import mlx.core as mx

    mx.clear_streams()
