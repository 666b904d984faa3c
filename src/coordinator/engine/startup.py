"""Start a cluster from its configuration: ask the workers what they have, plan, load.

The planner is pure (contract.plan); this module feeds it the model's facts
(read from disk, no weights loaded) and each worker's capabilities (from Info,
unless the config overrides memory or compute), then assembles the Cluster.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from mlx_cluster.contract.auth import client_credentials
from mlx_cluster.contract.config import ClusterConfig, WorkerEntry
from mlx_cluster.contract.plan import GB, ClusterPlan, WorkerCapacity, plan_for_config, render_plan
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.coordinator.engine.pipeline import Admission, Stage
from mlx_cluster.models.inspect import model_facts
from mlx_cluster.models.slicing import load_edges
from mlx_cluster.models.sources import resolve_model

log = logging.getLogger(__name__)


def capacities(config: ClusterConfig, infos: list[pb.InfoResponse]) -> list[WorkerCapacity]:
    """Each worker's usable memory and relative compute: the config's overrides, else Info.

    Compute defaults to the worker's memory, so an uneven cluster is split by memory.
    """
    result = []
    for entry, info in zip(config.workers, infos, strict=True):
        detected = info.capabilities.memory_available_bytes
        memory = int(entry.memory_gb * GB) if entry.memory_gb else detected
        result.append(WorkerCapacity(entry.label, memory, entry.compute or memory / GB))
    return result


async def plan_cluster(
    config: ClusterConfig, model: Path, clients: list[WorkerClient], ready_timeout: float
) -> ClusterPlan:
    """Ask every worker for its capabilities and plan the layers over them."""
    infos = await asyncio.gather(*(c.wait_ready(ready_timeout) for c in clients))
    facts = await asyncio.to_thread(model_facts, model)
    plan = plan_for_config(facts, config, capacities(config, list(infos)))
    log.info("plan:\n%s", render_plan(plan))
    return plan


async def start_from_config(config: ClusterConfig, ready_timeout: float = 120.0) -> Cluster:
    """Connect to the configured workers, plan, load every slice; returns the Cluster."""
    model = resolve_model(config.model, edges=True)
    clients = [worker_client(w, config) for w in config.workers]
    standbys = [worker_client(w, config) for w in config.standby]
    try:
        plan = await plan_cluster(config, model, clients, ready_timeout)
        edges = load_edges(model)  # on this thread: MLX keeps per-thread streams
        stages = [
            Stage(client, wp.layers, wp.kv_tokens, config.kv.session_ttl_s)
            for client, wp in zip(clients, plan.workers, strict=True)
        ]
        admission = Admission(config.limits.queue_length, config.limits.queue_timeout_s)
        return await Cluster.assemble(
            model,
            edges,
            stages,
            plan.context_tokens,
            plan,
            standbys,
            admission,
            config.model,
            config.batching,
        )
    except BaseException:
        await asyncio.gather(*(c.close() for c in clients + standbys), return_exceptions=True)
        raise


def worker_client(entry: WorkerEntry, config: ClusterConfig) -> WorkerClient:
    """A client for one configured worker (active or standby), with the cluster's credentials."""
    token, tls = client_credentials(config.auth)
    max_bytes = config.limits.max_message_mb * 1024 * 1024
    return WorkerClient(
        entry.address, entry.name, token=token, tls=tls, max_message_bytes=max_bytes
    )
