"""A worker reads only its slice: memory measured on real worker processes."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.local import local_workers


def weight_file_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


@pytest.mark.slow
async def test_quarter_slice_uses_well_under_half_the_weights(model_factory):
    model = model_factory("llama", hidden_size=768, num_layers=8)
    full = weight_file_bytes(model)
    assert full > 150e6, "the model must be big enough to measure"
    async with local_workers(2) as (quarter, whole):
        grown = {}
        for proc, (start, end) in ((quarter, (2, 4)), (whole, (0, 8))):
            client = WorkerClient(proc.address)
            rss = psutil.Process(proc.process.pid)
            before = rss.memory_info().rss
            reply = await client.load_layers(str(model), start, end)
            grown[proc.name] = (rss.memory_info().rss - before, reply.memory_used_bytes)
            await client.close()
    quarter_rss, quarter_mlx = grown[quarter.name]
    whole_rss, _ = grown[whole.name]
    # The measurement can tell the difference: the whole model does take its size.
    assert whole_rss > 0.8 * full, (whole_rss, full)
    assert quarter_rss < 0.4 * full, (quarter_rss, full)
    assert quarter_mlx < 0.4 * full, (quarter_mlx, full)
