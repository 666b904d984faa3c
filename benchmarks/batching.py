"""`python -m benchmarks.batching`: throughput under concurrency, against mlx-lm's batch generation.

One run, one model, on one machine:

1. the baseline, in its own process: mlx-lm's `generate_step` for one stream,
   and mlx-lm's `BatchGenerator` (what `batch_generate` runs) for the same N
   prompts at once;
2. the pipeline over K worker processes: one stream alone, then N concurrent
   streams through the coordinator's continuous batching, then the time to
   first token of a new request while M others stream (`--busy-streams`, 8 by
   default), against its time to first token on an idle cluster.

Every request generates exactly `--new-tokens` tokens (end-of-sequence is
ignored on both sides), so both sides do the same work. Aggregate tokens/s is
all generated tokens over the wall time from the first request to the last
token, prompt processing included, on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.cluster import NO_PREFIX_CACHE
from benchmarks.models import DEFAULT_CACHE_DIR, SHAPES, ensure_model
from benchmarks.pipeline import eval_every_args, positive_ints
from benchmarks.report import text_table
from mlx_cluster.coordinator.engine.events import Event, StepEvent
from mlx_cluster.coordinator.engine.lanes import StepProfile
from mlx_cluster.local import gpu_list
from mlx_cluster.models.random_model import DTYPES

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Baseline:
    single_tokens_per_s: float  # one stream, generate_step, decode only
    batch_tokens_per_s: float  # N streams, BatchGenerator, all tokens / wall time
    batch_generation_tps: float  # mlx-lm's own figure: generation tokens / generation time
    streams: int


@dataclasses.dataclass
class PipelineRun:
    workers: int
    lanes: int  # decode micro-batches
    single_tokens_per_s: float  # one stream, decode only
    batch_tokens_per_s: float  # N streams, all tokens / wall time
    idle_ttft_s: float  # a new request's first token, cluster idle
    busy_ttft_s: float  # the same request while M others stream
    busy_streams: int  # M
    mean_batch: float  # requests per decode step during the N-stream run
    largest_batch: int
    step_ms: dict[str, float]  # a decode step of the N-stream run: wall, hops, compute, other


def prompts_for(count: int, length: int, vocab: int) -> list[list[int]]:
    """Distinct deterministic prompts of roughly `length` tokens."""
    return [
        [(17 + 31 * i + 7 * j * (i + 1)) % (vocab - 10) + 5 for j in range(length + (i % 5))]
        for i in range(count)
    ]


# --- the baseline, in a process of its own --------------------------------------------


def run_baseline(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> Baseline:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator, generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)

    def single() -> float:
        stamps = []
        for _ in generate_step(mx.array(prompts[0]), model, max_tokens=new_tokens):
            stamps.append(time.perf_counter())
        mx.synchronize()
        return (len(stamps) - 2) / (stamps[-1] - stamps[1])

    def batch() -> tuple[float, float]:
        gen = BatchGenerator(model, max_tokens=new_tokens, stop_tokens=None)
        started = time.perf_counter()
        gen.insert(prompts, [new_tokens] * len(prompts))
        produced = 0
        with gen.stats() as stats:
            while responses := gen.next_generated():
                produced += len(responses)
        wall = time.perf_counter() - started
        gen.close()
        return produced / wall, stats.generation_tps

    single()  # warm-up: kernels, allocator
    single_rate = single()
    batch()
    batch_rate, generation_tps = batch()
    return Baseline(single_rate, batch_rate, generation_tps, len(prompts))


def baseline_in_subprocess(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> Baseline:
    """The baseline in a fresh process: the whole model never sits in the coordinator."""
    request = json.dumps({"model": str(model_dir), "prompts": prompts, "new_tokens": new_tokens})
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.batching", "--baseline-child"],
        input=request,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"baseline failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return Baseline(**json.loads(done.stdout.strip().splitlines()[-1]))


# --- the pipeline ------------------------------------------------------------------------


async def run_pipeline(
    model_dir: Path,
    workers: int,
    prompts: list[list[int]],
    new_tokens: int,
    transport: str,
    prefill_chunk: int,
    busy_streams: int,
    gpus: tuple[int, ...] = (),
    micro_batches: int = 0,
    eval_every: int | None = None,
) -> PipelineRun:
    from mlx_cluster.contract.config import BatchingConfig
    from mlx_cluster.contract.sampling import SamplingParams
    from mlx_cluster.coordinator.engine.cluster import Cluster
    from mlx_cluster.coordinator.engine.generation import Performance
    from mlx_cluster.local import local_workers

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    batching = BatchingConfig(
        max_batch=max(len(prompts) + 1, 1), prefill_chunk=prefill_chunk, micro_batches=micro_batches
    )

    quiet = ["--log-level", "WARNING", *eval_every_args(eval_every)]
    async with local_workers(
        workers,
        quiet,
        transport=transport,  # type: ignore[arg-type]
        gpus=gpus,
    ) as procs:
        cluster = await Cluster.start(
            model_dir,
            [p.address for p in procs],
            batching=batching,
            kv=NO_PREFIX_CACHE,
            ready_timeout=300,
        )
        try:

            async def one(prompt: list[int], first: asyncio.Event | None = None) -> Performance:
                perf = None
                async for chunk in cluster.generate(prompt, params):
                    if first is not None and chunk.token is not None:
                        first.set()
                    perf = chunk.performance or perf
                assert perf is not None
                return perf

            await one(prompts[0])  # warm-up
            alone = await one(prompts[0])
            probe = [*prompts[-1][: max(len(prompts[-1]) // 2, 1)], 7]
            await one(probe)  # its prompt's shapes are new: kernels get built on first use
            idle = await one(probe)

            profile = StepProfile()  # the N-stream run's decode steps alone
            unsubscribe = cluster.events.subscribe(lambda event: _add_step(profile, event))
            started = time.perf_counter()
            perfs = await asyncio.gather(*(one(p) for p in prompts))
            wall = time.perf_counter() - started
            unsubscribe()
            total = sum(p.completion_tokens for p in perfs)

            others = prompts[:busy_streams]
            firsts = [asyncio.Event() for _ in others]
            streaming = [
                asyncio.create_task(one(p, e)) for p, e in zip(others, firsts, strict=True)
            ]
            await asyncio.gather(*(e.wait() for e in firsts))
            await asyncio.sleep(0.2)  # every stream is decoding now
            busy = await one(probe)
            await asyncio.gather(*streaming)
            return PipelineRun(
                workers=workers,
                lanes=len(cluster.engine.lanes),
                single_tokens_per_s=alone.tokens_per_second,
                batch_tokens_per_s=total / wall,
                idle_ttft_s=idle.ttft_s,
                busy_ttft_s=busy.ttft_s,
                busy_streams=len(others),
                mean_batch=profile.rows / profile.steps if profile.steps else 0.0,
                largest_batch=profile.largest,
                step_ms=_step_ms(profile),
            )
        finally:
            await cluster.close()


def _add_step(profile: StepProfile, event: Event) -> None:
    """A subscriber to the cluster's events: every lane's decode steps, summed."""
    if isinstance(event, StepEvent):
        step = StepProfile(
            steps=1,
            rows=event.rows,
            largest=event.rows,
            wall=event.wall_s,
            hops=event.hops_s,
            compute=event.compute_s,
        )
        profile.add(step)


def _step_ms(profile: StepProfile) -> dict[str, float]:
    """A mean decode step (ms): wall (a lane's token interval), ring hops, workers' compute,
    and the rest (the first worker's loop, event delivery, other lanes' turns)."""
    ms = profile.per_step_ms()
    return {**ms, "other": ms["wall"] - ms["hops"] - ms["compute"]}


# --- report ------------------------------------------------------------------------------


def table(
    baseline: Baseline | None, runs: list[PipelineRun], streams: int, busy_streams: int
) -> str:
    headers = [
        "engine",
        "1 stream tok/s",
        f"{streams} streams tok/s",
        "vs mlx-lm batch",
        "vs own 1 stream",
        "TTFT idle ms",
        f"TTFT with {busy_streams} ms",
        "busy/idle",
        "mean batch",
    ]
    rows = []
    if baseline is not None:
        rows.append(
            [
                "mlx-lm",
                f"{baseline.single_tokens_per_s:.2f}",
                f"{baseline.batch_tokens_per_s:.2f}",
                "1.00x",
                f"{baseline.batch_tokens_per_s / baseline.single_tokens_per_s:.2f}x",
                "-",
                "-",
                "-",
                "-",
            ]
        )
    for r in runs:
        vs = f"{r.batch_tokens_per_s / baseline.batch_tokens_per_s:.2f}x" if baseline else "-"
        rows.append(
            [
                f"{r.workers} worker{'s' if r.workers > 1 else ''}, "
                f"{r.lanes} lane{'s' if r.lanes > 1 else ''}",
                f"{r.single_tokens_per_s:.2f}",
                f"{r.batch_tokens_per_s:.2f}",
                vs,
                f"{r.batch_tokens_per_s / r.single_tokens_per_s:.2f}x",
                f"{r.idle_ttft_s * 1e3:.0f}",
                f"{r.busy_ttft_s * 1e3:.0f}",
                f"{r.busy_ttft_s / r.idle_ttft_s:.2f}x",
                f"{r.mean_batch:.1f} (max {r.largest_batch})",
            ]
        )
    return text_table(headers, rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.batching", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", type=Path, default=None, help="a model directory (else --shape)")
    p.add_argument("--demo", action="store_true", help="the bundled demo model")
    p.add_argument("--model-shape", choices=sorted(SHAPES), default="demo-135m")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--bits", type=int, choices=[4, 8], default=None)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--workers", type=positive_ints, default=(2,))
    p.add_argument("--streams", type=int, default=8, help="concurrent requests")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument(
        "--busy-streams", type=int, default=8, help="streams running while TTFT is measured busy"
    )
    p.add_argument(
        "--micro-batches", type=int, default=0, help="decode lanes (0: the cluster's default)"
    )
    p.add_argument("--worker-eval-every", type=int, default=None, help="the workers' --eval-every")
    p.add_argument("--transport", choices=["unix", "tcp"], default="unix")
    p.add_argument(
        "--gpus", type=gpu_list, default=(), help="GPU index for each worker, cycled (e.g. 0,1)"
    )
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--baseline-child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.baseline_child:
        request = json.loads(sys.stdin.read())
        result = run_baseline(Path(request["model"]), request["prompts"], request["new_tokens"])
        print(json.dumps(dataclasses.asdict(result)))
        return 0
    if args.model is not None:
        model_dir = args.model
    elif args.demo:
        from mlx_cluster.models.demo import ensure_demo_model

        model_dir = ensure_demo_model()
    else:
        model_dir = ensure_model(args.model_shape, args.dtype, args.bits, args.cache_dir)
    config = json.loads((model_dir / "config.json").read_text())
    prompts = prompts_for(args.streams, args.prompt_tokens, int(config["vocab_size"]))
    print(f"[batching] model {model_dir}, {args.streams} streams", file=sys.stderr)
    baseline = None
    if not args.skip_baseline:
        print("[batching] baseline: mlx-lm generate_step and BatchGenerator", file=sys.stderr)
        baseline = baseline_in_subprocess(model_dir, prompts, args.new_tokens)
    busy_streams = min(args.busy_streams, args.streams)
    runs = []
    for count in args.workers:
        print(f"[batching] pipeline over {count} worker process(es)", file=sys.stderr)
        runs.append(
            asyncio.run(
                run_pipeline(
                    model_dir,
                    count,
                    prompts,
                    args.new_tokens,
                    args.transport,
                    args.prefill_chunk,
                    busy_streams,
                    args.gpus,
                    args.micro_batches,
                    args.worker_eval_every,
                )
            )
        )
    print(table(baseline, runs, args.streams, busy_streams))
    for r in runs:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r.step_ms.items())
        workers = f"{r.workers} worker{'s' if r.workers > 1 else ''}"
        print(f"{workers}, one decode step of the {args.streams}-stream run (ms): {parts}")
    doc: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "machine": platform.machine(),
        "model": str(model_dir),
        "args": {k: str(v) for k, v in vars(args).items()},
        "baseline": dataclasses.asdict(baseline) if baseline else None,
        "pipelines": [dataclasses.asdict(r) for r in runs],
    }
    out = args.json or Path(f"/tmp/benchmarks/batching-{socket.gethostname()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
