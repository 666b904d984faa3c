"""`mlx-cluster coordinator`: plan over running workers, load them, serve HTTP."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from mlx_cluster.contract.logs import setup_logging
from mlx_cluster.plan_cmd import cli_overrides
from mlx_cluster.worker_cmd import add_logging_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("coordinator", help="plan, load the workers, serve the HTTP API")
    p.add_argument("--config", type=Path, default=None, help="cluster YAML file")
    p.add_argument("--model", default=None, help="model directory (overrides `model`)")
    p.add_argument(
        "--worker",
        action="append",
        default=[],
        dest="workers",
        help="worker HOST:PORT in layer order, repeated (overrides `workers`)",
    )
    p.add_argument(
        "--discover",
        action="store_true",
        help="find the workers on the local network (mDNS) instead of `workers`; they are "
        "sent the weights of their slices (as `workers: auto`)",
    )
    p.add_argument(
        "--expect",
        type=int,
        default=None,
        metavar="N",
        help="with --discover: start once N workers answer (discovery.expected_workers)",
    )
    p.add_argument(
        "--listen", default=None, help="HTTP HOST:PORT (overrides coordinator.http_listen)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any setting"
    )
    add_logging_flags(p)


def run(args: argparse.Namespace) -> int:
    from mlx_cluster.contract.auth import load_api_keys
    from mlx_cluster.contract.config import ConfigError
    from mlx_cluster.contract.config_loader import load_config
    from mlx_cluster.contract.errors import ClusterError
    from mlx_cluster.contract.plan import PlanError
    from mlx_cluster.coordinator.engine.startup import StartupError, start_from_config
    from mlx_cluster.models.sources import ModelNotAvailable
    from mlx_cluster.serving import serve_http

    try:
        overrides = cli_overrides(args)  # a malformed --set is a ConfigError too
        if args.workers:
            overrides["workers"] = ",".join(args.workers)
        if args.discover:
            overrides["discovery.enabled"] = "true"
        if args.expect is not None:
            overrides["discovery.expected_workers"] = str(args.expect)
        if args.listen:
            overrides["coordinator.http_listen"] = args.listen
        config = load_config(args.config, cli=overrides).config
        api_keys = load_api_keys(config.auth.api_keys, config.auth.api_keys_file)
    except ConfigError as exc:
        print(f"mlx-cluster coordinator: {exc}", file=sys.stderr)
        return 2
    setup_logging(
        "coordinator",
        args.log_level or config.logging.level,
        args.log_format or config.logging.format,
        args.log_file or config.logging.file,
    )

    async def main() -> int:
        try:
            cluster = await start_from_config(config)
        except (ModelNotAvailable, PlanError, StartupError) as exc:  # the spec cannot run
            print(f"mlx-cluster coordinator: {exc}", file=sys.stderr)
            return 2
        except ClusterError as exc:  # workers unreachable, refusing the token, ...
            print(f"mlx-cluster coordinator: cannot start: {exc}", file=sys.stderr)
            return 1
        try:
            await serve_http(cluster, api_keys)
        finally:
            await cluster.close()
        return 0

    return asyncio.run(main())
