"""`mlx-cluster up`: N workers on this host plus the coordinator, in one command.

The workers listen on Unix domain sockets in a private temporary directory
(`--transport tcp`: on 127.0.0.1), and every call carries a fresh cluster token.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from pathlib import Path

from mlx_cluster.contract.auth import TOKEN_ENV
from mlx_cluster.contract.logs import setup_logging
from mlx_cluster.local import TRANSPORTS, gpu_list
from mlx_cluster.worker_cmd import add_logging_flags

log = logging.getLogger("mlx_cluster")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run a whole cluster on this host")
    p.add_argument(
        "--model",
        default=None,
        help="model directory, name from `mlx-cluster models list`, or Hugging Face id "
        "(default: the bundled demo model)",
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes to start")
    p.add_argument(
        "--layers",
        type=layer_counts,
        default=None,
        help="layers per worker, comma-separated (e.g. 1,5,2); default an even split",
    )
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="unix",
        help="how the coordinator reaches the workers: Unix domain sockets in a private "
        "temporary directory (default), or TCP on 127.0.0.1",
    )
    p.add_argument(
        "--gpus",
        type=gpu_list,
        default=(),
        help="GPU index for each worker, cycled (e.g. 0,1: CUDA hosts with several GPUs); "
        "default: every worker sees every GPU",
    )
    p.add_argument("--prompt", default=None, help="answer this prompt and exit (else serve HTTP)")
    p.add_argument(
        "--listen", default=None, help="HTTP address when serving (default 127.0.0.1:8100)"
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=None,
        help="on SIGTERM, seconds requests in flight may take before they end with an error "
        "(default 30)",
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--no-chat-template", action="store_true", help="send the prompt as raw text, not as chat"
    )
    add_logging_flags(p)


def layer_counts(text: str) -> list[int]:
    """`--layers 1,5,2` as [1, 5, 2]: positive layer counts."""
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        message = f"expected layer counts like 1,5,2, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"every worker needs at least 1 layer, got {text!r}")
    return counts


async def _answer(args: argparse.Namespace, cluster: object) -> None:
    from mlx_cluster.contract.sampling import SamplingParams
    from mlx_cluster.coordinator.engine.cluster import Cluster

    assert isinstance(cluster, Cluster)
    chat = not args.no_chat_template and cluster.tokenizer.chat_template is not None
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    log.info("generating up to %d tokens", args.max_tokens)
    async for chunk in cluster.generate(args.prompt, params, chat=chat):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        if chunk.performance is not None:
            perf = chunk.performance
            sys.stdout.write("\n")
            sys.stdout.flush()
            log.warning(
                "%d prompt + %d generated tokens, %.1f tok/s, first token %.0f ms",
                perf.prompt_tokens,
                perf.completion_tokens,
                perf.tokens_per_second,
                perf.ttft_s * 1000,
            )


async def _up(args: argparse.Namespace, model: Path) -> int:
    from mlx_cluster.coordinator.engine.cluster import Cluster
    from mlx_cluster.coordinator.engine.startup import local_spec
    from mlx_cluster.local import local_workers
    from mlx_cluster.serving import serve_http

    worker_args = ["--log-level", args.log_level or "WARNING"]
    token = secrets.token_urlsafe(32)  # a new cluster token each run, even on loopback
    async with local_workers(
        args.workers,
        worker_args,
        env={TOKEN_ENV: token},
        transport=args.transport,
        gpus=args.gpus,
    ) as workers:
        coordinator = {"http_listen": args.listen, "shutdown_grace_s": args.shutdown_grace}
        spec = local_spec(
            model,
            [w.address for w in workers],
            args.layers,
            auth={"token": token},
            coordinator={k: v for k, v in coordinator.items() if v is not None},
        )
        cluster = await Cluster.from_config(spec)
        try:
            if args.prompt is not None:
                await _answer(args, cluster)
            else:
                await serve_http(cluster)
        finally:
            await cluster.close()
    return 0 if workers.clean_exit else 1


def run(args: argparse.Namespace) -> int:
    from mlx_cluster.serving import run_until_signal

    setup_logging("up", args.log_level or "WARNING", args.log_format or "text", args.log_file)
    if args.layers is not None and len(args.layers) != args.workers:
        print(
            f"mlx-cluster up: --layers gives {len(args.layers)} counts for {args.workers} workers",
            file=sys.stderr,
        )
        return 2
    from mlx_cluster.models.demo import DEMO_MODEL_NAME
    from mlx_cluster.models.sources import EVERY_LAYER, ModelNotAvailable, resolve_model

    try:
        model = resolve_model(args.model or DEMO_MODEL_NAME, layers=EVERY_LAYER, edges=True)
    except ModelNotAvailable as exc:
        print(f"mlx-cluster up: {exc}", file=sys.stderr)
        return 2
    return run_until_signal(_up(args, model))
