"""How busy the rest of the host was while a measurement ran.

Timings on a shared machine are only as good as the quiet around them. The
host's busy CPU time (psutil) minus the CPU time of this process and its
reaped children (getrusage), over the wall time, is the load that other
processes put on the host, in cores. Read it after the measurement's
subprocesses have exited, so their time is counted as ours.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable

import psutil

BUSY_WARNING_CORES = 0.25  # other load above this makes a measurement suspect


def _host_busy_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class OtherLoad:
    """Context manager: `cores` is the other processes' mean CPU use during the block."""

    def __enter__(self) -> OtherLoad:
        self._start = (time.perf_counter(), _host_busy_s(), _own_cpu_s())
        self.cores = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own = time.perf_counter(), _host_busy_s(), _own_cpu_s()
        elapsed = wall - self._start[0]
        others = (busy - self._start[1]) - (own - self._start[2])
        self.cores = max(others, 0.0) / elapsed if elapsed > 0 else 0.0


def busy_warning(loads: Iterable[tuple[str, float]]) -> str | None:
    """The warning for the measurements (label, other load in cores) that other processes
    loaded beyond BUSY_WARNING_CORES; None if none."""
    busy = [f"{label} ({cores:.2f} cores)" for label, cores in loads if cores > BUSY_WARNING_CORES]
    return f"warning: other processes loaded the host during: {', '.join(busy)}" if busy else None
