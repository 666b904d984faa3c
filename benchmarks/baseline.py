"""The baseline: single-process mlx-lm on the whole model, in a process of its own.

`python -m benchmarks.baseline --model DIR ...` loads the model with
`mlx_lm.utils.load_model`, runs the workload through `mlx_lm.generate.generate_step`
(greedy) and prints one JSON line: an `EngineResult`. Running it apart keeps
the whole model out of the coordinator's memory and gives the baseline's own
peak memory.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

from benchmarks.memory import mlx_peak, own_peak_rss
from benchmarks.workload import (
    WARMUP_NEW_TOKENS,
    EngineResult,
    PrefillTiming,
    Workload,
    decode_rate,
)
from mlx_cluster.contract.sampling import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[1]


def timed_generate(
    model: nn.Module, prompt: list[int], max_tokens: int, prefill_step_size: int
) -> tuple[float, list[float], list[int]]:
    """Greedy tokens of mlx-lm's generate_step; returns (start, arrival times, tokens)."""
    sampler = SamplingParams().sampler()
    stamps: list[float] = []
    tokens: list[int] = []
    started = time.perf_counter()
    steps = generate_step(
        mx.array(prompt),
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        prefill_step_size=prefill_step_size,
    )
    for token, _ in steps:
        stamps.append(time.perf_counter())
        tokens.append(token)
    mx.synchronize()  # generate_step evaluates one step ahead; let it finish before the next run
    return started, stamps, tokens


def run_baseline(model_dir: Path, workload: Workload) -> EngineResult:
    """Run the workload on the whole model in this process."""
    model, _ = load_model(model_dir)
    chunk = workload.prefill_step_size
    timed_generate(model, workload.warmup_prompt, WARMUP_NEW_TOKENS, chunk)
    started, stamps, tokens = timed_generate(
        model, workload.decode_prompt, workload.decode_tokens, chunk
    )
    prefill = []
    for length in workload.prompt_lengths:
        # The first prompt of a length pays one-off costs (kernels built for its shapes,
        # cached on disk for later processes): warm up on it, then measure.
        timed_generate(model, workload.prompt(length), 1, chunk)
        start, (first, *_), _ = timed_generate(model, workload.prompt(length), 1, chunk)
        prefill.append(PrefillTiming(length, first - start))
    return EngineResult(
        label="baseline",
        decode_tokens_per_s=decode_rate(stamps),
        decode_ttft_s=stamps[0] - started,
        prefill=prefill,
        tokens=tokens,
        memory={"peak_rss_bytes": own_peak_rss(), "mlx_peak_bytes": mlx_peak()},
    )


def result_from_json(data: dict) -> EngineResult:
    """Rebuild an EngineResult from its JSON form."""
    prefill = [PrefillTiming(p["prompt_tokens"], p["ttft_s"]) for p in data.pop("prefill")]
    return EngineResult(prefill=prefill, **data)


async def run_in_subprocess(model_dir: Path, workload: Workload) -> EngineResult:
    """Run the baseline in a fresh process; raises if it fails."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.baseline",
        "--model",
        str(model_dir),
        "--workload",
        json.dumps(dataclasses.asdict(workload)),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the baseline process exited with code {process.returncode}")
    return result_from_json(json.loads(out.decode().strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description="single-process mlx-lm baseline")
    parser.add_argument("--model", type=Path, required=True, help="model directory")
    parser.add_argument("--workload", required=True, help="a Workload as JSON")
    args = parser.parse_args()
    fields = json.loads(args.workload)
    workload = Workload(**{**fields, "prompt_lengths": tuple(fields["prompt_lengths"])})
    result = run_baseline(args.model, workload)
    print(json.dumps(dataclasses.asdict(result)), flush=True)
    mx.clear_streams()


if __name__ == "__main__":
    main()
