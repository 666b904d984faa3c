"""`mlx-cluster up`: a local cluster in one command, and no process left behind."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import IO

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


def wait_for_line(stream: IO[str], needle: str, timeout: float) -> None:
    """Read `stream` until a line holds `needle` (then keep draining it on a thread).

    Fails the test if the stream ends first (the process exited) or `timeout` passes.
    """
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            pytest.fail(f"no line with {needle!r} within {timeout:.0f} s:\n{''.join(seen)}")
        if line is None:
            pytest.fail(f"the output ended before a line with {needle!r}:\n{''.join(seen)}")
        if needle in line:
            return
        seen.append(line)


@pytest.mark.slow
def test_sigterm_stops_every_process(tiny_llama):
    proc = subprocess.Popen(
        up(tiny_llama, "--prompt", "hello", "--max-tokens", "100000", "--log-level", "INFO"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        wait_for_line(proc.stderr, "generating", timeout=60)  # readiness from the log
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        _gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, [p.pid for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


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
