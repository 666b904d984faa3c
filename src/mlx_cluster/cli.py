"""The `mlx-cluster` command: one subcommand a module."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from mlx_cluster import coordinator_cmd, models_cmd, plan_cmd, status_cmd, up_cmd, worker_cmd
from mlx_cluster.contract.progress import PROGRESS_ENV


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-cluster", description="Run one model across several machines with MLX."
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw progress bars (fetching, importing, loading) even when stdout is not a "
        "terminal, or never (--no-progress); default: on a terminal",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    worker_cmd.add_parser(sub)
    coordinator_cmd.add_parser(sub)
    up_cmd.add_parser(sub)
    plan_cmd.add_parsers(sub)
    models_cmd.add_parser(sub)
    status_cmd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.progress is not None:  # the processes this one starts inherit it
        os.environ[PROGRESS_ENV] = "1" if args.progress else "0"
    runners = {
        "worker": worker_cmd.run,
        "coordinator": coordinator_cmd.run,
        "up": up_cmd.run,
        "plan": plan_cmd.run,
        "config": plan_cmd.run,
        "models": models_cmd.run,
        "status": status_cmd.run,
    }
    try:
        return runners[args.command](args)
    finally:
        import mlx.core as mx

        mx.clear_streams()  # MLX's streams must go before the interpreter does
