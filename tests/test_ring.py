"""The decode ring: the first stage's loop, real workers relaying to each other, failures.

DecodeLoop is tested alone with a step of its own (the loop takes it as a
parameter); everything else runs on real in-process workers on port 0 with a
tiny random model, compared with single-process mlx-lm's greedy tokens.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import mlx.core as mx
import pytest
from mlx_lm.utils import load_config

from mlx_cluster import tensor
from mlx_cluster.contract.errors import InvalidArgument, SessionNotFound, WorkerUnavailable
from mlx_cluster.contract.layers import split_by_counts
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import CHANNEL_OPTIONS, DEFAULT_STEP_TIMEOUT_S, Route
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.ring import Ring, RingFailed
from mlx_cluster.worker.ring import DecodeLoop, StepResult
from tests.test_golden import reference

PROMPTS = ([11, 52, 7, 99, 23, 64, 5, 180, 42, 8, 77, 3], [200, 14, 9, 31, 150, 6, 72])
NEW_TOKENS = 12
STEP_TIMEOUT_S = 5.0
# A worker that just stopped is noticed within this (the relay's failure, or the step's
# deadline), and sessions of a broken ring are ended on the others within it too.
FAILURE_BOUND_S = 10.0


# --- DecodeLoop alone ------------------------------------------------------------------------


class FakeRing:
    """A ring step that answers token 100 * (row's offset) + 1 for each row, and records
    every step; with `gate` cleared, a step waits for it (a step in progress)."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[str], list[int], list[int]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()  # set whenever a step starts
        self.aheads: list[bool] = []  # each step's hint that the next carries the same rows

    @staticmethod
    def token(offset: int) -> int:
        return 100 * offset + 1

    async def __call__(
        self, ids: list[str], offsets: list[int], tokens: list[list[int]], ahead: bool
    ) -> StepResult:
        assert all(len(row) == 1 for row in tokens), "no row drafts here"
        self.steps.append((ids, offsets, [row[0] for row in tokens]))
        self.aheads.append(ahead)
        self.started.set()
        await self.gate.wait()
        sampled = [[pb.Sampled(token=self.token(o))] for o in offsets]
        return StepResult(sampled, stage_compute_s=[0.3, 0.2], relay_s=0.25)


def row(session_id: str, offset: int = 10, token: int = 7, max_tokens: int = 100, stop=()):
    return pb.DecodeRow(
        session_id=session_id,
        offset=offset,
        token=token,
        max_tokens=max_tokens,
        stop_tokens=stop,
    )


def add(*rows: pb.DecodeRow) -> pb.DecodeCommand:
    return pb.DecodeCommand(add=rows)


async def next_event(events: AsyncIterator[pb.DecodeEvent]) -> pb.DecodeEvent:
    return await asyncio.wait_for(anext(events), 2.0)


async def test_a_row_steps_with_the_token_it_was_given_then_each_sampled_one():
    ring = FakeRing()
    loop = DecodeLoop(ring, max_rows=4)
    loop.command(add(row("a", offset=10, token=7, max_tokens=3)))
    events = loop.events()
    got = [await next_event(events) for _ in range(3)]
    assert [list(e.session_ids) for e in got] == [["a"]] * 3
    assert [e.sampled[0].token for e in got] == [1001, 1101, 1201]
    assert ring.steps == [(["a"], [10], [7]), (["a"], [11], [1001]), (["a"], [12], [1101])]
    # exactly max_tokens tokens: reported as left in the event of its last step
    assert [list(e.left) for e in got] == [[], [], ["a"]]
    assert ring.aheads == [True, True, False]  # no step is started ahead of its last
    assert (got[0].compute_seconds, got[0].relay_seconds) == (0.5, 0.25)
    assert list(got[0].stage_compute_seconds) == [0.3, 0.2]  # each stage's, in order
    loop.close()
    with pytest.raises(StopAsyncIteration):
        await next_event(events)
    assert len(ring.steps) == 3  # no step after its last


async def test_a_row_added_during_a_step_joins_at_the_next_one():
    ring = FakeRing()
    loop = DecodeLoop(ring, max_rows=4)
    loop.command(add(row("a")))
    events = loop.events()
    await next_event(events)
    ring.gate.clear()
    ring.started.clear()
    pending = asyncio.ensure_future(next_event(events))
    await asyncio.wait_for(ring.started.wait(), 2.0)  # a step is in progress
    loop.command(add(row("b", offset=3, token=9)))
    ring.gate.set()
    during = await pending
    assert list(during.session_ids) == ["a"]
    after = await next_event(events)
    assert list(after.session_ids) == ["a", "b"]
    assert ring.steps[-1] == (["a", "b"], [12, 3], [FakeRing.token(11), 9])
    assert after.sampled[1].token == FakeRing.token(3)
    loop.close()


async def test_a_stop_token_ends_its_row_and_is_reported_with_it():
    ring = FakeRing()
    loop = DecodeLoop(ring, max_rows=4)
    stop = FakeRing.token(11)  # what the second step samples for "a"
    loop.command(add(row("a", offset=10, stop=[stop]), row("b", offset=50)))
    events = loop.events()
    first, second, third = [await next_event(events) for _ in range(3)]
    assert list(first.left) == []
    assert [s.token for s in second.sampled] == [stop, FakeRing.token(51)]
    assert list(second.left) == ["a"]
    assert list(third.session_ids) == ["b"] and list(third.left) == []
    loop.close()


async def test_a_dropped_row_leaves_before_the_next_step_and_is_reported():
    ring = FakeRing()
    loop = DecodeLoop(ring, max_rows=4)
    loop.command(add(row("a"), row("b")))
    events = loop.events()
    await next_event(events)
    loop.command(pb.DecodeCommand(drop=["a", "never-added"]))  # an unknown id is no error
    event = await next_event(events)
    assert list(event.session_ids) == ["b"]
    assert list(event.left) == ["a"]
    assert ring.steps[-1][0] == ["b"]
    # the last row dropped: an event without a step reports it, then the loop waits
    loop.command(pb.DecodeCommand(drop=["b"]))
    event = await next_event(events)
    assert list(event.session_ids) == [] and list(event.left) == ["b"]
    # an unknown id dropped while no row is in the loop: no step, no event; close ends it
    steps = len(ring.steps)
    loop.command(pb.DecodeCommand(drop=["gone"]))
    loop.close()
    rest = [e async for e in events]
    assert rest == []
    assert len(ring.steps) == steps


@pytest.mark.parametrize(
    "commands, message",
    [
        ([add(row("a")), add(row("a"))], "already in the loop"),
        ([add(row("a"), row("a"))], "already in the loop"),
        ([add(row("a"), row("b"), row("c"))], "at most 2"),
        ([add(row("a", max_tokens=0))], "max_tokens >= 1"),
    ],
    ids=["again", "twice-in-one", "over-max-rows", "max-tokens-0"],
)
async def test_bad_rows_raise_invalid_argument_from_events(commands, message):
    ring = FakeRing()
    loop = DecodeLoop(ring, max_rows=2)
    for command in commands:
        loop.command(command)
    with pytest.raises(InvalidArgument, match=message):
        async for _ in loop.events():
            pass
    assert ring.steps == []


async def test_close_ends_events_while_waiting_for_rows():
    loop = DecodeLoop(FakeRing(), max_rows=2)
    waiting = asyncio.ensure_future(anext(loop.events()))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    loop.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 2.0)


