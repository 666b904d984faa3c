"""The coordinator's view of a running cluster: workers, their layers, the model's ends.

`Cluster.start` connects to workers given by address and splits the layers
evenly (or by counts); `coordinator.startup.start_from_config` plans from the
workers' capabilities instead. Both end in `Cluster.assemble`, which gives each
worker its layers, loads the tokenizer and the embedding/norm/head, and checks
that the slices chain up. `Cluster.generate` is the Python API the HTTP layer
wraps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

from mlx_cluster import tensor
from mlx_cluster.contract.auth import TlsFiles
from mlx_cluster.contract.config import BatchingConfig
from mlx_cluster.contract.errors import ClusterError, InvalidArgument
from mlx_cluster.contract.layers import LayerRange, check_coverage, split_by_counts, split_evenly
from mlx_cluster.contract.plan import ClusterPlan
from mlx_cluster.coordinator.engine.batching import Batcher
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.events import EventBus
from mlx_cluster.coordinator.engine.generation import TextChunk, generate_text
from mlx_cluster.coordinator.engine.health import (
    INFO_TIMEOUT_S,
    ClusterHealth,
    StageHealth,
    Standby,
    cluster_status,
    serves,
)
from mlx_cluster.coordinator.engine.pipeline import Admission, Pipeline, Stage
from mlx_cluster.coordinator.engine.sampling import SamplingParams
from mlx_cluster.coordinator.engine.supervisor import Supervisor
from mlx_cluster.models.slicing import ModelEdges, load_edges

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096  # for models whose config names no context length


def model_context(config: dict) -> int:
    """The context window a model's config.json declares."""
    return int(
        config.get("max_position_embeddings")
        or config.get("text_config", {}).get("max_position_embeddings")
        or DEFAULT_CONTEXT
    )


