"""`mlx-cluster plan` and `mlx-cluster config show`: look at a configuration, load nothing.

`plan` sizes the model from its config.json and safetensors headers and takes
each worker's memory from the config's `memory_gb`, so it runs on any machine.
The model is found as every command finds it (`resolve_model`), with the shards of
its embedding, norm and head, whose sizes count against the first and last worker.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mlx_cluster.contract.config import ClusterConfig, ConfigError
from mlx_cluster.contract.config_loader import LoadedConfig, load_config, render_config
from mlx_cluster.contract.plan import GB, PlanError, WorkerCapacity, plan_for_config
from mlx_cluster.contract.plan_report import render_plan


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the `plan` and `config` subcommands to the `mlx-cluster` parser."""
    p = sub.add_parser("plan", help="print which worker gets which layers, loading no weights")
    p.add_argument("--config", type=Path, required=True, help="cluster YAML file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_overrides(p)
    c = sub.add_parser("config", help="inspect the configuration")
    show_sub = c.add_subparsers(dest="config_command", required=True)
    s = show_sub.add_parser("show", help="print the effective configuration and its sources")
    s.add_argument("--config", type=Path, default=None, help="cluster YAML file")
    _add_overrides(s)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="model directory, name from `mlx-cluster models list`, or Hugging Face id "
        "(overrides `model`)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting by its dotted name, e.g. kv.max_session_tokens=4096",
    )


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted-key overrides given on the command line (`--model`, `--set K=V`)."""
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value
    if args.model is not None:
        overrides["model"] = args.model
    return overrides


def capacities_from_config(config: ClusterConfig) -> list[WorkerCapacity]:
    """Each worker's capacity from its `memory_gb` and `compute` (default: its memory).

    Raises:
        PlanError: if a worker has no `memory_gb`; the live path asks running workers.
    """
    missing = [f"workers[{i}] ({w.label})" for i, w in enumerate(config.workers) if not w.memory_gb]
    if missing:
        raise PlanError(
            f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no memory_gb: "
            "`mlx-cluster plan` needs memory_gb for every worker (or running workers to ask, "
            "which the coordinator does at start-up)"
        )
    return [
        WorkerCapacity(
            name=w.label,
            memory_bytes=int((w.memory_gb or 0) * GB),
            compute=w.compute or (w.memory_gb or 0),
        )
        for w in config.workers
    ]


def _plan(loaded: LoadedConfig, as_json: bool) -> str:
    from mlx_cluster.models.inspect import model_facts
    from mlx_cluster.models.sources import resolve_model

    if loaded.config.discovery.enabled:
        raise PlanError(
            "workers: auto finds the workers when the coordinator starts, which logs its plan; "
            "to plan ahead, list the workers with their memory_gb"
        )
    facts = model_facts(resolve_model(loaded.config.model, edges=True))
    plan = plan_for_config(facts, loaded.config, capacities_from_config(loaded.config))
    return render_plan(plan, json=as_json)


def run(args: argparse.Namespace) -> int:
    """Run `plan` or `config show`; problems go to stderr with exit status 2."""
    try:
        loaded = load_config(args.config, cli=cli_overrides(args))
        if args.command == "plan":
            print(_plan(loaded, args.json))
        else:
            print(render_config(loaded))
    except (ValueError, OSError) as exc:  # ConfigError, PlanError, unknown or unreadable model
        print(f"mlx-cluster {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0
