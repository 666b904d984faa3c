"""Start a cluster from its spec: ask the workers what they have, plan, check, load.

Every way to start a cluster (the config file, `mlx-cluster up`, `Cluster.start`)
builds one typed spec, a `ClusterConfig`, and comes here. The planner is pure
(contract.plan); this module feeds it the model's facts (read from disk, no
weights loaded) and each worker's capabilities (from Info, unless the config
overrides memory or compute), checks the plan against the limits the workers
report, then loads every slice (a progress bar a worker) and assembles the Cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlx_lm.utils import load_config

from mlx_cluster.contract.auth import client_credentials
from mlx_cluster.contract.config import ClusterConfig, WorkerEntry
from mlx_cluster.contract.errors import ClusterError
from mlx_cluster.contract.layers import split_by_counts, split_evenly
from mlx_cluster.contract.plan import GB, ClusterPlan, WorkerCapacity, plan_for_config
from mlx_cluster.contract.plan_report import render_plan
from mlx_cluster.contract.progress import Bar, bars
from mlx_cluster.contract.rpc import MIB
from mlx_cluster.contract.worker_info import WorkerInfo
from mlx_cluster.coordinator.engine.admission import Admission
from mlx_cluster.coordinator.engine.chain import Chain
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.cluster import READY_TIMEOUT_S, Cluster
from mlx_cluster.coordinator.engine.core import Engine
from mlx_cluster.coordinator.engine.discovery import Discovery
from mlx_cluster.coordinator.engine.prefixes import PrefixIndex
from mlx_cluster.coordinator.engine.stages import Stage, StageManager
from mlx_cluster.coordinator.engine.weights import Transfer, WeightSender
from mlx_cluster.models.demo import model_cache_dir
from mlx_cluster.models.inspect import model_facts
from mlx_cluster.models.slice_files import DigestCache
from mlx_cluster.models.sources import EVERY_LAYER, resolve_model
from mlx_cluster.models.tokenizer import load_model_tokenizer

log = logging.getLogger(__name__)


class StartupError(ClusterError):
    """The plan does not fit what the workers said they can do."""


def local_spec(
    model: Path | str,
    addresses: Sequence[str],
    layer_counts: Sequence[int] | None = None,
    **sections: Any,
) -> ClusterConfig:
    """The spec of workers given by address, in chain order, with layers split by counts.

    Without counts the layers are split evenly. `sections` are further config
    sections or fields (e.g. `kv={"budget_tokens": 512}`, `batching=BatchingConfig(...)`).
    """
    if not addresses:
        raise StartupError("a cluster needs at least one worker")
    total = model_facts(resolve_model(str(model), edges=True)).num_layers
    ranges = (
        split_by_counts(list(layer_counts), total)
        if layer_counts
        else split_evenly(total, len(addresses))
    )
    workers = [
        {"address": a, "layers": (r.start, r.end)} for a, r in zip(addresses, ranges, strict=True)
    ]
    return ClusterConfig.model_validate({"model": str(model), "workers": workers, **sections})


def capacities(config: ClusterConfig, infos: Sequence[WorkerInfo]) -> list[WorkerCapacity]:
    """Each worker's usable memory and relative compute: the config's overrides, else Info.

    Compute defaults to the worker's memory, so an uneven cluster is split by memory.
    """
    result = []
    for entry, info in zip(config.workers, infos, strict=True):
        detected = info.capabilities.memory_available_bytes
        memory = int(entry.memory_gb * GB) if entry.memory_gb else detected
        result.append(WorkerCapacity(entry.label, memory, entry.compute or memory / GB))
    return result


def check_limits(config: ClusterConfig, infos: Sequence[WorkerInfo], names: Sequence[str]) -> None:
    """Refuse a plan the workers said they cannot run, naming both numbers.

    Raises:
        StartupError: a decode batch larger than a worker takes in one step.
    """
    if not config.batching.enabled:
        return
    for name, info in zip(names, infos, strict=True):
        if config.batching.max_batch > info.limits.max_batch:
            raise StartupError(
                f"batching.max_batch is {config.batching.max_batch}, but worker {name} takes "
                f"at most {info.limits.max_batch} sessions in one step: lower "
                "batching.max_batch or start the worker with a larger --max-batch"
            )


async def plan_cluster(
    config: ClusterConfig, model: Path, clients: list[WorkerClient], ready_timeout: float
) -> ClusterPlan:
    """Ask every worker for its capabilities, plan the layers over them, check its limits."""
    infos = await asyncio.gather(*(c.wait_ready(ready_timeout) for c in clients))
    facts = await asyncio.to_thread(model_facts, model)
    if config.speculative.draft_model:  # the first worker holds it beside its layers
        draft = resolve_model(config.speculative.draft_model)
        weights = sum(f.stat().st_size for f in draft.glob("*.safetensors"))
        facts = dataclasses.replace(facts, draft_bytes=weights)
    plan = plan_for_config(facts, config, capacities(config, infos))
    check_limits(config, infos, [c.name for c in clients])
    log.info("plan:\n%s", render_plan(plan))
    return plan


async def start_from_config(
    config: ClusterConfig, ready_timeout: float = READY_TIMEOUT_S
) -> Cluster:
    """Connect to the spec's workers, plan, check, load every slice; returns the Cluster."""
    # The coordinator needs only config and tokenizer; the planner reads the sizes of the
    # edges (the first and last stage's) from their shards' headers. Workers sent their
    # weights need the whole model here.
    sends = config.sends_weights
    model = resolve_model(config.model, layers=EVERY_LAYER if sends else None, edges=True)
    weights = _weight_sender(config, model) if sends else None
    discovery = None
    if config.discovery.enabled:
        discovery = Discovery(config, lambda entry: worker_client(entry, config))
    clients: list[WorkerClient] = []
    standbys: list[WorkerClient] = []
    try:
        if discovery is not None:
            config = await discovery.find()
        clients = [worker_client(w, config) for w in config.workers]
        standbys = [worker_client(w, config) for w in config.standby]
        plan = await plan_cluster(config, model, clients, ready_timeout)
        model_config = load_config(model)
        stages = StageManager(
            weights.key if weights else config.model,
            [
                Stage(client, wp.layers, wp.kv_tokens, config.kv.session_ttl_s or 0.0)
                for client, wp in zip(clients, plan.workers, strict=True)
            ],
            standbys,
            config.liveness,
            config.speculative.draft_model or "",
            int(config.kv.prefix_cache_gb * GB),
            weights,
        )
        await _load_with_bars(stages)
        tokenizer = await asyncio.to_thread(load_model_tokenizer, model)
        admission = Admission(config.limits.queue_length, config.limits.queue_timeout_s)
        prefixes = PrefixIndex() if config.kv.prefix_cache_gb > 0 else None
        chain = Chain(
            vocab_size(model_config), stages, admission, liveness=config.liveness, prefixes=prefixes
        )
        engine = Engine(chain, config.batching, speculative=config.speculative.speculation())
        if discovery is not None:

            async def add_standby(entry: WorkerEntry) -> None:
                stages.add_standby(worker_client(entry, config))

            discovery.watch(add_standby)
        return Cluster(model, engine, tokenizer, plan, config, discovery)
    except BaseException:
        await asyncio.gather(*(c.close() for c in clients + standbys), return_exceptions=True)
        if discovery is not None:
            await discovery.close()
        raise


