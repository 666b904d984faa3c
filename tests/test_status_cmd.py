"""`mlx-cluster status URL`: the cluster map as a table, against a real running app
(API keys on), before and after a worker goes down."""

from __future__ import annotations

import asyncio

import pytest

from mlx_cluster.cli import build_parser
from mlx_cluster.status_cmd import run

API_KEY = "sk-status"


async def status(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """The command's exit code and what it printed, run off the loop serving the app."""
    code = await asyncio.to_thread(run, build_parser().parse_args(["status", *argv]))
    return code, capsys.readouterr().out


async def test_status_prints_the_cluster_map(serve_cluster, start_workers, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table's width where stdout is no terminal
    url, cluster = await serve_cluster(workers=3, counts=[2, 4, 2], api_keys=[API_KEY])
    code, table = await status(capsys, url, "--api-key", API_KEY)
    assert code == 0, table
    assert f"{cluster.model_id}: ok, 8 layers" in table
    rows = [line for line in table.splitlines() if "worker-" in line]
    for row, (name, layers) in zip(
        rows,
        [("worker-0", "[0, 2)"), ("worker-1", "[2, 6)"), ("worker-2", "[6, 8)")],
        strict=True,
    ):
        assert name in row and layers in row and "serving" in row and " ms" in row
    assert "██████████" in rows[1]  # half of the depth, drawn to scale
    await start_workers.servers[cluster.stages[2].client.address].stop(grace=None)
    code, table = await status(capsys, url, "--api-key", API_KEY)
    assert code == 1 and "down" in table and "degraded" in table


async def test_status_of_no_coordinator_is_an_error(capsys, unused_tcp_port):
    code = await asyncio.to_thread(
        run, build_parser().parse_args(["status", f"http://127.0.0.1:{unused_tcp_port}"])
    )
    assert code == 2 and "cannot ask" in capsys.readouterr().err
