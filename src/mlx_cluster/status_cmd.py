"""`mlx-cluster status [URL]`: the cluster map as a table, from a coordinator's `/health`.

Workers in chain order, each with its layers drawn to scale over the model's depth, its
status (serving, loading, down), device, memory, KV use, prefix cache, sessions and
last round trip. Exits 0 when every worker serves, 1 when not, 2 when the coordinator
cannot be asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console
from rich.filesize import decimal
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:8100"
URL_ENV = "MLX_CLUSTER_URL"  # the launcher's variable for the coordinator's address
REQUEST_TIMEOUT_S = 10.0
DEPTH_WIDTH = 24  # characters of the layers' drawing
STATUS_WORDS = {"ok": "serving", "not_loaded": "loading", "unavailable": "down"}
STATUS_STYLES = {"ok": "green", "not_loaded": "yellow", "unavailable": "bold red"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="the cluster map of a running coordinator, as a table")
    p.add_argument(
        "url", nargs="?", help=f"the coordinator (default: ${URL_ENV}, else {DEFAULT_URL})"
    )
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")


def fetch_health(url: str, api_key: str | None) -> dict[str, Any]:
    """The coordinator's /health body (its 503 too: a cluster not all serving)."""
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{url.rstrip('/')}/health", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
            body: dict[str, Any] = json.load(reply)
    except urllib.error.HTTPError as reply:
        if reply.code != 503:
            raise
        body = json.load(reply)
    return body


def depth_drawing(layers: list[int], total: int) -> str:
    """`layers` [start, end) of `total` drawn to scale, e.g. `······████████··········`."""
    start = round(layers[0] / total * DEPTH_WIDTH)
    end = max(round(layers[1] / total * DEPTH_WIDTH), start + 1)
    return "·" * start + "█" * (end - start) + "·" * (DEPTH_WIDTH - end)


def cluster_table(health: dict[str, Any]) -> Table:
    """The cluster map: a row a worker, in chain order."""
    workers = health["workers"]
    total = max(w["layers"][1] for w in workers)
    table = Table(title=f"{health['model']}: {health['status']}, {total} layers")
    table.add_column("worker")
    table.add_column("layers", no_wrap=True)
    table.add_column(f"0 … {total}", no_wrap=True, min_width=DEPTH_WIDTH)
    for column in ("status", "device", "memory"):
        table.add_column(column)
    for column in ("KV tokens", "prefixes", "sessions", "round trip"):
        table.add_column(column, justify="right")
    for w in workers:
        status = w["status"]
        cells = [
            f"{w['name']}\n[dim]{w['address']}[/dim]",
            f"[{w['layers'][0]}, {w['layers'][1]})",
            depth_drawing(w["layers"], total),
            f"[{STATUS_STYLES.get(status, '')}]{STATUS_WORDS.get(status, status)}[/]",
        ]
        if "device" in w:
            memory, kv = w["memory"], w["kv_tokens"]
            trip = w["last_round_trip_ms"]
            cells += [
                f"{w['device']['kind']} {w['device']['name']}",
                f"{decimal(memory['weight_bytes'])} weights\n"
                f"{decimal(memory['available_bytes'])} / {decimal(memory['total_bytes'])} free",
                f"{kv['used']} / {kv['capacity']}",
                decimal(w["prefix_cache"]["bytes"]),
                str(w["sessions_open"]),
                "-" if trip is None else f"{trip:.1f} ms",
            ]
        else:
            cells += [f"[red]{w.get('error', '')}[/red]", "", "", "", "", ""]
        table.add_row(*cells)
    return table


def run(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    try:
        health = fetch_health(url, args.api_key)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"mlx-cluster status: cannot ask {url}/health: {exc}", file=sys.stderr)
        return 2
    console = Console()
    console.print(cluster_table(health))
    for standby in health.get("standby", []):
        console.print(f"standby: {standby['name']} ({standby['address']})")
    return 0 if health["status"] == "ok" else 1
