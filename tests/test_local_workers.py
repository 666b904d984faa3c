"""Workers started on this host: each gets the GPU it was given."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from mlx_cluster.local import GPU_ENV, gpu_list, local_workers


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(): value.decode() for key, value in pairs}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/environ")
async def test_each_worker_sees_its_own_gpu():
    async with local_workers(3, ["--log-level", "WARNING"], gpus=(1, 0)) as workers:
        seen = [environment_of(w.process.pid).get(GPU_ENV) for w in workers]
    assert seen == ["1", "0", "1"]
    assert workers.clean_exit


def test_gpu_lists_are_parsed_and_checked():
    assert gpu_list("0,1") == (0, 1)
    assert gpu_list("3") == (3,)
    with pytest.raises(argparse.ArgumentTypeError, match="like 0,1, got 'a,1'"):
        gpu_list("a,1")
    with pytest.raises(argparse.ArgumentTypeError, match=">= 0, got '-1'"):
        gpu_list("-1")