# --- real workers ----------------------------------------------------------------------------


async def load_ring(model: Path, clients: Sequence[WorkerClient], counts: Sequence[int]) -> None:
    """Layers `counts` on each client in order, the embedding on the first, the head on the last."""
    total = load_config(model)["num_hidden_layers"]
    for client, r in zip(clients, split_by_counts(list(counts), total), strict=True):
        await client.load_layers(
            str(model), r.start, r.end, embedding=r.start == 0, head=r.end == total
        )


async def prefilled(clients: Sequence[WorkerClient], prompt: Sequence[int]) -> pb.DecodeRow:
    """A session open on every stage holding all but the prompt's last token, as the row that
    decodes it (greedy, NEW_TOKENS tokens); as RequestState.new and Chain._through do."""
    session_id = uuid.uuid4().hex
    last = len(clients) - 1
    for i, client in enumerate(clients):
        await client.open_session(session_id, 0, SamplingParams() if i == last else None)
    tokens = mx.array(list(prompt[:-1]), dtype=mx.uint32)[None]
    hidden = None
    for i, client in enumerate(clients):
        stream = client.open_stream(30.0)
        token_ids = tokens if i in (0, last) else None
        hidden, _ = await stream.step([session_id], hidden, [0], i == last, token_ids)
        await stream.close()
    return pb.DecodeRow(
        session_id=session_id, offset=len(prompt) - 1, token=prompt[-1], max_tokens=NEW_TOKENS
    )


async def decode(ring: Ring, session_ids: set[str]) -> dict[str, list[int]]:
    """Each session's tokens until every one of them has left the ring."""
    tokens: dict[str, list[int]] = {sid: [] for sid in session_ids}
    left: set[str] = set()
    while left != session_ids:
        event = await ring.next_event()
        for sid, sampled in zip(event.session_ids, event.sampled, strict=True):
            tokens[sid].append(sampled.token)
        left.update(event.left)
    return tokens


