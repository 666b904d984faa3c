"""Info reads one consistent snapshot of the sessions while the compute thread changes them."""

from __future__ import annotations

import asyncio
import sys

import grpc
import pytest

from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import CHANNEL_OPTIONS

RESERVE = 7  # every session reserves this many tokens, so used == RESERVE * open
OPENERS = 16


@pytest.fixture
def tiny_switch_interval():
    """Switch threads as often as possible, so that a race shows within a short test."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


async def test_info_numbers_stay_consistent_under_concurrent_opens_and_ends(
    start_workers, tiny_llama, tiny_switch_interval
):
    (client,) = await start_workers(1, max_sessions=4 * OPENERS)
    await client.load_layers(str(tiny_llama), 0, 2)
    channel = grpc.aio.insecure_channel(client.address, options=CHANNEL_OPTIONS)
    stub = pb_grpc.LayerServiceStub(channel)
    stop = asyncio.Event()

    async def churn(worker: int) -> None:
        round_ = 0
        while not stop.is_set():
            ids = [f"w{worker}-r{round_}-{i}" for i in range(3)]
            for sid in ids:
                request = pb.OpenSessionRequest(session_id=sid, reserve_tokens=RESERVE)
                await stub.OpenSession(request, timeout=10)
            await stub.EndSession(pb.EndSessionRequest(session_ids=ids), timeout=10)
            round_ += 1

    async def watch() -> list[tuple[int, int]]:
        seen = []
        for _ in range(300):
            info = await stub.Info(pb.InfoRequest(), timeout=10)
            seen.append((info.sessions_open, info.kv_used_tokens))
        stop.set()
        return seen

    try:
        *_, seen = await asyncio.gather(*(churn(w) for w in range(OPENERS)), watch())
    finally:
        await channel.close()
    assert any(open_ for open_, _ in seen), "the churn never showed in Info"
    wrong = [(open_, used) for open_, used in seen if used != RESERVE * open_]
    assert not wrong, (
        f"{len(wrong)} of {len(seen)} Info replies disagree with themselves: {wrong[:5]}"
    )
