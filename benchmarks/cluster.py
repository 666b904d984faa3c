"""The pipeline side: N worker processes on this host, the coordinator in this process.

Workers are started by `mlx_cluster.local.local_workers` (TCP loopback or Unix
domain sockets), the cluster by `Cluster.start` (even split), and tokens come
from the engine's `generate_tokens`, as the HTTP API makes them. Timings come
from the cluster's events: prompt chunks go along the workers' relay, which times
each worker's part (one HopEvent per worker per chunk); decode steps run as a ring
on the workers, which report each step as a whole (one StepEvent per step).
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
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.contract.speculation import DraftStats
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.coordinator.engine.events import Event, HopEvent, StepEvent
from mlx_cluster.local import Transport, local_workers

WORKER_ARGS = ["--log-level", "WARNING"]
# Prompts measured again and again would start from what the runs before left cached:
# every benchmark but benchmarks.prefix_cache measures without the prefix cache.
NO_PREFIX_CACHE = {"prefix_cache_gb": 0}


@dataclass
class HopBreakdown:
    """Mean time of one worker's hop per prefill chunk (seconds), as the coordinator saw it."""

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
class DecodeBreakdown:
    """Mean time of one decode step on the ring (seconds), as the first worker reported it."""

    steps: int
    wall_s: float  # between two steps' arrival at the coordinator: the time a token takes
    compute_s: float  # every worker's compute, the last one's head and sampling included
    hops_s: float  # the ring's round trips between workers, beyond their compute
    per_hop_s: float | None  # hops / (workers - 1): one relayed round trip; None for 1 worker
    other_s: float  # wall - compute - hops: the first worker's loop, event delivery


@dataclass
class ClusterResult(EngineResult):
    """An EngineResult of the pipeline, with where a step's time went."""

    workers: int = 0
    layers: list[str] = field(default_factory=list)  # each worker's [start, end)
    decode: DecodeBreakdown | None = None  # mean per decode step 2..N
    prefill_hops: dict[int, list[HopBreakdown]] = field(default_factory=dict)  # per chunk
    recoveries: int = 0  # sessions replayed after a worker failed: timings are then invalid


class EventRecorder:
    """A subscriber to the cluster's events keeping prefill hops and decode steps."""

    def __init__(self, workers: list[str]) -> None:
        self.workers = workers
        self.hops: list[HopEvent] = []  # prefill chunks: the engine times decode as steps
        self.steps: list[StepEvent] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, HopEvent):
            self.hops.append(event)
        elif isinstance(event, StepEvent):
            self.steps.append(event)

    def clear(self) -> None:
        self.hops.clear()
        self.steps.clear()

    def prefill(self) -> list[HopBreakdown]:
        """Per-worker means over the recorded hops (a hop's network time counts its wait
        behind the chunk before: chunks overlap)."""
        breakdowns = []
        for name in self.workers:
            hops = [h for h in self.hops if h.worker == name]
            means = (
                statistics.fmean(getattr(h, k) for h in hops)
                for k in ("encode_s", "network_s", "compute_s", "decode_s")
            )
            breakdowns.append(HopBreakdown(name, len(hops), *means))
        return breakdowns

    def decode(self, first: int = 1) -> DecodeBreakdown:
        """Means over the recorded steps from `first` on.

        The first step's wall time runs from the rows' joining the ring, not from a
        previous step, so it is left out by default, as the decode rate leaves it out.
        """
        steps = self.steps[first:]
        if not steps:
            raise ValueError(f"no decode step after the first {first}: {len(self.steps)} recorded")
        wall = statistics.fmean(s.wall_s for s in steps)
        compute = statistics.fmean(s.compute_s for s in steps)
        hops = statistics.fmean(s.hops_s for s in steps)
        relays = len(self.workers) - 1
        return DecodeBreakdown(
            steps=len(steps),
            wall_s=wall,
            compute_s=compute,
            hops_s=hops,
            per_hop_s=hops / relays if relays else None,
            other_s=wall - compute - hops,
        )


async def timed_tokens(
    cluster: Cluster,
    prompt: list[int],
    params: SamplingParams,
    stop_tokens: Sequence[int] = (),
    stats: DraftStats | None = None,
) -> tuple[float, list[float], list[int], int]:
    """Tokens through the pipeline, as the HTTP API makes them, with their arrival times.

    None comes after one of `stop_tokens`; `stats`, if given, counts the request's drafts.

    Returns:
        (start, arrival times, tokens, recoveries: times a failed worker's session was replayed)
    """
    stamps: list[float] = []
    tokens: list[int] = []
    replays = cluster.engine.chain.replays
    started = time.perf_counter()
    async for sampled in cluster.engine.generate_tokens(
        prompt, params, stop_tokens=stop_tokens, stats=stats
    ):
        stamps.append(time.perf_counter())
        tokens.append(sampled.token)
    return started, stamps, tokens, cluster.engine.chain.replays - replays


async def _generate(
    cluster: Cluster, prompt: list[int], max_tokens: int
) -> tuple[float, list[float], list[int], int]:
    """Greedy tokens through the pipeline, `max_tokens` of them (see `timed_tokens`)."""
    return await timed_tokens(
        cluster, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    )


async def _run_workload(
    cluster: Cluster, workload: Workload, recorder: EventRecorder
) -> ClusterResult:
    await _generate(cluster, workload.warmup_prompt, WARMUP_NEW_TOKENS)
    recorder.clear()
    started, stamps, tokens, recoveries = await _generate(
        cluster, workload.decode_prompt, workload.decode_tokens
    )
    # Steps 2..N are what the decode rate measures; step 1 follows the prefill.
    decode = recorder.decode(first=1)
    prefill: list[PrefillTiming] = []
    prefill_hops: dict[int, list[HopBreakdown]] = {}
    for length in workload.prompt_lengths:
        # As for the baseline: the first prompt of a length pays one-off costs; warm up on it.
        await _generate(cluster, workload.prompt(length), 1)
        recorder.clear()
        start, (first, *_), _, replays = await _generate(cluster, workload.prompt(length), 1)
        recoveries += replays
        prefill.append(PrefillTiming(length, first - start))
        prefill_hops[length] = recorder.prefill()
    n = len(cluster.stages)
    return ClusterResult(
        label=f"{n} worker" + ("s" if n > 1 else ""),
        decode_tokens_per_s=decode_rate(stamps),
        decode_ttft_s=stamps[0] - started,
        prefill=prefill,
        tokens=tokens,
        workers=n,
        layers=[str(s.layers) for s in cluster.stages],
        decode=decode,
        prefill_hops=prefill_hops,
        recoveries=recoveries,
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
                batching={"prefill_chunk": workload.cluster_chunk},
                kv=NO_PREFIX_CACHE,
            )
            try:
                recorder = EventRecorder([s.client.name for s in cluster.stages])
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
