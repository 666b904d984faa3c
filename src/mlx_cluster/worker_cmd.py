"""`mlx-cluster worker`: serve a slice of a model's layers over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import socket

from contract.logs import setup_logging


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="serve a slice of a model's layers over gRPC")
    p.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (port 0 picks one)")
    p.add_argument("--name", default=socket.gethostname(), help="name shown in /health and logs")
    p.add_argument(
        "--kv-budget-tokens",
        type=int,
        default=65_536,
        help="cached tokens over all sessions, unless the coordinator sets it",
    )
    p.add_argument(
        "--session-ttl", type=float, default=600.0, help="seconds an idle session keeps its cache"
    )
    add_logging_flags(p)


def add_logging_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    p.add_argument("--log-format", choices=["text", "json"], default=None, help="default text")
    p.add_argument("--log-file", default=None, help="also append log lines to this file")


def run(args: argparse.Namespace) -> int:
    from worker.runtime import WorkerSettings
    from worker.server import serve

    setup_logging(args.name, args.log_level or "INFO", args.log_format or "text", args.log_file)
    settings = WorkerSettings(
        name=args.name, kv_budget_tokens=args.kv_budget_tokens, session_ttl_s=args.session_ttl
    )
    asyncio.run(serve(args.listen, settings))
    return 0
