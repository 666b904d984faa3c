"""`mlx-cluster up`: a local cluster in one command, and no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest


def workers_of(model_dir) -> list[psutil.Process]:
    """Worker processes still alive that a cluster on this model could have started."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "mlx_cluster worker" in cmd and "--name worker-" in cmd:
            found.append(proc)
    return found


def up(model, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlx_cluster",
        "up",
        "--workers",
        "2",
        "--model",
        str(model),
        *extra,
    ]


@pytest.mark.slow
def test_up_answers_the_prompt_and_exits_cleanly(tiny_llama):
    before = {p.pid for p in workers_of(tiny_llama)}
    result = subprocess.run(
        up(tiny_llama, "--prompt", "hello", "--max-tokens", "12"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "a completion is printed"
    assert "12 generated tokens" in result.stderr or "generated tokens" in result.stderr
    assert {p.pid for p in workers_of(tiny_llama)} - before == set()


@pytest.mark.slow
def test_sigterm_stops_every_process(tiny_llama):
    proc = subprocess.Popen(
        up(tiny_llama, "--prompt", "hello", "--max-tokens", "100000", "--log-level", "INFO"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    for line in proc.stderr:  # readiness from the log, not a sleep
        if "generating" in line or time.monotonic() > deadline:
            break
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    _gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [p.pid for p in alive]
