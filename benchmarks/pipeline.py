"""`python -m benchmarks.pipeline`: the pipeline against single-process mlx-lm, on one machine.

One run, one model (random weights of a real shape, built once into a cache
directory), measured four ways:

1. the baseline: mlx-lm's generate_step on the whole model, in its own process;
2. a bare gRPC echo of the pipeline's message sizes: the floor of a hop;
3. the pipeline over 1, 2, 4... worker processes on this host, coordinator here;
4. peak memory of every process.

It prints tables (pipeline / baseline ratios, the decode step's breakdown on
the ring and prefill's per-hop breakdown, both against the echo) and writes
everything to a JSON file. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import platform
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

from benchmarks import echo
from benchmarks.baseline import run_in_subprocess
from benchmarks.cluster import ClusterResult, run_cluster
from benchmarks.host import OtherLoad, busy_warning
from benchmarks.models import DEFAULT_CACHE_DIR, SHAPES, ensure_model, parameter_count
from benchmarks.report import echo_table, engine_table, prefill_hop_table, step_table
from benchmarks.workload import EngineResult, Workload
from mlx_cluster import tensor
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.local import TRANSPORTS, gpu_list
from mlx_cluster.models.demo import DEMO_DTYPE, ensure_demo_model
from mlx_cluster.models.random_model import DTYPES
from mlx_cluster.worker.capabilities import detect

QUICK_DEFAULTS = {
    "model_shape": "tiny",
    "decode_tokens": 16,
    "prompt_lengths": (16, 64),
    "echo_iterations": 50,
}
MATCH_TOKENS = 8  # the pipeline's first tokens must equal the baseline's


# --- arguments ----------------------------------------------------------------------


def int_list(minimum: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for comma-separated integers, each at least `minimum`."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected integers like 1,2,4, got {text!r}") from exc
        if min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
        return values

    return parse


positive_ints = int_list(1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.pipeline", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--demo", action="store_true", help="the bundled demo model itself (not --model-shape)"
    )
    p.add_argument("--model-shape", choices=sorted(SHAPES), default="demo-135m")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--bits", type=int, choices=[4, 8], default=None, help="quantize weights")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="built models")
    p.add_argument(
        "--workers", type=positive_ints, default=(1, 2, 4), help="worker counts, e.g. 1,2,4"
    )
    p.add_argument("--decode-tokens", type=int, default=128, help="new tokens of the decode run")
    p.add_argument("--prompt-lengths", type=positive_ints, default=(128, 1024, 4096))
    p.add_argument(
        "--prefill-step-size",
        type=int,
        default=Workload.prefill_step_size,
        help="prompt chunk size, on both sides (default mlx-lm's)",
    )
    p.add_argument(
        "--cluster-prefill-step-size",
        type=int,
        default=None,
        help="the cluster's prompt chunk, if not --prefill-step-size (e.g. its own default, 512)",
    )
    p.add_argument("--echo-iterations", type=int, default=200, help="round trips per size")
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="tcp",
        help="workers and echo on TCP loopback (default) or Unix domain sockets",
    )
    p.add_argument(
        "--gpus",
        type=gpu_list,
        default=(),
        help="GPU index for each worker, cycled (e.g. 0,1); default: all share what we see",
    )
    p.add_argument("--worker-eval-every", type=int, default=None, help="the workers' --eval-every")
    p.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="one more flag for every worker, e.g. --worker-arg=--shared-memory-min-kb=0",
    )
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--skip-echo", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny model, short lengths (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="results file (default under /tmp)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; --quick changes the defaults, explicit options still win."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    if args.demo:  # the demo's activations are DEMO_DTYPE whatever --dtype says
        args.dtype, args.bits = DEMO_DTYPE, None
    if args.decode_tokens < 2:
        parser.error(f"--decode-tokens must be at least 2, got {args.decode_tokens}")
    if min(args.prompt_lengths) < 2:
        parser.error(f"prompt lengths must be at least 2, got {args.prompt_lengths}")
    return args


def eval_every_args(eval_every: int | None) -> list[str]:
    """The workers' `--eval-every` flag, or none (their default)."""
    return [] if eval_every is None else ["--eval-every", str(eval_every)]


