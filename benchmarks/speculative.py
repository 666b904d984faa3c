"""`python -m benchmarks.speculative`: speculative decoding against plain decoding, one run.

Prompt lookup drafts (a request's own tokens), and with --draft-model a draft
model's, verified in one traversal of the pipeline, against the same pipeline
without drafts and against single-process mlx-lm without them, on the same
weights and the same chat prompts: one that
asks to copy code (drafts should be accepted) and one with nothing to copy
(benchmarks/speculative_workloads.py). Greedy, so every engine must give the
same tokens; the speculative runs are checked against the pipeline's plain run
(exit 1 if they differ). Prints a table and writes everything to a JSON file.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import mlx.core as mx
from mlx_lm.utils import load_config, load_model, load_tokenizer

from benchmarks.baseline import timed_generate
from benchmarks.cluster import NO_PREFIX_CACHE, WORKER_ARGS, EventRecorder, timed_tokens
from benchmarks.host import OtherLoad, busy_warning
from benchmarks.models import DEFAULT_CACHE_DIR, SHAPES, ensure_model, ensure_successor_model
from benchmarks.pipeline import default_json_path, host_info, positive_ints, say
from benchmarks.speculative_workloads import (
    EDIT_EVERY,
    WORKLOADS,
    Measurement,
    Run,
    Sample,
    chat_prompts,
    mismatches,
    successor_prompts,
    summary,
    table,
)
from benchmarks.workload import WARMUP_NEW_TOKENS, Workload, decode_rate
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.contract.speculation import MAX_DRAFT_TOKENS, DraftStats, Speculation
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.coordinator.engine.startup import vocab_size
from mlx_cluster.local import TRANSPORTS, gpu_list, local_workers
from mlx_cluster.models.demo import DEMO_DTYPE, ensure_demo_model
from mlx_cluster.models.random_model import DTYPES
from mlx_cluster.models.short_steps import ShortStepAttention

QUICK_DEFAULTS = {"model_shape": "tiny", "dtype": "float32", "max_tokens": 24, "repeats": 1}
PREFILL_STEP = Workload.prefill_step_size  # mlx-lm's prompt chunk (the prompts fit in one)


# --- arguments ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.speculative", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--demo", action="store_true", help="the bundled demo model (the default)")
    p.add_argument("--model-shape", choices=sorted(SHAPES), help="a random-weight model instead")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="with --model-shape")
    p.add_argument("--bits", type=int, choices=[4, 8], default=None, help="with --model-shape")
    p.add_argument(
        "--successor",
        action="store_true",
        help="with --model-shape (unquantized): its successor model, which follows "
        "token t with t + 1, on token-id prompts that hold a run of ids to copy "
        "(benchmarks/models.py ensure_successor_model)",
    )
    p.add_argument(
        "--edit-every",
        type=int,
        default=EDIT_EVERY,
        help="with --successor: the copied run has an edit (a rejected draft) every this "
        "many ids (default: as often as the copy prompt renames its variable)",
    )
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="built models")
    p.add_argument("--workers", type=int, default=2, help="worker processes of the pipeline")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens at most per request")
    p.add_argument(
        "--num-draft-tokens",
        type=positive_ints,
        default=(4,),
        help="drafts per step, at most; several give a run each (per method), e.g. 2,4,8",
    )
    p.add_argument(
        "--draft-model",
        default=None,
        help="also draft with this model: a directory, or a --model-shape name built in the "
        "target's dtype and bits (same vocabulary as the target). A random-weight draft "
        "model's drafts are almost all rejected, which measures a rejected traversal's cost",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="measured runs per engine; the median is kept"
    )
    p.add_argument(
        "--ignore-eos", action="store_true", help="go on past end-of-sequence to --max-tokens"
    )
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="tcp",
        help="TCP loopback (default) or Unix sockets",
    )
    p.add_argument(
        "--gpus",
        type=gpu_list,
        default=(),
        help="GPU index for each worker, cycled (e.g. 0,1); default: all share what we see",
    )
    p.add_argument(
        "--short-step-attention",
        choices=get_args(ShortStepAttention),
        default=None,
        help="the workers' --short-step-attention (default: theirs, by backend)",
    )
    p.add_argument("--quick", action="store_true", help="tiny model, short lengths (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="results file (default under /tmp)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; --quick changes the defaults, explicit options still win."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo and args.model_shape:
        parser.error("--demo and --model-shape exclude each other")
    if args.edit_every < 2:
        parser.error(f"--edit-every must be at least 2, got {args.edit_every}")
    if args.quick:
        defaults = dict(QUICK_DEFAULTS)
        if args.demo:  # an explicit --demo wins over --quick's model
            del defaults["model_shape"], defaults["dtype"]
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    args.demo = args.model_shape is None
    if args.successor and (not args.model_shape or args.bits):
        parser.error("--successor needs a --model-shape and no --bits")
    if args.demo:  # the demo's activations are DEMO_DTYPE whatever --dtype says
        args.dtype, args.bits = DEMO_DTYPE, None
    if args.max_tokens < 2:
        parser.error(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if max(args.num_draft_tokens) > MAX_DRAFT_TOKENS:
        parser.error(f"--num-draft-tokens must be at most {MAX_DRAFT_TOKENS}")
    args.num_draft_tokens = tuple(sorted(set(args.num_draft_tokens)))
    return args


# --- measuring ----------------------------------------------------------------------


def draft_model_dir(args: argparse.Namespace, model_dir: Path) -> Path | None:
    """--draft-model's directory (a shape is built in the target's dtype and bits), checked
    to share the target's vocabulary; None without --draft-model."""
    if args.draft_model is None:
        return None
    theirs = vocab_size(load_config(model_dir))
    shape = SHAPES.get(args.draft_model)
    path = Path(args.draft_model).expanduser()
    if shape is None and not (path / "config.json").is_file():
        shapes = ", ".join(sorted(SHAPES))
        raise SystemExit(
            f"--draft-model {args.draft_model!r}: neither a model directory nor a shape ({shapes})"
        )
    mine = shape.vocab_size if shape else vocab_size(load_config(path))  # before building it
    if mine != theirs:
        raise SystemExit(
            f"--draft-model {args.draft_model!r} has a vocabulary of {mine} tokens, the model "
            f"{theirs}: drafts must come from the same tokenizer"
        )
    if shape:
        return ensure_model(args.draft_model, args.dtype, args.bits, args.cache_dir)
    return path


