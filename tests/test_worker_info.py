"""The client answers with typed values, and refuses a worker of another protocol."""

from __future__ import annotations

import pytest

from mlx_cluster.contract.errors import ProtocolMismatch
from mlx_cluster.contract.layers import LayerRange
from mlx_cluster.contract.rpc import PROTOCOL_VERSION
from mlx_cluster.contract.worker_info import (
    Capabilities,
    LoadedSlice,
    WorkerInfo,
    WorkerLimits,
)
from mlx_cluster.worker import runtime as worker_runtime

CAPS = Capabilities(8 << 30, 4 << 30, "gpu", "Apple M2 Max", 12, 38, "darwin-arm64")
LIMITS = WorkerLimits(
    max_batch=64, max_message_bytes=1 << 20, max_sessions=8, kv_budget_tokens=512, session_ttl_s=30
)


def test_info_survives_the_wire_unchanged():
    info = WorkerInfo(
        "w", "1.2.3", PROTOCOL_VERSION, CAPS, LIMITS, "m", 2, 6, 8, 1000, 512, 17, 3, "bfloat16", 64
    )
    assert WorkerInfo.from_proto(info.to_proto()) == info
    assert info.layers == LayerRange(2, 6, 8)
    empty = WorkerInfo("w", "1.2.3", PROTOCOL_VERSION, CAPS, LIMITS)
    assert WorkerInfo.from_proto(empty.to_proto()) == empty and empty.layers is None


async def test_the_client_answers_with_typed_values(start_workers, tiny_llama):
    (client,) = await start_workers(1, max_batch=16, max_sessions=9, kv_budget_tokens=300)
    ready = await client.wait_ready(10)
    assert isinstance(ready, WorkerInfo) and ready.layers is None
    assert ready.name == client.name == "worker-0"
    assert isinstance(ready.capabilities, Capabilities) and ready.capabilities.cpu_cores >= 1
    assert (ready.limits.max_batch, ready.limits.max_sessions) == (16, 9)
    assert ready.limits.kv_budget_tokens == 300
    loaded = await client.load_layers(str(tiny_llama), 2, 6)
    assert isinstance(loaded, LoadedSlice) and loaded.reloaded and loaded.memory_used_bytes > 0
    assert loaded.info.layers == LayerRange(2, 6, 8) and loaded.info.kv_capacity_tokens == 300
    await client.open_session("s", 10)
    info = await client.info()
    assert (info.sessions_open, info.kv_used_tokens, info.dtype) == (1, 10, "float32")


async def test_a_worker_of_another_protocol_is_refused_with_both_versions(
    start_workers, monkeypatch
):
    (client,) = await start_workers(1)
    monkeypatch.setattr(worker_runtime, "PROTOCOL_VERSION", PROTOCOL_VERSION - 1)
    message = (
        f"worker worker-0 speaks protocol {PROTOCOL_VERSION - 1}, this coordinator speaks "
        f"{PROTOCOL_VERSION}; run the same mlx-cluster version on both"
    )
    with pytest.raises(ProtocolMismatch) as refused:
        await client.wait_ready(10)
    assert str(refused.value) == message
    with pytest.raises(ProtocolMismatch):
        await client.info()
