"""scripts/launch.sh for real: a worker and a coordinator on loopback, checked and stopped.

The script runs as a user would run it (bash, background processes, PID and log files
in MLX_CLUSTER_RUN_DIR); whatever happens, no process it started outlives the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from mlx_cluster.models.random_model import build_random_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "launch.sh"
ROLES = ("worker", "coordinator")
READY_TIMEOUT_S = 60
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def running(pid: int) -> bool:
    """True for a live process; a zombie waiting to be reaped has stopped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Launcher:
    env: dict[str, str]
    cwd: Path
    run_dir: Path
    config: Path
    url: str

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `launch.sh ARGS...` and return what it did."""
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def pids(self) -> dict[str, int]:
        """The PIDs in the run directory's PID files, by role."""
        files = {role: self.run_dir / f"{role}.pid" for role in ROLES}
        return {role: int(f.read_text()) for role, f in files.items() if f.is_file()}

    def health(self) -> tuple[int, dict]:
        try:
            with NO_PROXY.open(f"{self.url}/health", timeout=5) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)


def wait_healthy(launcher: Launcher, timeout: float = READY_TIMEOUT_S) -> dict:
    """Poll /health until it answers 200, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, body = launcher.health()
        except OSError as exc:  # not listening yet
            last = exc
        else:
            if status == 200:
                return body
            last = body
        time.sleep(0.2)
    raise AssertionError(f"/health not ok after {timeout} s; last answer: {last}")


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """A tiny model, a config naming one worker, and the environment launch.sh reads."""
    model = build_random_model(tmp_path / "m", "llama", num_layers=4)
    worker, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"model: {model}\n"
        f"coordinator:\n  http_listen: {http}\n"
        f"workers:\n  - address: {worker}\n    name: launch-test\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_CLUSTER_")}
    env.update(
        HF_HUB_OFFLINE="1",
        MLX_CLUSTER_PYTHON=sys.executable,
        MLX_CLUSTER_RUN_DIR=str(tmp_path / "run"),
        MLX_CLUSTER_WORKER_LISTEN=worker,
        MLX_CLUSTER_WORKER_NAME="launch-test",
        MLX_CLUSTER_URL=f"http://{http}",
    )
    launch = Launcher(env, tmp_path, tmp_path / "run", config, f"http://{http}")
    try:
        yield launch
    finally:
        pids = launch.pids()
        launch("stop", "all", timeout=90)
        for pid in pids.values():  # in case the script could not stop them
            if running(pid):
                psutil.Process(pid).kill()


@pytest.mark.slow
def test_launcher_runs_checks_and_stops_a_cluster(launcher: Launcher) -> None:
    worker = launcher("worker")
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert "worker ready" in worker.stdout
    coordinator = launcher("coordinator", "--config", str(launcher.config))
    assert coordinator.returncode == 0, coordinator.stdout + coordinator.stderr
    pids = launcher.pids()
    assert set(pids) == set(ROLES) and all(running(p) for p in pids.values())

    health = wait_healthy(launcher)
    assert [w["name"] for w in health["workers"]] == ["launch-test"]

    status = launcher("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"worker: running (pid {pids['worker']})" in status.stdout
    assert '"status": "ok"' in status.stdout  # json.tool's layout

    smoke = launcher("test")
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "generated tokens in" in smoke.stdout and "tok/s" in smoke.stdout

    logs = launcher("logs", "worker")
    assert logs.returncode == 0, logs.stderr
    assert "listening on" in logs.stdout

    stop = launcher("stop", "all")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not [role for role, pid in pids.items() if running(pid)]
    assert launcher.pids() == {}
    down = launcher("status")
    assert down.returncode != 0
    assert "worker: not started here" in down.stdout