def default_json_path(name: str = "results") -> Path:
    """Where a benchmark's results go unless told: <tmp>/benchmarks/<name>-<host>-<date>.json."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    host = socket.gethostname().split(".")[0]
    return Path(tempfile.gettempdir()) / "benchmarks" / f"{name}-{host}-{stamp}.json"


def host_info() -> dict[str, Any]:
    """Where and when a run took place, for the head of its JSON document."""
    caps = detect()
    return {
        "host": socket.gethostname(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "device": {"kind": caps.device_kind, "name": caps.device_name, "cpu_cores": caps.cpu_cores},
        "mlx_version": mx.__version__,
    }


# --- measuring ----------------------------------------------------------------------


def forward_request_bytes(tokens: int, hidden_size: int, dtype: mx.Dtype) -> int:
    """Serialized size of a prefill chunk's ForwardRequest: [1, tokens, hidden_size] hidden
    states from the coordinator."""
    request = pb.ForwardRequest(
        step_id=1, session_ids=[uuid.uuid4().hex], offsets=[4096], last_position_only=True
    )
    tensor.encode(mx.zeros((1, tokens, hidden_size), dtype=dtype), out=request.hidden)
    return request.ByteSize()


def ring_request_bytes(hidden_size: int, dtype: mx.Dtype) -> int:
    """Serialized size of the ForwardRequest one worker relays to the next in a decode step:
    [1, 1, hidden_size] hidden states, with the row's token for the last worker's sampling."""
    request = pb.ForwardRequest(
        step_id=1, session_ids=[uuid.uuid4().hex], offsets=[4096], sample=True
    )
    tensor.encode(mx.zeros((1, 1), dtype=mx.uint32), out=request.token_ids)
    tensor.encode(mx.zeros((1, 1, hidden_size), dtype=dtype), out=request.hidden)
    return request.ByteSize()


def message_sizes(workload: Workload, hidden_size: int, dtype: mx.Dtype) -> dict[str, int]:
    """Bytes of a decode step's relayed request and of each prompt length's (first) prefill
    chunk."""
    sizes = {"decode": ring_request_bytes(hidden_size, dtype)}
    for length in workload.prompt_lengths:
        chunk = min(length - 1, workload.cluster_chunk)
        sizes[f"prefill@{length}"] = forward_request_bytes(chunk, hidden_size, dtype)
    return sizes


def matching_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclasses.dataclass
class Run:
    """Everything one benchmark run measured."""

    model_dir: Path
    workload: Workload
    message_bytes: dict[str, int]
    baseline: EngineResult | None
    echo: list[echo.EchoResult]
    echo_other_load_cores: float
    pipelines: list[ClusterResult]


async def measure(args: argparse.Namespace) -> Run:
    """Build the model if needed and take every measurement, one after the other."""
    model_dir = (
        ensure_demo_model()
        if args.demo
        else ensure_model(args.model_shape, args.dtype, args.bits, args.cache_dir)
    )
    config = json.loads((model_dir / "config.json").read_text())
    workload = Workload(
        config["vocab_size"],
        args.decode_tokens,
        args.prompt_lengths,
        args.prefill_step_size,
        cluster_prefill_step_size=args.cluster_prefill_step_size,
    )
    sizes = message_sizes(workload, config["hidden_size"], DTYPES[args.dtype])
    count = parameter_count(model_dir)
    say(f"model {model_dir}" + (f" ({count / 1e6:.0f}M parameters)" if count else ""))
    say(f"prompt chunks: mlx-lm {workload.prefill_step_size}, cluster {workload.cluster_chunk}")
    baseline = None
    if not args.skip_baseline:
        say("baseline: single-process mlx-lm")
        with OtherLoad() as load:
            baseline = await run_in_subprocess(model_dir, workload)
        baseline.other_load_cores = load.cores
    echoes, echo_load = [], 0.0
    if not args.skip_echo:
        say(f"bare gRPC echo of {sorted(set(sizes.values()))} bytes on {args.transport}")
        with OtherLoad() as load:
            echoes = await echo.measure_in_subprocess(
                sorted(set(sizes.values())), args.echo_iterations, args.transport
            )
        echo_load = load.cores
    pipelines = []
    for count in args.workers:
        gpus = f", GPUs {list(args.gpus)} per worker" if args.gpus else ""
        say(f"pipeline over {count} worker process(es) on {args.transport}{gpus}")
        with OtherLoad() as load:
            result = await run_cluster(
                model_dir,
                count,
                workload,
                args.transport,
                args.gpus,
                [*eval_every_args(args.worker_eval_every), *args.worker_arg],
            )
        result.other_load_cores = load.cores
        pipelines.append(result)
    return Run(model_dir, workload, sizes, baseline, echoes, echo_load, pipelines)


def say(message: str) -> None:
    """A progress line, on stderr: stdout holds the report."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- reporting ----------------------------------------------------------------------


