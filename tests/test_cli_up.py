"""`mlx-cluster up`: a local cluster in one command, and no process left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

MARK = "MLXC_TEST_RUN_TAG"  # not MLX_CLUSTER_*: those are settings


def marked_env() -> tuple[dict[str, str], str]:
    """An environment tagging every process started with it (workers inherit it)."""
    tag = uuid.uuid4().hex
    return {**os.environ, MARK: tag}, tag


def processes_tagged(tag: str) -> list[psutil.Process]:
    """Live processes started under `tag`, whoever else runs workers on this machine."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
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
    env, tag = marked_env()
    result = subprocess.run(
        up(tiny_llama, "--prompt", "hello", "--max-tokens", "12"),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "a completion is printed"
    generated = re.search(r"(\d+) generated tokens", result.stderr)
    assert generated and 1 <= int(generated.group(1)) <= 12, result.stderr
    assert processes_tagged(tag) == []


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


@pytest.mark.parametrize(
    "layers, message",
    [
        ("a,b", "expected layer counts like 1,5,2, got 'a,b'"),
        ("3,0", "every worker needs at least 1 layer, got '3,0'"),
        ("1,2,3", "--layers gives 3 counts for 2 workers"),
    ],
)
def test_bad_layer_counts_are_a_clean_error(tiny_llama, layers, message):
    done = subprocess.run(
        [*up(tiny_llama, "--layers", layers, "--prompt", "hi")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