class Cluster:
    """A model served by a chain of workers."""

    def __init__(
        self,
        model: Path,
        pipeline: Pipeline,
        tokenizer: TokenizerWrapper,
        context_tokens: int | None = None,
        plan: ClusterPlan | None = None,
        batching: BatchingConfig | None = None,
    ) -> None:
        self.model = model
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.plan = plan
        self.model_id = model.name
        self.created = int((model / "config.json").stat().st_mtime)
        declared = model_context(pipeline.edges.config)
        self.context_length = min(declared, context_tokens or declared)
        self.supervisor = Supervisor(pipeline.model_ref, pipeline.stages)
        self.batching = batching or BatchingConfig()
        self.batcher = (
            Batcher(pipeline, self.batching.micro_batches, self.batching.max_batch)
            if self.batching.enabled
            else None
        )

    @property
    def stages(self) -> list[Stage]:
        return self.pipeline.stages

    @property
    def events(self) -> EventBus:
        """Hop and decode-step events, for metrics and benchmarks to subscribe to."""
        return self.pipeline.events

    @property
    def vocab_size(self) -> int:
        return self.pipeline.edges.vocab_size

    async def health(self) -> ClusterHealth:
        """Every stage's worker asked now (concurrently, with a short deadline)."""
        ref = self.pipeline.model_ref
        stages = await asyncio.gather(*(_stage_health(s, ref) for s in self.stages))
        standbys = [Standby(c.name, c.address) for c in self.pipeline.standbys]
        return ClusterHealth(cluster_status(stages), self.model_id, stages, standbys)

    @classmethod
    async def start(
        cls,
        model: Path,
        addresses: Sequence[str],
        layer_counts: Sequence[int] | None = None,
        kv_budget_tokens: int = 0,
        ready_timeout: float = 60.0,
        token: str | None = None,
        tls: TlsFiles | None = None,
        batching: BatchingConfig | None = None,
    ) -> Cluster:
        """Connect to workers by address (in chain order) and split the layers between them.

        Args:
            model: a model directory every worker and the coordinator can read.
            addresses: worker "host:port" addresses; the first gets the first layers.
            layer_counts: layers per worker; default an even split.
            kv_budget_tokens: each worker's KV budget in tokens; 0 = the worker's default.
            ready_timeout: seconds to wait for each worker to answer.
            token: the workers' cluster token, if they require one.
            tls: TLS towards the workers (see WorkerClient); None: plaintext.
            batching: continuous batching settings; None: the defaults.
        """
        if not addresses:
            raise InvalidArgument("a cluster needs at least one worker")
        clients = [WorkerClient(a, token=token, tls=tls) for a in addresses]
        try:
            await asyncio.gather(*(c.wait_ready(ready_timeout) for c in clients))
            edges = load_edges(model)  # on this thread: MLX keeps per-thread streams
            total = edges.num_layers
            ranges = (
                split_by_counts(list(layer_counts), total)
                if layer_counts
                else split_evenly(total, len(clients))
            )
            stages = [Stage(c, r, kv_budget_tokens) for c, r in zip(clients, ranges, strict=True)]
            return await cls.assemble(model, edges, stages, batching=batching)
        except BaseException:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
            raise

    @classmethod
    async def assemble(
        cls,
        model: Path,
        edges: ModelEdges,
        stages: list[Stage],
        context_tokens: int | None = None,
        plan: ClusterPlan | None = None,
        standbys: list[WorkerClient] | None = None,
        admission: Admission | None = None,
        model_ref: str | None = None,
        batching: BatchingConfig | None = None,
    ) -> Cluster:
        """Give each stage's worker its layers, load the tokenizer, and check the chain.

        Standbys stay empty until a worker fails and one takes over its layers.
        `model_ref` is what workers are told to load (a model id each resolves
        locally); default: the coordinator's own path.
        """
        check_coverage([s.layers for s in stages])
        ref = model_ref or str(model)
        await asyncio.gather(*(_load(s, ref, edges) for s in stages))
        tokenizer = await asyncio.to_thread(
            load_tokenizer, model, eos_token_ids=edges.config.get("eos_token_id")
        )
        pipeline = Pipeline(edges, stages, standbys, admission, ref)
        return cls(model, pipeline, tokenizer, context_tokens, plan, batching)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        await self.supervisor.stop()
        clients = [s.client for s in self.stages] + self.pipeline.standbys
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Token ids for a prompt: text (optionally as a one-message chat) or ids as given."""
        if not isinstance(prompt, str):
            return list(prompt)
        if chat:
            messages = [{"role": "user", "content": prompt}]
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        return list(self.tokenizer.encode(prompt))

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        chat: bool = False,
        timeout: float | None = None,
    ) -> AsyncGenerator[TextChunk, None]:
        """Stream the completion of `prompt` as TextChunks; the last has finish_reason."""
        return generate_text(
            self.pipeline,
            self.tokenizer,
            self.encode(prompt, chat),
            params,
            timeout,
            self.batcher,
            self.batching.prefill_chunk,
        )


async def _stage_health(stage: Stage, model_ref: str) -> StageHealth:
    client = stage.client
    started = time.perf_counter()
    try:
        info = await client.info(timeout=INFO_TIMEOUT_S)
    except (ClusterError, TimeoutError) as exc:
        return StageHealth(client.name, client.address, stage.layers, "unavailable", error=str(exc))
    return StageHealth(
        client.name,
        client.address,
        stage.layers,
        "ok" if serves(info, model_ref, stage.layers) else "not_loaded",
        info,
        round_trip_s=time.perf_counter() - started,
        step_network_s=client.last_step_network_s,
    )


async def _load(stage: Stage, model_ref: str, edges: ModelEdges) -> None:
    r: LayerRange = stage.layers
    reply = await stage.client.load_layers(
        model_ref, r.start, r.end, stage.kv_budget_tokens, stage.session_ttl_s
    )
    info = reply.info
    expected_dtype = tensor.dtype_name(edges.dtype)
    if info.hidden_size != edges.hidden_size or info.dtype != expected_dtype:
        raise ClusterError(
            f"worker {stage.client.name} loaded hidden size {info.hidden_size} {info.dtype}, "
            f"the model's embedding gives {edges.hidden_size} {expected_dtype}"
        )
    log.info(
        "worker %s at %s holds layers %s (%.1f MB)",
        stage.client.name,
        stage.client.address,
        r,
        info.weight_bytes / 1e6,
    )
