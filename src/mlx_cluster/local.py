"""A cluster on this host: N worker processes, ready when they say so.

Workers listen on Unix domain sockets in a private temporary directory (only
this user may enter it), or on TCP loopback. Each worker prints one JSON line
when it accepts calls; we read that line instead of sleeping, and stop every
process we started on the way out.
Secrets (the cluster token) go to the workers in their environment, not their
command line, so other users do not see them in `ps`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>

Transport = Literal["unix", "tcp"]
TRANSPORTS: tuple[Transport, ...] = ("unix", "tcp")
GPU_ENV = "CUDA_VISIBLE_DEVICES"  # which GPU a worker's MLX (CUDA build) sees


def gpu_list(text: str) -> tuple[int, ...]:
    """`--gpus 0,1` as (0, 1): GPU indices, one per worker, cycled."""
    try:
        gpus = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1, got {text!r}") from None
    if any(gpu < 0 for gpu in gpus):
        raise argparse.ArgumentTypeError(f"GPU indices must be >= 0, got {text!r}")
    return gpus


def _stop_with_parent() -> None:
    """In the child: get SIGTERM if the launcher dies, even by SIGKILL (Linux only)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class WorkerProcess:
    name: str
    address: str
    process: asyncio.subprocess.Process


async def _start_worker(
    name: str, listen: str, extra_args: list[str], env: Mapping[str, str], ready_timeout: float
) -> WorkerProcess:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mlx_cluster",
        "worker",
        "--listen",
        listen,
        "--name",
        name,
        *extra_args,
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, **env},
        preexec_fn=_stop_with_parent,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), ready_timeout)
    except TimeoutError:
        await _stop(process)
        raise RuntimeError(f"{name} did not become ready within {ready_timeout:.0f} s") from None
    if not line:
        code = await process.wait()
        raise RuntimeError(f"{name} exited with code {code} before it was ready")
    event = json.loads(line)
    return WorkerProcess(name, event["address"], process)


async def _stop(process: asyncio.subprocess.Process, grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
    if process.returncode is not None:
        return process.returncode
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        return await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        log.error("worker pid %d ignored SIGTERM for %.0f s: killing it", process.pid, grace)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        return await process.wait()


class LocalWorkers(list[WorkerProcess]):
    """The started workers; `exit_codes` is filled in once they are stopped."""

    exit_codes: list[int]

    @property
    def clean_exit(self) -> bool:
        return all(code == 0 for code in self.exit_codes)


@contextlib.asynccontextmanager
async def local_workers(
    count: int,
    extra_args: list[str] | None = None,
    ready_timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    transport: Transport = "tcp",
    gpus: Sequence[int] = (),
) -> AsyncIterator[LocalWorkers]:
    """Start `count` workers on this host; stop them all on exit, whatever happened.

    Args:
        env: added to this process's environment for the workers.
        transport: "unix": each worker on a Unix domain socket in a private temporary
            directory, removed on exit; "tcp": each on a free port of 127.0.0.1.
        gpus: worker i sees only GPU `gpus[i % len(gpus)]` (CUDA); empty: all see
            what this process sees.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if any(gpu < 0 for gpu in gpus):
        raise ValueError(f"GPU indices must be >= 0, got {list(gpus)}")
    envs = [
        {**(env or {}), **({GPU_ENV: str(gpus[i % len(gpus)])} if gpus else {})}
        for i in range(count)
    ]
    with contextlib.ExitStack() as stack:
        listen = ["127.0.0.1:0"] * count
        if transport == "unix":
            socket_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mlx-cluster-"))
            listen = [f"unix:{socket_dir}/worker-{i}.sock" for i in range(count)]
        async with _started(listen, extra_args or [], envs, ready_timeout) as workers:
            yield workers


@contextlib.asynccontextmanager
async def _started(
    listen: list[str],
    extra_args: list[str],
    envs: list[dict[str, str]],
    ready_timeout: float,
) -> AsyncIterator[LocalWorkers]:
    """Start a worker on each address of `listen`, each with its env; stop them all on exit."""
    tasks = [
        asyncio.ensure_future(_start_worker(f"worker-{i}", address, extra_args, env, ready_timeout))
        for i, (address, env) in enumerate(zip(listen, envs, strict=True))
    ]
    try:
        workers = LocalWorkers(await asyncio.gather(*tasks))
    except BaseException:
        started = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(_stop(w.process) for w in started if isinstance(w, WorkerProcess)))
        raise
    try:
        log.info("workers ready: %s", ", ".join(f"{w.name}@{w.address}" for w in workers))
        yield workers
    finally:
        codes = await asyncio.shield(asyncio.gather(*(_stop(w.process) for w in workers)))
        workers.exit_codes = list(codes)
        for worker, code in zip(workers, codes, strict=True):
            level = logging.INFO if code == 0 else logging.ERROR
            log.log(level, "%s (pid %d) exited with code %d", worker.name, worker.process.pid, code)
