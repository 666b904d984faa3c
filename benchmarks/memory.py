"""Peak resident memory of processes: this one and the workers it started.

On Linux the kernel keeps each process's RSS high-water mark (VmHWM in
/proc/<pid>/status) and resets it on request, so peaks are exact and cost
nothing while the benchmark runs. Elsewhere a background thread samples RSS
with psutil, which may miss short spikes. RSS counts host memory only: on
CUDA, a worker's weights and KV cache live in device memory and do not show
up here (MLX's own peak counter sees them, but only in-process).
"""

from __future__ import annotations

import resource
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
import psutil

SAMPLE_EVERY_S = 0.05  # psutil sampling period where VmHWM is not available


def read_hwm(pid: int) -> int | None:
    """The RSS high-water mark of `pid` in bytes (Linux), or None where unknown."""
    status = Path(f"/proc/{pid}/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


def reset_hwm(pid: int) -> bool:
    """Reset `pid`'s high-water mark to its current RSS (Linux >= 4.0); False if not possible."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def own_peak_rss() -> int:
    """This process's RSS high-water mark in bytes (since its start or the last reset)."""
    hwm = read_hwm(psutil.Process().pid)
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, others: kB


def mlx_peak() -> int:
    """MLX's peak allocation in this process (device memory on GPU), in bytes."""
    return int(mx.get_peak_memory())


class PeakRss:
    """The peak RSS of some processes, from VmHWM or from a sampling thread.

    Use as a context manager around the work to measure; read `peaks` afterwards.
    """

    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = list(pids)
        self.peaks: dict[int, int] = dict.fromkeys(self.pids, 0)
        self._exact = all(read_hwm(pid) is not None for pid in self.pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def __enter__(self) -> PeakRss:
        if self._exact:
            for pid in self.pids:
                reset_hwm(pid)
        else:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._exact:
            self.peaks = {pid: read_hwm(pid) or 0 for pid in self.pids}
        else:
            self._stop.set()
            self._thread.join()

    @property
    def method(self) -> str:
        return "VmHWM" if self._exact else f"psutil RSS sampled every {SAMPLE_EVERY_S} s"

    def _sample(self) -> None:
        processes = [psutil.Process(pid) for pid in self.pids]
        while not self._stop.wait(SAMPLE_EVERY_S):
            for process in processes:
                try:
                    rss = process.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                self.peaks[process.pid] = max(self.peaks[process.pid], rss)
