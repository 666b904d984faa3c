"""`python -m benchmarks.worker_step`: a worker's decode compute against mlx-lm's, in one process.

Where does a pipeline's decode step lose time against single-process mlx-lm?
This takes the network and the other processes away: the same weights, in
this process, one decode step of B sessions at a time:

- mlx-lm, each step waited for (`mx.eval` of the logits), and mlx-lm
  overlapped as its generate loop runs it (the next step is built and queued
  while the current one computes; only possible when the next input is known
  in this process, which a pipeline stage never has);
- the worker's own step (`WorkerRuntime.forward`: batch caches, per-session
  offsets) over all layers, and over the layers split in two runtimes, one
  after the other, as two stages would run them.

Embedding and LM head are outside the worker's figures, inside mlx-lm's.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache
from mlx_lm.utils import load_model

from benchmarks.models import DEFAULT_CACHE_DIR, SHAPES, ensure_model
from benchmarks.pipeline import int_list, positive_ints
from benchmarks.report import text_table
from mlx_cluster.models.random_model import DTYPES
from mlx_cluster.models.slicing import load_edges
from mlx_cluster.worker.capabilities import detect
from mlx_cluster.worker.runtime import WorkerRuntime, WorkerSettings


def timed(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Mean seconds per call of `step` (which must wait for its own result)."""
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def mlx_lm_steps(path: Path, batch: int, prompt: int, warmup: int, steps: int) -> dict[str, float]:
    model, _ = load_model(path)
    tokens = mx.arange(batch * prompt, dtype=mx.uint32).reshape(batch, prompt) % 1000 + 5
    if batch == 1:
        cache = make_prompt_cache(model)
    else:
        cache = [BatchKVCache([0] * batch) for _ in model.layers]
    mx.eval(model(tokens, cache=cache))
    next_tokens = tokens[:, -1:]

    def synced() -> None:
        mx.eval(model(next_tokens, cache=cache))

    sync_s = timed(synced, warmup, steps)
    # mlx-lm's generate loop: queue step n+1 (fed by step n's lazy argmax) before waiting on n
    y = mx.argmax(model(next_tokens, cache=cache)[:, -1, :], axis=-1)[:, None]
    mx.async_eval(y)
    started = time.perf_counter()
    for _ in range(warmup + steps):
        if _ == warmup:
            started = time.perf_counter()
        following = mx.argmax(model(y, cache=cache)[:, -1, :], axis=-1)[:, None]
        mx.async_eval(following)
        y.item() if batch == 1 else y.tolist()
        y = following
    overlapped_s = (time.perf_counter() - started) / steps
    return {"mlx-lm, each step waited for": sync_s, "mlx-lm, overlapped": overlapped_s}


def worker_steps(
    path: Path,
    batch: int,
    prompt: int,
    warmup: int,
    steps: int,
    splits: list[tuple[int, int]],
    eval_every: int,
) -> float:
    edges = load_edges(path)
    runtimes = []
    for start, end in splits:
        runtime = WorkerRuntime(WorkerSettings(name=f"w{start}"), detect())
        runtime.load(str(path), start, end, 0, 0)
        assert runtime.layer_slice is not None
        runtime.layer_slice.eval_every = eval_every
        runtimes.append(runtime)
    ids = [f"s{i}" for i in range(batch)]
    for runtime in runtimes:
        for sid in ids:
            runtime.sessions.open(sid, 0)
    for i, sid in enumerate(ids):
        hidden = edges.embed(mx.arange(prompt, dtype=mx.uint32)[None] + i)
        for runtime in runtimes:
            hidden = runtime.forward([sid], hidden, [0], False)
    offsets = [prompt] * batch
    step_input = edges.embed(mx.full((batch, 1), 7, dtype=mx.uint32))
    mx.eval(step_input)

    def step() -> None:
        hidden = step_input
        for runtime in runtimes:
            hidden = runtime.forward(ids, hidden, offsets, True)
        for i in range(batch):
            offsets[i] += 1

    seconds = timed(step, warmup, steps)
    for runtime in runtimes:
        runtime.unload()
    return seconds


def released() -> None:
    """Free what the last measurement held before the next one loads its weights."""
    gc.collect()
    mx.clear_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker_step", description=__doc__)
    p.add_argument("--model-shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--bits", type=int, choices=[4, 8], default=None)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--batches", type=positive_ints, default=(1, 16))
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument(
        "--eval-every",
        type=int_list(0),
        default=(0,),
        help="worker variants: start computing every N layers (0: once, at the end)",
    )
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    path = ensure_model(args.model_shape, args.dtype, args.bits, args.cache_dir)
    layers = int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
    half = layers // 2
    results: dict[int, dict[str, float]] = {}
    for batch in args.batches:
        row = mlx_lm_steps(path, batch, args.prompt_tokens, args.warmup, args.steps)
        released()
        for every in args.eval_every:
            label = f", eval every {every}" if every else ""
            for name, splits in (
                ("all layers", [(0, layers)]),
                ("two halves in turn", [(0, half), (half, layers)]),
            ):
                row[f"worker, {name}{label}"] = worker_steps(
                    path, batch, args.prompt_tokens, args.warmup, args.steps, splits, every
                )
                released()
        results[batch] = row
    names = list(next(iter(results.values())))
    print(
        text_table(
            ["decode step ms", *(f"B={b}" for b in results)],
            [[name, *(f"{results[b][name] * 1e3:.2f}" for b in results)] for name in names],
        )
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(path), "seconds": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