def summary(run: Run) -> list[dict[str, Any]]:
    """Per worker count: ratios to the baseline and to the echo, and the token check."""
    rows = []
    decode_echo = next(
        (e.mean_s for e in run.echo if e.message_bytes == run.message_bytes["decode"]), None
    )
    for r in run.pipelines:
        row: dict[str, Any] = {"workers": r.workers}
        if run.baseline is not None:
            b = run.baseline
            row["decode_ratio"] = r.decode_tokens_per_s / b.decode_tokens_per_s
            row["prefill_ratio"] = {
                p.prompt_tokens: p.tokens_per_s / q.tokens_per_s
                for p, q in zip(r.prefill, b.prefill, strict=True)
            }
            row["matching_tokens"] = matching_prefix(r.tokens, b.tokens)
        per_hop = r.decode.per_hop_s if r.decode else None
        if decode_echo and per_hop is not None:
            row["decode_per_hop_over_echo"] = per_hop / decode_echo
        rows.append(row)
    return rows


def document(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    """The JSON document of a run."""
    return {
        **host_info(),
        "model": {
            "shape": "demo" if args.demo else args.model_shape,
            "dtype": args.dtype,
            "bits": args.bits,
            "dir": str(run.model_dir),
            "parameters": parameter_count(run.model_dir),
        },
        "workload": dataclasses.asdict(run.workload),
        "transport": args.transport,
        "worker_gpus": list(args.gpus),
        "worker_eval_every": args.worker_eval_every,
        "worker_args": args.worker_arg,
        "message_bytes": run.message_bytes,
        "baseline": dataclasses.asdict(run.baseline) if run.baseline else None,
        "echo": [dataclasses.asdict(e) for e in run.echo],
        "echo_other_load_cores": run.echo_other_load_cores,
        "pipeline": [dataclasses.asdict(r) for r in run.pipelines],
        "summary": summary(run),
    }


def print_report(run: Run) -> None:
    print(engine_table(run.baseline, run.pipelines))
    print("\nDecode step on the ring (mean over steps 2..N):")
    print(step_table(run.baseline, run.pipelines, run.echo, run.message_bytes["decode"]))
    print("\nPrefill, per worker's hop, mean per chunk:")
    print(prefill_hop_table(run.pipelines, run.echo, run.message_bytes))
    if run.echo:
        print("\nBare gRPC echo round trips:")
        print(echo_table(run.echo))
    loads = [(e.label, e.other_load_cores) for e in [run.baseline, *run.pipelines] if e]
    loads.append(("echo", run.echo_other_load_cores))
    busy = busy_warning(loads)
    if busy:
        print(f"\n{busy}")
    for r in run.pipelines:
        if r.recoveries:
            print(
                f"warning: {r.label}: a worker failed and {r.recoveries} session(s) were replayed"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = asyncio.run(measure(args))
    path = args.json or default_json_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document(args, run), indent=2))
    print_report(run)
    print(f"\nresults: {path}")
    mx.clear_streams()
    if run.baseline is not None:
        for r in run.pipelines:
            same = matching_prefix(r.tokens, run.baseline.tokens)
            if same < min(MATCH_TOKENS, len(r.tokens)):
                print(f"error: {r.label} matches the baseline's first {same} tokens only")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