async def _load_with_bars(stages: StageManager) -> None:
    """Load every stage's slice, with a bar a worker, and one for the bytes of each slice
    sent to a worker (drawn where contract.progress says)."""
    with bars() as shown:
        sending: dict[str, Bar] = {}  # by worker address

        def sent(transfer: Transfer) -> None:
            if transfer.address not in sending:
                label = f"{transfer.worker} weights"
                sending[transfer.address] = shown.add(label, transfer.total_bytes, "bytes")
            bar = sending[transfer.address]
            bar.set(completed=transfer.verified_bytes, note="received" if transfer.done else "")

        if stages.weights is not None:
            stages.weights.on_progress = sent
        loading = {
            id(stage): shown.add(
                f"{stage.client.name} layers [{stage.layers.start}, {stage.layers.end})",
                stage.layers.count,
                "layers",
            )
            for stage in stages.stages
        }
        for bar in loading.values():
            bar.set(note="loading")

        def loaded(stage: Stage, info: WorkerInfo) -> None:
            loading[id(stage)].finish(note=f"loaded, {info.weight_bytes / 1e6:.1f} MB")

        try:
            await stages.load_all(loaded)
        finally:  # later transfers (to a standby) are logged, with no bars drawn
            if stages.weights is not None:
                stages.weights.on_progress = None


def _weight_sender(config: ClusterConfig, model: Path) -> WeightSender:
    if config.speculative.draft_model:
        raise StartupError(
            "a draft model is not sent to workers yet: give the first worker the draft model "
            "and set weights.send to false, or turn speculative.draft_model off"
        )
    digests = DigestCache(model_cache_dir().parent / "digests.json")
    return WeightSender(model, config.weights.chunk_kb * 1024, digests=digests)


def vocab_size(model_config: dict[str, Any]) -> int:
    """The vocabulary size a model's config.json gives (at its top or in its text part)."""
    size = model_config.get("vocab_size") or model_config.get("text_config", {}).get("vocab_size")
    if not size:
        raise StartupError("the model's config.json gives no vocab_size")
    return int(size)


def worker_client(entry: WorkerEntry, config: ClusterConfig) -> WorkerClient:
    """A client for one configured worker (active or standby), with the cluster's credentials."""
    token, tls = client_credentials(config.auth)
    max_bytes = config.limits.max_message_mb * MIB
    return WorkerClient(
        entry.address,
        entry.name,
        token=token,
        tls=tls,
        max_message_bytes=max_bytes,
        liveness=config.liveness,
    )
