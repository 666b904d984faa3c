"""Logs with role and request id, Prometheus metrics that move, and a clean SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from mlx_cluster.contract.logs import setup_logging


@pytest.fixture
def json_log_file(tmp_path):
    """Route this process's logging to a JSON-lines file, restoring the set-up afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    path = tmp_path / "coordinator.jsonl"
    setup_logging("coordinator", "INFO", "json", str(path))
    yield path
    for handler in root.handlers:
        handler.close()
    root.handlers, root.level = saved


async def test_log_lines_carry_role_and_request_id(serve_cluster, json_log_file):
    url, _ = await serve_cluster()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        reply = await http.post(
            "/generate",
            json={"prompt": "the river", "max_tokens": 4},
            headers={"X-Request-ID": "req-7f3a"},
        )
        assert reply.headers["x-request-id"] == "req-7f3a"
        generated = (await http.post("/generate", json={"prompt": "x", "max_tokens": 2})).headers
    entries = [json.loads(line) for line in json_log_file.read_text().splitlines()]
    mine = [e for e in entries if e["request_id"] == "req-7f3a"]
    assert all(e["role"] == "coordinator" and e["host"] == socket.gethostname() for e in mine)
    access = [e for e in mine if e["logger"] == "mlx_cluster.coordinator.http"]
    assert access and "POST /generate -> 200" in access[0]["message"]
    # The id crossed gRPC: the workers' session lines name it too.
    assert any(
        e["logger"] == "mlx_cluster.worker.servicer" and "opened" in e["message"] for e in mine
    )
    assert len(generated["x-request-id"]) == 16  # one is made up when the client sends none


def test_worker_process_logs_its_name_and_the_request_id(tmp_path, tiny_llama):
    log_file = tmp_path / "worker.jsonl"
    worker = subprocess.Popen(
        [sys.executable, "-m", "mlx_cluster", "worker", "--listen", "127.0.0.1:0",
         "--name", "studio", "--log-format", "json", "--log-file", str(log_file)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        address = json.loads(worker.stdout.readline())["address"]
        script = (
            "import asyncio, sys\n"
            "from mlx_cluster.coordinator.engine.client import WorkerClient\n"
            "from mlx_cluster.contract.logs import request_id\n"
            "async def main():\n"
            f"    c = WorkerClient({address!r})\n"
            f"    await c.load_layers({str(tiny_llama)!r}, 0, 2)\n"
            "    request_id.set('req-worker-1')\n"
            "    await c.open_session('s1')\n"
            "    await c.end_sessions(['s1'])\n"
            "    await c.close()\n"
            "asyncio.run(main())\n"
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    tagged = [e for e in entries if e["request_id"] == "req-worker-1"]
    assert {e["role"] for e in entries} == {"studio"}
    assert [e["message"].split()[0] for e in tagged] == ["session", "ended"]


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_exist_and_move_after_a_request(serve_cluster):
    url, cluster = await serve_cluster()
    worker = cluster.stages[0].client.name
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        before = (await http.get("/metrics")).text
        body = {"prompt": "the river", "max_tokens": 6, "stream": True}
        async with http.stream("POST", "/generate", json=body) as stream:
            _ = [line async for line in stream.aiter_lines()]
        after = (await http.get("/metrics")).text
    for name in (
        "mlx_cluster_requests_total",
        "mlx_cluster_requests_in_flight",
        "mlx_cluster_time_to_first_token_seconds_count",
        "mlx_cluster_inter_token_latency_seconds_count",
        "mlx_cluster_generated_tokens_total",
        "mlx_cluster_hop_seconds_count",
        "mlx_cluster_worker_kv_tokens_capacity",
        "mlx_cluster_worker_sessions_open",
    ):
        assert name in after, name
    requests = dict(endpoint="/generate", status="200")
    assert metric(after, "mlx_cluster_requests_total", **requests) == 1 + metric(
        before, "mlx_cluster_requests_total", **requests
    )
    assert metric(after, "mlx_cluster_time_to_first_token_seconds_count") == 1
    assert metric(after, "mlx_cluster_inter_token_latency_seconds_count") >= 1
    assert metric(after, "mlx_cluster_generated_tokens_total") >= 1
    for phase in ("serialize", "network", "compute", "deserialize"):
        hop = dict(worker=worker, phase=phase)
        assert metric(after, "mlx_cluster_hop_seconds_count", **hop) > metric(
            before, "mlx_cluster_hop_seconds_count", **hop
        )
    assert metric(after, "mlx_cluster_worker_kv_tokens_capacity", worker=worker) > 0
    assert metric(after, "mlx_cluster_worker_up", worker=worker) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Readiness: /health answers 200. Fails if `proc` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the cluster exited with code {proc.returncode} before it served")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url}/health did not answer 200 within {timeout:.0f} s")


EXIT_LINE = re.compile(r"worker-\d+ \(pid (\d+)\) exited with code (-?\d+)")


def worker_exits(log_file: Path) -> dict[int, int]:
    """pid -> exit code of each worker, as `up` logged it once it had waited for the worker."""
    exits = {}
    for line in log_file.read_text().splitlines():
        entry = json.loads(line)
        if entry["logger"] == "mlx_cluster.local" and (m := EXIT_LINE.fullmatch(entry["message"])):
            exits[int(m[1])] = int(m[2])
    return exits


@pytest.mark.slow
def test_sigterm_mid_stream_ends_it_cleanly_and_every_process_exits_0(tiny_llama, tmp_path):
    port = free_port()
    log_file, stderr = tmp_path / "up.jsonl", tmp_path / "up.stderr"
    with stderr.open("w") as err:
        up = subprocess.Popen(
            [sys.executable, "-m", "mlx_cluster", "up", "--model", str(tiny_llama),
             "--workers", "2", "--listen", f"127.0.0.1:{port}", "--shutdown-grace", "1",
             "--log-level", "INFO", "--log-format", "json", "--log-file", str(log_file)],
            stderr=err,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, up, timeout=90)
        workers = psutil.Process(up.pid).children()
        assert len(workers) == 2, workers
        body = {"prompt": "the river", "max_tokens": 4000, "stream": True}
        events = []
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 5:
                    os.kill(up.pid, signal.SIGTERM)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last.get("finish_reason") or last["error"]["code"] == "shutting_down"
        # The coordinator is this test's child: its exit code is its own. The workers
        # are `up`'s children: it waits for each and logs the code the wait returned.
        assert up.wait(timeout=60) == 0, stderr.read_text()[-3000:]
        assert worker_exits(log_file) == {w.pid: 0 for w in workers}
        assert not any(w.is_running() for w in workers)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(timeout=10)
