"""Prompt chunks relayed from worker to worker: pipelined, in order, failures named.

Real in-process workers on port 0 with a tiny random model; the chain's results
against mlx-lm are in test_golden.py and test_failover.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import mlx.core as mx
import pytest

from mlx_cluster import tensor
from mlx_cluster.contract.errors import SessionNotFound
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import CHANNEL_OPTIONS, FAILURES_IN_BAND_KEY, STAGE_KEY, Route
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.coordinator.engine.events import HopTiming
from mlx_cluster.coordinator.engine.prompt_relay import PromptRelay
from mlx_cluster.coordinator.engine.ring import RingFailed
from mlx_cluster.worker.relay import Peers
from mlx_cluster.worker.relayed_steps import relay_steps
from tests.test_leases import wait_until
from tests.test_ring import load_ring

STEP_TIMEOUT_S = 30.0
PROMPT = [(i * 37) % 250 + 3 for i in range(40)]


def chunked(tokens: list[int], size: int) -> list[mx.array]:
    return [mx.array(tokens[i : i + size], dtype=mx.uint32) for i in range(0, len(tokens), size)]


async def test_relay_steps_sends_step_k_plus_1_before_step_k_is_answered(tiny_llama, start_workers):
    """relay_steps with a real next stage: step k + 1 is made and sent before step k's
    answer is back, and the answers come in order, with the next stage's time."""
    (last,) = await start_workers(1)
    await load_ring(tiny_llama, [last], [8])
    session_id = uuid.uuid4().hex
    await last.open_session(session_id)
    events: list[str] = []
    chunks = chunked(PROMPT, 10)

    async def requests() -> AsyncIterator[pb.ForwardRequest]:
        for k, chunk in enumerate(chunks):
            request = pb.ForwardRequest(
                step_id=k, session_ids=[session_id], offsets=[10 * k], last_position_only=True
            )
            tensor.encode(chunk[None], out=request.token_ids)
            yield request

    async def compute(request: pb.ForwardRequest) -> tuple[pb.ForwardRequest, float]:
        events.append(f"sent {request.step_id}")
        return request, 0.0

    peers = Peers()
    next_stage = peers.next_stage(Route((last.address,), STEP_TIMEOUT_S), "relay-test")
    try:
        async for reply in relay_steps(requests(), compute, next_stage):
            events.append(f"answered {reply.step_id}")
            assert reply.compute_seconds > 0
    finally:
        await next_stage.close()
        await peers.close()
    assert events.index("sent 1") < events.index("answered 0"), events
    assert [e for e in events if e.startswith("answered")] == [
        f"answered {k}" for k in range(len(chunks))
    ]


async def test_a_prompt_relay_answers_every_chunk_in_order_on_every_stage(
    tiny_llama, start_workers
):
    clients = await start_workers(3)
    await load_ring(tiny_llama, clients, [3, 2, 3])
    session_id = uuid.uuid4().hex
    for i, client in enumerate(clients):
        await client.open_session(session_id, 0, SamplingParams() if i == 2 else None)
    relay = PromptRelay(clients, STEP_TIMEOUT_S)
    answered: list[tuple[int, list[HopTiming]]] = []
    try:
        await relay.run(session_id, chunked(PROMPT, 16), 0, lambda k, e: answered.append((k, e)))
    finally:
        await relay.close()
    assert [k for k, _ in answered] == [0, 1, 2]
    for _, hops in answered:  # each stage's own compute, and the time into it beyond it
        assert len(hops) == 3 and all(h.compute > 0 and h.round_trip >= h.compute for h in hops)
    assert all(c.last_step_network_s is not None for c in clients)
    for client in clients:  # every stage holds the whole prompt
        assert (await client.info()).kv_used_tokens >= len(PROMPT)


@pytest.mark.parametrize("missing", [1, 2])
async def test_a_stage_without_the_session_fails_the_relay_naming_its_index(
    tiny_llama, start_workers, missing
):
    clients = await start_workers(3)
    await load_ring(tiny_llama, clients, [3, 2, 3])
    session_id = uuid.uuid4().hex
    for i, client in enumerate(clients):
        if i != missing:
            await client.open_session(session_id)
    relay = PromptRelay(clients, STEP_TIMEOUT_S)
    answered: list[int] = []
    try:
        with pytest.raises(RingFailed) as failed:
            await relay.run(session_id, chunked(PROMPT, 16), 0, lambda k, e: answered.append(k))
    finally:
        await relay.close()
    assert failed.value.index == missing
    assert failed.value.client is clients[missing]
    assert isinstance(failed.value.cause, SessionNotFound)
    assert answered == []
    assert relay.done


@pytest.mark.parametrize("in_band", [True, False])
async def test_a_failed_relayed_step_is_answered_in_band_only_when_asked(
    tiny_llama, start_workers, in_band
):
    """With the in-band key a failure further down is the call's last answer, naming its
    stage and kind, and the call ends OK; without it, the call's status says it."""
    first, last = await start_workers(2)
    await load_ring(tiny_llama, [first, last], [5, 3])
    session_id = uuid.uuid4().hex
    await first.open_session(session_id)  # not on the last stage
    request = pb.ForwardRequest(step_id=3, session_ids=[session_id], offsets=[0])
    tensor.encode(mx.array([PROMPT[:8]], dtype=mx.uint32), out=request.token_ids)
    metadata = Route((last.address,), STEP_TIMEOUT_S).metadata()
    if in_band:
        metadata += ((FAILURES_IN_BAND_KEY, "1"),)
    async with grpc.aio.insecure_channel(first.address, options=CHANNEL_OPTIONS) as channel:
        call = pb_grpc.LayerServiceStub(channel).Forward(metadata=metadata, timeout=30.0)
        await call.write(request)
        if in_band:
            reply = await call.read()
            assert reply.failure.stage == 1
            assert reply.failure.kind == SessionNotFound.kind
            assert reply.failure.code == grpc.StatusCode.NOT_FOUND.value[0]
            assert session_id[:8] in reply.failure.message
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
        else:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call.read()
            assert failed.value.code() == grpc.StatusCode.NOT_FOUND
            assert (STAGE_KEY, "1") in tuple(failed.value.trailing_metadata())

    async def ended() -> bool:  # the failed call ends its sessions, just after it answers
        return (await first.info()).sessions_open == 0

    await wait_until(ended, within_s=5.0)


async def test_a_prompt_cut_short_leaves_the_relay_to_the_next_one(tiny_llama, start_workers):
    """A prompt cancelled mid-way (its request timed out) ends the relay's call; the
    next prompt on the same relay gets a new one and goes through."""
    clients = await start_workers(2)
    await load_ring(tiny_llama, clients, [4, 4])
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    for session_id in (first, second):
        for client in clients:
            await client.open_session(session_id)
    relay = PromptRelay(clients, STEP_TIMEOUT_S)
    answered: list[tuple[str, int]] = []
    started = asyncio.Event()

    def note(session_id: str) -> Callable[[int, list[HopTiming]], None]:
        def answered_chunk(k: int, hops: list[HopTiming]) -> None:
            answered.append((session_id, k))
            started.set()

        return answered_chunk

    try:
        cut = asyncio.create_task(relay.run(first, chunked(PROMPT * 4, 4), 0, note(first)))
        await started.wait()
        cut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cut
        await relay.run(second, chunked(PROMPT, 16), 0, note(second))
    finally:
        await relay.close()
    assert [k for s, k in answered if s == second] == [0, 1, 2]
    assert len([k for s, k in answered if s == first]) < len(PROMPT)  # 40 chunks: cut short
    assert not relay.done