@pytest.fixture(scope="module")
def greedy(model_factory) -> dict[int, list[int]]:
    """mlx-lm's greedy tokens for each prompt, by its index in PROMPTS."""
    model = model_factory("llama")
    params = SamplingParams(max_tokens=NEW_TOKENS)
    want = {i: [t for t, _ in reference(model, p, params)] for i, p in enumerate(PROMPTS)}
    assert want[0] != want[1] and len(set(want[0])) > 3, "a random model that repeats"
    return want


@pytest.mark.parametrize("counts", [[8], [5, 3], [1, 5, 2]], ids=["8", "5-3", "1-5-2"])
async def test_the_ring_gives_mlx_lm_greedy_tokens(tiny_llama, start_workers, greedy, counts):
    clients = await start_workers(len(counts))
    await load_ring(tiny_llama, clients, counts)
    row0 = await prefilled(clients, PROMPTS[0])
    ring = Ring(clients, STEP_TIMEOUT_S)
    await ring.send(add=[row0])
    got = await decode(ring, {row0.session_id})
    await ring.close()
    assert got[row0.session_id] == greedy[0]


@pytest.mark.parametrize("counts", [[8], [2, 3, 3]], ids=["8", "2-3-3"])
async def test_two_rows_in_one_ring_each_get_their_own_tokens(
    tiny_llama, start_workers, greedy, counts
):
    """The second row joins while the first decodes, at another offset (on one worker,
    the step it computed ahead for the first row alone is dropped)."""
    clients = await start_workers(len(counts))
    await load_ring(tiny_llama, clients, counts)
    row0, row1 = [await prefilled(clients, p) for p in PROMPTS]
    ring = Ring(clients, STEP_TIMEOUT_S)
    await ring.send(add=[row0])
    early = [(await ring.next_event()).sampled[0].token for _ in range(3)]
    await ring.send(add=[row1])
    rest = await decode(ring, {row0.session_id, row1.session_id})
    await ring.close()
    assert early + rest[row0.session_id] == greedy[0]
    assert rest[row1.session_id] == greedy[1]


async def sessions_open(clients: Sequence[WorkerClient]) -> list[int]:
    return [(await c.info()).sessions_open for c in clients]


async def wait_ended(clients: Sequence[WorkerClient], within_s: float = FAILURE_BOUND_S) -> None:
    """Until no client's worker holds a session (fails past `within_s`)."""
    started = time.monotonic()
    while (left := await sessions_open(clients)) != [0] * len(clients):
        assert time.monotonic() - started < within_s, f"sessions still open: {left}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("victim", [1, 2])
async def test_a_stopped_stage_breaks_the_ring_naming_its_index(tiny_llama, start_workers, victim):
    """The first stage relays where the ring broke; the surviving stages end the sessions."""
    clients = await start_workers(3)
    await load_ring(tiny_llama, clients, [2, 3, 3])
    decoding = await prefilled(clients, PROMPTS[0])
    decoding.max_tokens = 100_000
    ring = Ring(clients, STEP_TIMEOUT_S)
    await ring.send(add=[decoding])
    for _ in range(3):
        await ring.next_event()
    await start_workers.servers[clients[victim].address].stop(0)
    started = time.monotonic()
    with pytest.raises(RingFailed) as failed:
        for _ in range(100_000):
            await ring.next_event()
    assert time.monotonic() - started < FAILURE_BOUND_S
    assert failed.value.index == victim
    assert failed.value.client is clients[victim]
    assert isinstance(failed.value.cause, WorkerUnavailable), repr(failed.value.cause)
    assert ring.done
    await wait_ended([c for i, c in enumerate(clients) if i != victim])


async def test_a_cancelled_decode_call_ends_its_rows_sessions_on_every_stage(
    tiny_llama, start_workers
):
    clients = await start_workers(3)
    await load_ring(tiny_llama, clients, [2, 3, 3])
    rows = [await prefilled(clients, p) for p in PROMPTS]
    assert await sessions_open(clients) == [2, 2, 2]
    call = clients[0].decode_call(clients[1:], STEP_TIMEOUT_S, STEP_TIMEOUT_S)
    await call.write(pb.DecodeCommand(add=rows))
    for _ in range(2):
        event = await asyncio.wait_for(call.read(), STEP_TIMEOUT_S)
        assert len(event.session_ids) == 2
    call.cancel()
    await wait_ended(clients)