def _rate(stamps: list[float]) -> float:
    return decode_rate(stamps) if len(stamps) >= 2 else float("nan")


def measure_mlx_lm(
    model_dir: Path, prompts: dict[str, list[int]], stops: Sequence[int], args: argparse.Namespace
) -> list[Measurement]:
    """Single-process mlx-lm's greedy generate_step, in this process, before any worker.

    generate_step does not stop by itself: the tokens after a stop token are dropped,
    as the pipeline never makes them.
    """
    model, _ = load_model(model_dir)
    results = {name: Measurement(name, "mlx-lm", 0) for name in prompts}
    for prompt in prompts.values():
        timed_generate(model, prompt, WARMUP_NEW_TOKENS, PREFILL_STEP)
    for _ in range(args.repeats):
        for name, prompt in prompts.items():
            started, stamps, tokens = timed_generate(model, prompt, args.max_tokens, PREFILL_STEP)
            keep = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
            sample = Sample(tokens[:keep], stamps[0] - started, _rate(stamps[:keep]))
            results[name].samples.append(sample)
    del model
    gc.collect()
    mx.clear_cache()  # the pipeline runs must not share the host with these buffers
    return list(results.values())


async def measure_pipeline(
    model_dir: Path,
    draft_dir: Path | None,
    prompts: dict[str, list[int]],
    stops: Sequence[int],
    args: argparse.Namespace,
) -> list[Measurement]:
    """The pipeline over `args.workers` processes (worker i on GPU `args.gpus[i % len]` if
    given), without drafts and with each draft count: prompt lookup's, and the draft
    model's if `draft_dir` (loaded with the first worker).

    Runs alternate (every engine once, then again) so that a host's slow spell does
    not land on one engine alone.
    """
    methods = ["prompt_lookup"] + (["draft"] if draft_dir else [])
    engines = [("none", 0), *((m, k) for m in methods for k in args.num_draft_tokens)]
    results = {(n, m, k): Measurement(n, "pipeline", k, m) for n in prompts for m, k in engines}
    speculative = {"draft_model": str(draft_dir)} if draft_dir else {}
    attention = args.short_step_attention
    worker_args = [*WORKER_ARGS, *(["--short-step-attention", attention] if attention else [])]
    async with local_workers(
        args.workers, worker_args, transport=args.transport, gpus=args.gpus
    ) as processes:
        cluster = await Cluster.start(
            model_dir,
            [w.address for w in processes],
            batching={"prefill_chunk": PREFILL_STEP},
            speculative=speculative,
            kv=NO_PREFIX_CACHE,
        )
        try:
            recorder = EventRecorder([s.client.name for s in cluster.stages])
            cluster.events.subscribe(recorder)

            async def sample(name: str, method: str, k: int, max_tokens: int) -> Sample:
                draft = str(draft_dir) if method == "draft" else None
                spec = Speculation(method, k, draft) if k else Speculation()
                params = SamplingParams(max_tokens=max_tokens, speculative=spec)
                stats = DraftStats()
                recorder.clear()
                started, stamps, tokens, recoveries = await timed_tokens(
                    cluster, prompts[name], params, stops, stats
                )
                decode = recorder.decode(first=1) if len(recorder.steps) > 1 else None
                counts = (stats.drafted, stats.accepted, stats.traversals)
                rate = _rate(stamps)
                return Sample(tokens, stamps[0] - started, rate, *counts, decode, recoveries)

            for key in results:  # warm-up: every step shape once
                await sample(*key, 2 * WARMUP_NEW_TOKENS)
            for _ in range(args.repeats):
                for key, m in results.items():
                    m.samples.append(await sample(*key, args.max_tokens))
        finally:
            await cluster.close()
    return list(results.values())


