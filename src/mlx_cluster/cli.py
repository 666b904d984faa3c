"""`mlx-cluster` subcommands: worker, up."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_cluster.logs import setup_logging

if TYPE_CHECKING:
    from coordinator.cluster import Cluster

log = logging.getLogger("mlx_cluster")


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="serve a slice of a model's layers over gRPC")
    p.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (port 0 picks one)")
    p.add_argument("--name", default=socket.gethostname(), help="name shown in /health and logs")
    p.add_argument(
        "--kv-budget-tokens",
        type=int,
        default=65_536,
        help="cached tokens over all sessions, unless LoadLayers sets it",
    )
    p.add_argument(
        "--session-ttl", type=float, default=600.0, help="seconds an idle session keeps its cache"
    )
    p.add_argument("--log-level", default="INFO")


def _add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run a whole cluster on this host")
    p.add_argument(
        "--model", type=Path, default=None, help="model directory (default: the bundled demo model)"
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes to start")
    p.add_argument(
        "--layers",
        default=None,
        help="layers per worker, comma-separated (e.g. 1,5,2); default even",
    )
    p.add_argument("--prompt", default=None, help="answer this prompt and exit (else serve HTTP)")
    p.add_argument("--listen", default="127.0.0.1:8100", help="HTTP address when serving")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--no-chat-template",
        action="store_true",
        help="send the prompt as raw text, not as a chat message",
    )
    p.add_argument("--log-level", default="WARNING")


def _add_coordinator(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("coordinator", help="serve the HTTP API over running workers")
    p.add_argument("--model", type=Path, required=True, help="model directory")
    p.add_argument(
        "--worker",
        action="append",
        required=True,
        dest="workers",
        help="worker HOST:PORT, in layer order; repeat for each worker",
    )
    p.add_argument(
        "--layers", default=None, help="layers per worker, comma-separated; default even"
    )
    p.add_argument("--listen", default="127.0.0.1:8100", help="HTTP HOST:PORT")
    p.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_worker(sub)
    _add_up(sub)
    _add_coordinator(sub)
    return parser


# --- worker ----------------------------------------------------------------------


def run_worker(args: argparse.Namespace) -> int:
    from worker.runtime import WorkerSettings
    from worker.server import serve

    setup_logging(args.name, args.log_level)
    settings = WorkerSettings(
        name=args.name, kv_budget_tokens=args.kv_budget_tokens, session_ttl_s=args.session_ttl
    )
    asyncio.run(serve(args.listen, settings))
    return 0


# --- up --------------------------------------------------------------------------


def _resolve_model(model: Path | None) -> Path:
    if model is not None:
        return model
    from models.demo import ensure_demo_model

    return ensure_demo_model()


async def _answer(args: argparse.Namespace, model: Path) -> int:
    from coordinator.cluster import Cluster
    from coordinator.sampling import SamplingParams
    from mlx_cluster.local import local_workers

    counts = _layer_counts(args.layers, args.workers)
    async with local_workers(args.workers, ["--log-level", args.log_level]) as workers:
        cluster = await Cluster.start(model, [w.address for w in workers], counts)
        try:
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
                    log.warning(
                        "%d prompt + %d generated tokens, %.1f tok/s, first token %.0f ms",
                        perf.prompt_tokens,
                        perf.completion_tokens,
                        perf.tokens_per_second,
                        perf.ttft_s * 1000,
                    )
        finally:
            await cluster.close()
    return 0


def _layer_counts(layers: str | None, workers: int) -> list[int] | None:
    if not layers:
        return None
    counts = [int(n) for n in layers.split(",")]
    if len(counts) != workers:
        raise SystemExit(f"--layers gives {len(counts)} counts for {workers} workers")
    return counts


async def _serve_http(cluster: Cluster, listen: str) -> None:
    """Serve the HTTP API until SIGINT/SIGTERM, then let requests in flight finish."""
    from coordinator.app import create_app
    from coordinator.http_server import HttpServer

    host, port = listen.rsplit(":", 1)
    server = HttpServer(create_app(cluster), host, int(port))
    await server.start()
    log.warning("serving %s on %s", cluster.model_id, server.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait(
        [waiter, asyncio.ensure_future(server.wait())], return_when="FIRST_COMPLETED"
    )
    await server.stop()


async def _up_serve(args: argparse.Namespace, model: Path) -> int:
    from coordinator.cluster import Cluster
    from mlx_cluster.local import local_workers

    counts = _layer_counts(args.layers, args.workers)
    async with local_workers(args.workers, ["--log-level", args.log_level]) as workers:
        cluster = await Cluster.start(model, [w.address for w in workers], counts)
        try:
            await _serve_http(cluster, args.listen)
        finally:
            await cluster.close()
    return 0


def run_up(args: argparse.Namespace) -> int:
    setup_logging("up", args.log_level)
    model = _resolve_model(args.model)
    if args.prompt is None:
        return asyncio.run(_up_serve(args, model))
    return _run_until_signal(_answer(args, model))


def run_coordinator(args: argparse.Namespace) -> int:
    from coordinator.cluster import Cluster

    setup_logging("coordinator", args.log_level)

    async def main() -> int:
        counts = _layer_counts(args.layers, len(args.workers))
        cluster = await Cluster.start(args.model, args.workers, counts)
        try:
            await _serve_http(cluster, args.listen)
        finally:
            await cluster.close()
        return 0

    return asyncio.run(main())


def _run_until_signal(main: Coroutine[Any, Any, int]) -> int:
    """Run a coroutine; SIGTERM cancels it like Ctrl-C so cleanup code runs."""

    async def wrapper() -> int:
        task = asyncio.ensure_future(main)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            return 130

    return asyncio.run(wrapper())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        return run_worker(args)
    if args.command == "coordinator":
        return run_coordinator(args)
    return run_up(args)
