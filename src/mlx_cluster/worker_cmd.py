"""`mlx-cluster worker`: serve a slice of a model's layers over gRPC.

The cluster token comes from `--token-file` or else the environment variable
MLX_CLUSTER_AUTH__TOKEN (never a flag, so it stays out of `ps`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import socket
import sys

from mlx_cluster.contract.auth import TOKEN_ENV, TlsFiles, load_secret
from mlx_cluster.contract.config import ConfigError
from mlx_cluster.contract.logs import setup_logging


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="serve a slice of a model's layers over gRPC")
    p.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        help="HOST:PORT (port 0 picks one), or unix:PATH for a Unix domain socket (same host)",
    )
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
    p.add_argument("--max-sessions", type=int, default=256, help="sessions open at once")
    p.add_argument(
        "--max-message-mb",
        type=int,
        default=256,
        help="largest gRPC message (match the coordinator)",
    )
    p.add_argument(
        "--eval-every",
        type=non_negative_int,
        default=None,
        help="start computing a step every N layers while the rest is built, so the GPU "
        "works while Python builds (0: once, at the end; default 4)",
    )
    p.add_argument(
        "--token-file",
        default=None,
        help=f"file holding the cluster token every call must carry (else ${TOKEN_ENV})",
    )
    p.add_argument("--tls-cert", default=None, help="serve TLS with this certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="the private key of --tls-cert (PEM)")
    p.add_argument(
        "--tls-ca", default=None, help="require client certificates signed by this CA (mutual TLS)"
    )
    add_logging_flags(p)


def add_logging_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    p.add_argument("--log-format", choices=["text", "json"], default=None, help="default text")
    p.add_argument("--log-file", default=None, help="also append log lines to this file")


def _tls(args: argparse.Namespace) -> TlsFiles | None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if args.tls_ca and not args.tls_cert:
        raise ConfigError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key too")
    return TlsFiles(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None


def run(args: argparse.Namespace) -> int:
    from mlx_cluster.worker.runtime import WorkerSettings
    from mlx_cluster.worker.server import serve

    setup_logging(args.name, args.log_level or "INFO", args.log_format or "text", args.log_file)
    settings = WorkerSettings(
        name=args.name,
        kv_budget_tokens=args.kv_budget_tokens,
        session_ttl_s=args.session_ttl,
        max_sessions=args.max_sessions,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
    )
    if args.eval_every is not None:
        settings = dataclasses.replace(settings, eval_every=args.eval_every)
    try:
        token = load_secret(os.environ.get(TOKEN_ENV), args.token_file, "--token-file")
        asyncio.run(serve(args.listen, settings, token=token, tls=_tls(args)))
    except ConfigError as exc:  # unreadable token or TLS files, too long a socket path
        print(f"mlx-cluster worker: {exc}", file=sys.stderr)
        return 2
    return 0
