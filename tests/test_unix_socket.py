"""Workers on Unix domain sockets: same tokens as over TCP, local for the security warning.

`mlx-cluster up` puts its workers on Unix sockets in a private temporary directory by
default; `--transport tcp` puts them on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from benchmarks import echo
from mlx_cluster.contract.rpc import unix_socket_path
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.worker.runtime import WorkerSettings
from mlx_cluster.worker.server import create_server
from tests.conftest import WorkerPool, make_engine
from tests.test_golden import PROMPT, assert_same, pipeline_run

SPLIT = [3, 5]


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for sockets (a socket path may have at most 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="mlxc-") as path:
        yield Path(path)


@pytest.fixture
async def unix_workers(socket_dir: Path) -> AsyncIterator[list[WorkerClient]]:
    """In-process workers on Unix sockets, with clients dialing the addresses they report."""
    servers = [
        await create_server(f"unix:{socket_dir}/w{i}.sock", WorkerSettings(name=f"unix-{i}"))
        for i in range(len(SPLIT))
    ]
    clients = [WorkerClient(server.address) for server in servers]
    yield clients
    for client in clients:
        await client.close()
    for server in servers:
        await server.stop(grace=None)


async def test_unix_socket_pipeline_gives_the_tcp_pipelines_tokens(
    tiny_llama, unix_workers: list[WorkerClient], start_workers: WorkerPool
):
    assert all(c.address.startswith("unix:") for c in unix_workers)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    over_tcp = await make_engine(tiny_llama, await start_workers(len(SPLIT)), SPLIT)
    over_unix = await make_engine(tiny_llama, unix_workers, SPLIT)
    want = await pipeline_run(over_tcp, PROMPT, params)
    assert len({s.token for s in want}) > 3, "the random model should not repeat one token"
    assert_same(await pipeline_run(over_unix, PROMPT, params), want)


async def test_unix_socket_is_local_for_the_security_warning(socket_dir: Path, caplog):
    caplog.set_level(logging.WARNING, logger="mlx_cluster.worker.server")
    worker = await create_server(f"unix:{socket_dir}/open.sock", WorkerSettings(name="open"))
    try:
        assert worker.address == f"unix:{socket_dir}/open.sock" and worker.port == 0
        assert stat.S_ISSOCK((socket_dir / "open.sock").stat().st_mode)
    finally:
        await worker.stop(grace=None)
    assert "NO cluster token" not in caplog.text


async def test_benchmark_echo_runs_over_a_unix_socket():
    async with echo.echo_server_process("unix") as address:
        assert address.startswith("unix:") and address.endswith("/echo.sock")
        (result,) = await echo.measure(address, [4096], iterations=20)
    assert result.message_bytes == 4096 and result.iterations == 20
    assert 0 < result.min_s <= result.median_s
    assert not Path(unix_socket_path(address)).parent.exists()


# --- the worker command ----------------------------------------------------------------


def worker_command(listen: str) -> list[str]:
    return [sys.executable, "-m", "mlx_cluster", "worker", "--name", "w", "--listen", listen]


def test_worker_command_reports_its_unix_address_and_removes_the_socket(socket_dir: Path):
    path = socket_dir / "worker.sock"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLX_CLUSTER_AUTH__TOKEN", None)
    proc = subprocess.Popen(
        worker_command(f"unix:{path}"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready == {"event": "ready", "name": "w", "address": f"unix:{path}"}
        assert stat.S_ISSOCK(path.stat().st_mode)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "SECURITY" not in stderr, "a Unix socket only takes calls from this host"
    assert not path.exists()


def test_worker_command_refuses_too_long_a_socket_path(socket_dir: Path):
    path = socket_dir / ("x" * 120)
    result = subprocess.run(
        worker_command(f"unix:{path}"), capture_output=True, text=True, timeout=60
    )
    size = len(str(path).encode())
    assert result.returncode == 2, result.stderr
    assert f"may have at most 107 bytes, this one has {size}" in result.stderr


# --- mlx-cluster up --------------------------------------------------------------------


def run_up(model: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mlx_cluster", "up", "--workers", "2", "--model", str(model)]
    command += ["--prompt", "hello", "--max-tokens", "12", "--log-level", "INFO", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_up_uses_unix_sockets_by_default_and_tcp_on_request(tiny_llama):
    over_unix, over_tcp = run_up(tiny_llama), run_up(tiny_llama, "--transport", "tcp")
    assert over_unix.returncode == 0, over_unix.stderr
    assert over_tcp.returncode == 0, over_tcp.stderr
    sockets = re.findall(r"worker-\d@unix:(\S+\.sock)", over_unix.stderr)
    assert len(sockets) == 2, over_unix.stderr
    assert re.search(r"worker-0@127\.0\.0\.1:\d+", over_tcp.stderr), over_tcp.stderr
    assert not Path(sockets[0]).parent.exists(), "the socket directory is removed on exit"
    assert over_unix.stdout.strip() and over_unix.stdout == over_tcp.stdout