@pytest.mark.parametrize(
    "command",
    [
        pb.DecodeCommand(add=[pb.DecodeRow(session_id="", max_tokens=1)]),
        pb.DecodeCommand(add=[pb.DecodeRow(session_id="x" * 200, max_tokens=1)]),
        pb.DecodeCommand(drop=["x" * 200]),
    ],
    ids=["empty", "200-chars", "drop-200-chars"],
)
async def test_a_bad_session_id_ends_the_call_and_the_worker_serves_on(
    tiny_llama, start_workers, command
):
    clients = await start_workers(2)
    await load_ring(tiny_llama, clients, [5, 3])
    ring = Ring(clients, STEP_TIMEOUT_S)
    await ring.send(add=command.add, drop=command.drop)
    with pytest.raises(RingFailed) as failed:
        await ring.next_event()
    assert failed.value.index == 0 and failed.value.client is clients[0]
    assert isinstance(failed.value.cause, InvalidArgument), repr(failed.value.cause)
    assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "x" * 20 not in str(failed.value)  # no id echoed
    await ring.close()
    info = await clients[0].info()
    assert (info.layer_start, info.layer_end) == (0, 5)
    # and it still decodes
    decoding = await prefilled(clients, PROMPTS[0])
    ring = Ring(clients, STEP_TIMEOUT_S)
    await ring.send(add=[decoding])
    assert len((await ring.next_event()).sampled) == 1
    await ring.close()


async def test_a_relayed_forward_step_answers_with_the_last_stages_token(
    tiny_llama, start_workers, greedy
):
    """Forward to the first stage with a route: the prompt goes on to the last, which
    samples; its token comes back as the first stage's answer."""
    first, last = await start_workers(2)
    await load_ring(tiny_llama, [first, last], [5, 3])
    session_id = uuid.uuid4().hex
    await first.open_session(session_id)
    await last.open_session(session_id, 0, SamplingParams())
    request = pb.ForwardRequest(step_id=7, session_ids=[session_id], offsets=[0], sample=True)
    tensor.encode(mx.array([PROMPTS[0]], dtype=mx.uint32), out=request.token_ids)
    async with grpc.aio.insecure_channel(first.address, options=CHANNEL_OPTIONS) as channel:
        call = pb_grpc.LayerServiceStub(channel).Forward(
            metadata=Route((last.address,), STEP_TIMEOUT_S).metadata(), timeout=30.0
        )
        await call.write(request)
        reply = await call.read()
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert reply.step_id == 7
    assert [s.token for s in reply.sampled] == greedy[0][:1]
    assert reply.compute_seconds > 0
    assert reply.relay_seconds >= 0
    assert not reply.HasField("hidden")
    # both stages cached the prompt: the session goes on at offset len(prompt)
    assert [i.kv_used_tokens > 0 for i in [await first.info(), await last.info()]] == [True] * 2


@pytest.mark.parametrize("missing", [0, 1, 2])
async def test_a_stage_without_the_session_breaks_the_ring_naming_its_index(
    tiny_llama, start_workers, missing
):
    """The failed stage's own error comes back with its index; the call ended badly, so the
    row's session ends on every stage (layer_service.proto, Decode), also on the stages the
    failed step never reached."""
    clients = await start_workers(3)
    await load_ring(tiny_llama, clients, [2, 3, 3])
    decoding = await prefilled(clients, PROMPTS[0])
    await clients[missing].end_sessions([decoding.session_id])
    ring = Ring(clients, STEP_TIMEOUT_S)
    await ring.send(add=[decoding])
    with pytest.raises(RingFailed) as failed:
        await ring.next_event()
    assert failed.value.index == missing and failed.value.client is clients[missing]
    assert isinstance(failed.value.cause, SessionNotFound), repr(failed.value.cause)
    # the failed worker is named once, by its name, however far down the ring it is
    message = str(failed.value.cause)
    assert message.startswith(f"worker {clients[missing].name}: "), message
    assert not any(f"worker {c.address}" in message for c in clients), message
    await wait_ended(clients, within_s=2.0)


def test_a_route_carries_both_step_timeouts_and_a_bad_one_keeps_the_default():
    route = Route(("10.0.0.2:1", "10.0.0.3:1"), 2.5, "workers", 90.0)
    assert Route.of_call(route.metadata()) == route
    assert route.onward() == Route(("10.0.0.3:1",), 2.5, "workers", 90.0)
    bad = [(k, "soon" if "draft" in k else v) for k, v in route.metadata()]
    assert Route.of_call(bad).draft_step_timeout_s == DEFAULT_STEP_TIMEOUT_S
    assert Route.of_call(bad).step_timeout_s == 2.5
