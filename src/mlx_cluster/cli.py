"""The `mlx-cluster` command: one subcommand a module."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mlx_cluster import coordinator_cmd, models_cmd, plan_cmd, up_cmd, worker_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-cluster", description="Run one model across several machines with MLX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    worker_cmd.add_parser(sub)
    coordinator_cmd.add_parser(sub)
    up_cmd.add_parser(sub)
    plan_cmd.add_parsers(sub)
    models_cmd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runners = {
        "worker": worker_cmd.run,
        "coordinator": coordinator_cmd.run,
        "up": up_cmd.run,
        "plan": plan_cmd.run,
        "config": plan_cmd.run,
        "models": models_cmd.run,
    }
    try:
        return runners[args.command](args)
    finally:
        import mlx.core as mx

        mx.clear_streams()  # MLX's streams must go before the interpreter does
