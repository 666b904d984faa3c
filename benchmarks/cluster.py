"""The pipeline side: N worker processes on this host, the coordinator in this process.

Workers are started by `mlx_cluster.local.local_workers` (TCP loopback or Unix
domain sockets), the cluster by `Cluster.start` (even split), and tokens come
from the engine's `generate_tokens`, as the HTTP API makes them. Every hop of
every step is recorded from the cluster's events, so decode steps and prefill
chunks are broken down separately.
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from benchmarks.memory import PeakRss, mlx_peak
from benchmarks.workload import (
    WARMUP_NEW_TOKENS,
    EngineResult,
    PrefillTiming,
    Workload,
    decode_rate,
)
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.coordinator.engine.events import Event, HopEvent
from mlx_cluster.coordinator.engine.sampling import SamplingParams
from mlx_cluster.local import Transport, local_workers

WORKER_ARGS = ["--log-level", "WARNING"]
Hop = tuple[float, float, float, float]  # encode, network, compute, decode seconds of one hop


@dataclass
class HopBreakdown:
    """Mean time of one worker's hop per step (seconds), as the coordinator saw it."""

    worker: str
    steps: int
    encode_s: float  # coordinator: hidden states -> ForwardRequest
    network_s: float  # round trip minus the worker's compute: gRPC, framing, thread hops
    compute_s: float  # worker: decode request, run layers, encode reply
    decode_s: float  # coordinator: ForwardResponse -> hidden states
    overhead_s: float = field(init=False)  # all of the above but compute

    def __post_init__(self) -> None:
        self.overhead_s = self.encode_s + self.network_s + self.decode_s


@dataclass
class ClusterResult(EngineResult):
    """An EngineResult of the pipeline, with where a step's time went."""

    workers: int = 0
    layers: list[str] = field(default_factory=list)  # each worker's [start, end)
    decode_hops: list[HopBreakdown] = field(default_factory=list)  # per decode step
    prefill_hops: dict[int, list[HopBreakdown]] = field(default_factory=dict)  # per chunk
    coordinator_step_s: float = 0.0  # decode step time outside the hops: embed, head, sampling
    recoveries: int = 0  # sessions replayed after a worker failed: timings are then invalid


class HopRecorder:
    """A subscriber to the cluster's events keeping every hop's timing, grouped into steps."""

    def __init__(self, workers: list[str]) -> None:
        self.workers = workers
        self.hops: list[Hop] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, HopEvent):
            self.hops.append((event.encode_s, event.network_s, event.compute_s, event.decode_s))

    def steps(self) -> list[list[Hop]]:
        """The recorded hops as steps: each step holds one hop per worker, in order."""
        n = len(self.workers)
        return [self.hops[i : i + n] for i in range(0, len(self.hops), n)]

    def breakdown(self, first: int, last: int | None = None) -> list[HopBreakdown]:
        """Per-worker means over steps [first, last)."""
        steps = self.steps()[first:last]
        return [
            HopBreakdown(
                name, len(steps), *(statistics.fmean(h[i][k] for h in steps) for k in range(4))
            )
            for i, name in enumerate(self.workers)
        ]


async def _generate(
    cluster: Cluster, prompt: list[int], max_tokens: int
) -> tuple[float, list[float], list[int], int]:
    """Greedy tokens through the pipeline.

    Returns:
        (start, arrival times, tokens, recoveries: times a failed worker's session was replayed)
    """
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    stamps: list[float] = []
    tokens: list[int] = []
    replays = cluster.engine.chain.replays
    started = time.perf_counter()
    async for token, _ in cluster.engine.generate_tokens(prompt, params):
        stamps.append(time.perf_counter())
        tokens.append(token)
    return started, stamps, tokens, cluster.engine.chain.replays - replays


async def _run_workload(
    cluster: Cluster, workload: Workload, recorder: HopRecorder
) -> ClusterResult:
    await _generate(cluster, workload.warmup_prompt, WARMUP_NEW_TOKENS)
    recorder.hops.clear()
    started, stamps, tokens, recoveries = await _generate(
        cluster, workload.decode_prompt, workload.decode_tokens
    )
    # Steps 2..N are what the decode rate measures; step 1 ends the prefill.
    decode_hops = recorder.breakdown(workload.prefill_chunks(len(workload.decode_prompt)) + 1)
    step_s = 1 / decode_rate(stamps)
    prefill: list[PrefillTiming] = []
    prefill_hops: dict[int, list[HopBreakdown]] = {}
    for length in workload.prompt_lengths:
        # As for the baseline: the first prompt of a length pays one-off costs; warm up on it.
        await _generate(cluster, workload.prompt(length), 1)
        recorder.hops.clear()
        start, (first, *_), _, replays = await _generate(cluster, workload.prompt(length), 1)
        recoveries += replays
        prefill.append(PrefillTiming(length, first - start))
        prefill_hops[length] = recorder.breakdown(0, workload.prefill_chunks(length))
    n = len(cluster.stages)
    return ClusterResult(
        label=f"{n} worker" + ("s" if n > 1 else ""),
        decode_tokens_per_s=1 / step_s,
        decode_ttft_s=stamps[0] - started,
        prefill=prefill,
        tokens=tokens,
        workers=n,
        layers=[str(s.layers) for s in cluster.stages],
        decode_hops=decode_hops,
        prefill_hops=prefill_hops,
        recoveries=recoveries,
        coordinator_step_s=step_s - sum(h.overhead_s + h.compute_s for h in decode_hops),
    )


async def run_cluster(
    model_dir: Path,
    workers: int,
    workload: Workload,
    transport: Transport = "tcp",
    gpus: Sequence[int] = (),
    worker_args: Sequence[str] = (),
) -> ClusterResult:
    """Start `workers` worker processes (worker i on GPU `gpus[i % len]` if given), run the
    workload through them, stop them."""
    gc.collect()
    mx.clear_cache()  # what an earlier run left must not count in this one's peak
    args = [*WORKER_ARGS, *worker_args]
    async with local_workers(workers, args, transport=transport, gpus=gpus) as processes:
        pids = [os.getpid(), *(w.process.pid for w in processes)]
        with PeakRss(pids) as rss:
            mx.reset_peak_memory()
            cluster = await Cluster.start(
                model_dir,
                [w.address for w in processes],
                batching={"prefill_chunk": workload.prefill_step_size},
            )
            try:
                recorder = HopRecorder([s.client.name for s in cluster.stages])
                cluster.events.subscribe(recorder)
                result = await _run_workload(cluster, workload, recorder)
                infos = await asyncio.gather(*(s.client.info() for s in cluster.stages))
            finally:
                await cluster.close()
        result.memory = {
            "method": rss.method,
            "coordinator_peak_rss_bytes": rss.peaks[pids[0]],
            "coordinator_mlx_peak_bytes": mlx_peak(),
            "worker_peak_rss_bytes": [rss.peaks[pid] for pid in pids[1:]],
            "worker_weight_bytes": [info.weight_bytes for info in infos],
        }
    return result