async def measure(args: argparse.Namespace) -> Run:
    shape = (args.model_shape, args.dtype, args.bits, args.cache_dir)
    model_dir = ensure_demo_model() if args.demo else ensure_model(*shape)
    if args.successor:
        model_dir = ensure_successor_model(args.model_shape, args.dtype, args.cache_dir)
    tokenizer = load_tokenizer(model_dir, eos_token_ids=load_config(model_dir).get("eos_token_id"))
    prompts = (
        successor_prompts(vocab_size(load_config(model_dir)), args.edit_every)
        if args.successor
        else chat_prompts(tokenizer)
    )
    stops = [] if args.ignore_eos else sorted(tokenizer.eos_token_ids)
    sizes = ", ".join(f"{name}: {len(p)}" for name, p in prompts.items())
    say(f"model {model_dir}; prompt tokens {sizes}; stop tokens {stops}")
    draft_dir = draft_model_dir(args, model_dir)
    if draft_dir:
        say(f"draft model {draft_dir}")
    say(f"mlx-lm, single process, {args.repeats} run(s) per workload")
    with OtherLoad() as baseline_load:
        baseline = measure_mlx_lm(model_dir, prompts, stops, args)
    drafts = ", ".join(f"k={k}" for k in args.num_draft_tokens)
    gpus = f", GPUs {list(args.gpus)} per worker" if args.gpus else ""
    say(
        f"pipeline over {args.workers} worker process(es) on {args.transport}{gpus}: "
        f"no drafts, prompt lookup {drafts}{', draft model ' + drafts if draft_dir else ''}; "
        f"{args.repeats} run(s) each"
    )
    with OtherLoad() as pipeline_load:
        pipeline = await measure_pipeline(model_dir, draft_dir, prompts, stops, args)
    return Run(
        model_dir,
        draft_dir,
        {name: len(p) for name, p in prompts.items()},
        stops,
        [*baseline, *pipeline],
        {"mlx-lm": baseline_load.cores, "pipeline": pipeline_load.cores},
    )


# --- reporting ----------------------------------------------------------------------


def document(args: argparse.Namespace, run: Run, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document of a run, with its `summary` rows."""
    return {
        **host_info(),
        "model": {
            "shape": "demo" if args.demo else args.model_shape,
            "dtype": args.dtype,
            "bits": args.bits,
            "dir": str(run.model_dir),
        },
        "draft_model": {"arg": args.draft_model, "dir": str(run.draft_model_dir)}
        if run.draft_model_dir
        else None,
        "workloads": {"successor ids": successor_prompts.__doc__, "edit_every": args.edit_every}
        if args.successor
        else {name: {"text": text} for name, text in WORKLOADS.items()},
        "prompt_tokens": run.prompt_tokens,
        "stop_tokens": run.stop_tokens,
        "max_tokens": args.max_tokens,
        "workers": args.workers,
        "short_step_attention": args.short_step_attention,
        "transport": args.transport,
        "worker_gpus": list(args.gpus),
        "repeats": args.repeats,
        "statistic": "median_low of decode tok/s over the repeats",
        "other_load_cores": run.other_load_cores,
        "measurements": [
            {**dataclasses.asdict(m), "label": m.label, "median": dataclasses.asdict(m.median)}
            for m in run.measurements
        ],
        "summary": rows,
    }


def print_report(run: Run, rows: list[dict[str, Any]], repeats: int) -> None:
    statistic = f"median of {repeats} runs" if repeats > 1 else "one run"
    print(f"Greedy decode, {statistic} per engine (runs tok/s: each run, in order):")
    print(table(run))
    busy = busy_warning(run.other_load_cores.items())
    if busy:
        print(f"\n{busy}")
    for m in run.measurements:
        if any(s.recoveries for s in m.samples):
            print(f"warning: {m.workload} {m.label}: a worker failed and sessions were replayed")
    for row in rows:
        if not row["pipeline_vs_mlx_lm"]["tokens_equal"]:
            first = row["pipeline_vs_mlx_lm"]["first_difference"]
            print(
                f"warning: {row['workload']}: the pipeline differs from mlx-lm from token {first}"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = asyncio.run(measure(args))
    rows = summary(run)
    path = args.json or default_json_path("speculative")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document(args, run, rows), indent=2))
    print_report(run, rows, args.repeats)
    print(f"\nresults: {path}")
    mx.clear_streams()
    bad = mismatches(rows)
    if bad:
        banner = "!" * 78
        heading = "ERROR: speculative decoding changed the greedy tokens:"
        print(f"\n{banner}", heading, *(f"  {line}" for line in bad), banner, sep="\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
