"""`mlx-cluster worker`: serve a slice of a model's layers over gRPC.

The cluster token comes from `--token-file` or else the environment variable
MLX_CLUSTER_AUTH__TOKEN (never a flag, so it stays out of `ps`). The settings
flags default to None: WorkerSettings holds the defaults and checks what is given.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from typing import NamedTuple

from pydantic import ValidationError

from mlx_cluster.contract.auth import TOKEN_ENV, TlsFiles, load_secret
from mlx_cluster.contract.config import ConfigError
from mlx_cluster.contract.logs import setup_logging
from mlx_cluster.worker.settings import MIB, WorkerSettings


class SettingFlag(NamedTuple):
    """A flag that sets one WorkerSettings field."""

    flag: str
    field: str
    type: type[int] | type[float] | type[str]
    unit: int  # the field's value for 1 of the flag's (MiB -> bytes)
    help: str


SETTING_FLAGS = (
    SettingFlag(
        "--kv-budget-tokens",
        "kv_budget_tokens",
        int,
        1,
        "cached tokens over all sessions, unless the coordinator sets it",
    ),
    SettingFlag(
        "--session-ttl",
        "session_ttl_s",
        float,
        1,
        "seconds an idle session keeps its cache, unless the coordinator sets it",
    ),
    SettingFlag("--max-sessions", "max_sessions", int, 1, "sessions open at once"),
    SettingFlag("--max-batch", "max_batch", int, 1, "sessions in one Forward step"),
    SettingFlag(
        "--max-message-mb",
        "max_message_bytes",
        int,
        MIB,
        "largest gRPC message in MiB (match the coordinator's limits.max_message_mb)",
    ),
    SettingFlag(
        "--eval-every",
        "eval_every",
        int,
        1,
        "start computing a step every N layers while the rest is built, so the GPU "
        "works while Python builds (0: once, at the end)",
    ),
    SettingFlag(
        "--short-step-attention",
        "short_step_attention",
        str,
        1,
        "how steps of a few positions (a turn's new tokens, a verification) attend: "
        "fused (as mlx-lm), whole_buffer (shapes that repeat) or padded (to a power of two, "
        "composed attention: CUDA's default)",
    ),
    SettingFlag(
        "--shared-memory-min-kb",
        "shared_memory_min_bytes",
        int,
        1024,
        "hidden states of at least this many KiB go to a next worker on this host through "
        "shared memory (0: never)",
    ),
    SettingFlag(
        "--lease-grace-s",
        "lease_grace_s",
        float,
        1,
        "seconds the sessions of a coordinator whose connection is lost wait for it to return",
    ),
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="serve a slice of a model's layers over gRPC")
    p.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        help="HOST:PORT (port 0 picks one), or unix:PATH for a Unix domain socket (same host)",
    )
    p.add_argument("--name", default=socket.gethostname(), help="name shown in /health and logs")
    for setting in SETTING_FLAGS:
        default = WorkerSettings.model_fields[setting.field].default
        shown = default // setting.unit if setting.unit > 1 else default
        shown = "by backend" if default is None else shown
        p.add_argument(
            setting.flag,
            dest=setting.field,
            metavar=setting.flag.removeprefix("--").replace("-", "_").upper(),
            type=setting.type,
            default=None,
            help=f"{setting.help} (default {shown})",
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
    p.add_argument(
        "--advertise",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="advertise this worker on the local network (mDNS) for `coordinator --discover` "
        "(default: unless it listens on loopback or a Unix socket)",
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


def settings_from(args: argparse.Namespace) -> WorkerSettings:
    """WorkerSettings from the flags given, and the schema's defaults for the others.

    Raises:
        ConfigError: values out of range, one line each, naming the flag.
    """
    given = {
        s.field: getattr(args, s.field) * s.unit
        for s in SETTING_FLAGS
        if getattr(args, s.field) is not None
    }
    try:
        return WorkerSettings(name=args.name, **given)
    except ValidationError as exc:
        flags = {s.field: s.flag for s in SETTING_FLAGS}
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0])
            got = f"{field} = {error['input']!r}"
            problems.append(f"{flags.get(field, '--' + field)}: {error['msg']} (got {got})")
        raise ConfigError("\n".join(problems)) from exc


def run(args: argparse.Namespace) -> int:
    from mlx_cluster.worker.server import serve

    setup_logging(args.name, args.log_level or "INFO", args.log_format or "text", args.log_file)
    try:
        settings = settings_from(args)
        token = load_secret(os.environ.get(TOKEN_ENV), args.token_file, "--token-file")
        asyncio.run(serve(args.listen, settings, token, _tls(args), args.advertise))
    except ConfigError as exc:  # bad settings, unreadable token or TLS files, too long a path
        print(f"mlx-cluster worker: {exc}", file=sys.stderr)
        return 2
    return 0
