"""What this host offers: memory, device, cores. Read once at start-up."""

from __future__ import annotations

import os
import platform

import mlx.core as mx
import psutil

from mlx_cluster.contract.worker_info import Capabilities


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_info() -> tuple[str, int, int] | None:
    """(name, memory limit bytes, cores) of the GPU MLX uses, or None on CPU."""
    if not mx.is_available(mx.gpu):
        return None
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    name = str(info.get("device_name", "GPU"))
    # On Apple silicon MLX reports the GPU working-set limit; on CUDA, device memory.
    limit = int(info.get("max_recommended_working_set_size", 0) or info.get("memory_size", 0))
    cores = int(info.get("gpu_core_count", 0) or 0)
    return name, limit, cores


def detect() -> Capabilities:
    """Probe this host."""
    vm = psutil.virtual_memory()
    gpu = _gpu_info()
    system = f"{platform.system().lower()}-{platform.machine().lower()}"
    if gpu is None:
        return Capabilities(
            int(vm.total),
            int(vm.available),
            "cpu",
            _cpu_name(),
            os.cpu_count() or 1,
            0,
            system,
        )
    name, limit, cores = gpu
    total = limit or int(vm.total)
    return Capabilities(
        total,
        min(total, int(vm.available)) if platform.system() == "Darwin" else total,
        "gpu",
        name,
        os.cpu_count() or 1,
        cores,
        system,
    )
