"""A cluster on this host: N worker processes on loopback, ready when they say so.

Each worker prints one JSON line when it accepts calls; we read that line
instead of sleeping, and stop every process we started on the way out.
Secrets (the cluster token) go to the workers in their environment, not their
command line, so other users do not see them in `ps`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


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
    name: str, extra_args: list[str], env: Mapping[str, str], ready_timeout: float
) -> WorkerProcess:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mlx_cluster",
        "worker",
        "--listen",
        "127.0.0.1:0",
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
) -> AsyncIterator[LocalWorkers]:
    """Start `count` workers on loopback; stop them all on exit, whatever happened.

    `env` is added to this process's environment for the workers.
    """
    tasks = [
        asyncio.ensure_future(
            _start_worker(f"worker-{i}", extra_args or [], env or {}, ready_timeout)
        )
        for i in range(count)
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
            if code != 0:
                log.error("%s exited with code %d", worker.name, code)
