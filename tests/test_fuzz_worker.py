"""Fuzz a real worker's gRPC surface: bad input gets a contract status, never kills it.

Every example runs against one in-process worker (gRPC on port 0, layers [2, 6)
of the tiny llama) and ends with the same checks: the worker answers Info,
holds no session and no KV token the example did not end, and a fresh probe
session round-trips. Inputs the fuzzing once found breaking the contract
have tests of their own at the end of the file.

Each fuzz test also checks its own coverage once its examples ran: every kind
of input was drawn a number of times, and both accepted and refused inputs
came up, so a strategy that stops producing some kind of case fails the test
instead of passing on the easy ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import mlx.core as mx
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from mlx_cluster import tensor
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import CHANNEL_OPTIONS

HIDDEN = 64  # the tiny models' hidden size
BUDGET = 200  # the worker's KV budget in tokens; long steps run past it
CALL_TIMEOUT_S = 10.0  # a call still open after this counts as a hang
EXAMPLE_TIMEOUT_S = 60.0  # one whole example, checks included
FORWARD_METHOD = "/mlx_cluster.v1.LayerService/Forward"

# The statuses a bad Forward may end with (see protos/.../layer_service.proto).
STEP_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Session calls may also find the id already open.
SESSION_CODES = STEP_CODES | {grpc.StatusCode.ALREADY_EXISTS}

# No example database: the examples of every test come from one inner function (`fuzz`).
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


async def fuzz(
    example: Callable[..., Awaitable[None]], max_examples: int, **strategies: SearchStrategy
) -> None:
    """Run `example(**drawn)` on this event loop once per set of arguments hypothesis draws.

    Hypothesis draws (and shrinks) on a thread; every example runs on this loop,
    where the worker's server and channel live. A failing example fails the caller
    with hypothesis's report; once all examples passed, the caller checks coverage.
    """
    loop = asyncio.get_running_loop()

    @settings(FUZZ, max_examples=max_examples)
    @given(st.fixed_dictionaries(strategies))
    def run(drawn: dict[str, Any]) -> None:
        asyncio.run_coroutine_threadsafe(example(**drawn), loop).result(EXAMPLE_TIMEOUT_S)

    await asyncio.to_thread(run)


def assert_covered(seen: Counter, wanted: Iterable, at_least: int, what: str) -> None:
    """Each of `wanted` came up at least `at_least` times among the cases counted in `seen`."""
    short = {str(k): seen[k] for k in wanted if seen[k] < at_least}
    assert not short, f"{what}: fewer than {at_least} cases of {short}; all: {dict(seen)}"


# --- the worker ---------------------------------------------------------------------


class Worker:
    """A raw stub to a loaded worker, and the checks every example ends with."""

    def __init__(self, channel: grpc.aio.Channel, model: Path) -> None:
        self.channel = channel
        self.stub = pb_grpc.LayerServiceStub(channel)
        self.model = model

    async def load(self) -> None:
        await self.stub.LoadLayers(
            pb.LoadLayersRequest(model=str(self.model), start=2, end=6, kv_budget_tokens=BUDGET),
            timeout=60,
        )

    async def open(self, *session_ids: str) -> None:
        for sid in session_ids:
            await self.stub.OpenSession(pb.OpenSessionRequest(session_id=sid), timeout=5)

    async def end_all(self, session_ids: list[str]) -> None:
        await self.stub.EndSession(pb.EndSessionRequest(session_ids=session_ids), timeout=5)

    async def assert_healthy(self) -> None:
        """Info answers with nothing left open, and a fresh session round-trips."""
        info = await self.stub.Info(pb.InfoRequest(), timeout=5)
        assert (info.sessions_open, info.kv_used_tokens) == (0, 0), info
        assert (info.layer_start, info.layer_end, info.hidden_size) == (2, 6, HIDDEN)
        await self.open("probe")
        code, replies = await send_steps(self.stub, [step(["probe"], mx.ones((1, 3, HIDDEN)), [0])])
        assert code == grpc.StatusCode.OK and tuple(replies[0].hidden.shape) == (1, 3, HIDDEN)
        await self.end_all(["probe"])


@pytest.fixture
async def worker(start_workers, tiny_llama):
    (client,) = await start_workers(1)
    channel = grpc.aio.insecure_channel(client.address, options=CHANNEL_OPTIONS)
    w = Worker(channel, tiny_llama)
    await w.load()
    yield w
    await channel.close()


def step(session_ids, hidden: mx.array, offsets, step_id: int = 1) -> pb.ForwardRequest:
    return pb.ForwardRequest(
        step_id=step_id, session_ids=session_ids, hidden=tensor.encode(hidden), offsets=offsets
    )


async def send_steps(stub, requests) -> tuple[grpc.StatusCode, list[pb.ForwardResponse]]:
    """Write steps on one Forward stream, reading each answer; returns the final status."""
    call = stub.Forward(timeout=CALL_TIMEOUT_S)
    replies: list[pb.ForwardResponse] = []
    try:
        for request in requests:
            await call.write(request)
            replies.append(await call.read())
        await call.done_writing()
        return await call.code(), replies
    except grpc.aio.AioRpcError as exc:
        return exc.code(), replies


# --- (a) mutated ForwardRequests ----------------------------------------------------

CASTS = sorted(set(tensor.DTYPES) - {"float32"})
dtype_names = (
    st.sampled_from(sorted(tensor.DTYPES))
    | st.sampled_from(["", "float128", "Float32", "bf16", "float32\x00", "float32 "])
    | st.text(max_size=12)
)
dims = st.integers(-(2**63), 2**63 - 1) | st.sampled_from(
    [0, -1, 1, 2, HIDDEN - 1, HIDDEN, HIDDEN + 1, 2**31 - 1, 2**31, 2**40]
)
session_ids = st.sampled_from(["a", "b", "c", "ghost", "", "x" * 129]) | st.text(max_size=40)

# Each mutation is (kind, argument); `mutate` applies them in order.
MUTATIONS: dict[str, SearchStrategy] = {
    "dtype": dtype_names,  # rename the dtype, keep the bytes
    "cast": st.sampled_from(CASTS),  # a valid tensor of another dtype
    "shape": st.lists(dims, max_size=10),  # declared shape only
    "reshape": st.lists(st.integers(0, 4), max_size=5),  # bytes match
    "truncate": st.integers(1, 1024),
    "extend": st.binary(min_size=1, max_size=64),
    "garbage": st.binary(max_size=1024),
    "fill": st.sampled_from([math.nan, math.inf, -math.inf, 3e38]),
    "long": st.integers(BUDGET - 8, BUDGET + 40),  # L near the budget
    "session_ids": st.lists(session_ids, max_size=4),
    "duplicate": st.none(),
    "offsets": st.lists(st.integers(0, 2**64 - 1), max_size=4),
    "offset_shift": st.integers(-3, 3),
    "missing_hidden": st.none(),
    "step_id": st.integers(0, 2**64 - 1),
}
mutations = st.one_of(*(st.tuples(st.just(kind), arg) for kind, arg in MUTATIONS.items()))
FREE_EXAMPLES = 40  # up to three mutations of any kinds, none included
EXAMPLES_PER_KIND = 14  # up to three mutations, one of them of a given kind


def changes_with(kind: str) -> SearchStrategy[list[tuple[str, Any]]]:
    """Up to three mutations, one of them of `kind`, at any place in the order.

    Hypothesis alone may leave a kind out of a whole run (its draws are far from
    uniform), so each kind gets examples of its own.
    """
    forced = st.tuples(st.just(kind), MUTATIONS[kind])
    return st.builds(
        lambda others, one, at: [*others[:at], one, *others[at:]],
        st.lists(mutations, max_size=2),
        forced,
        st.integers(0, 2),
    )


def _small(shape) -> bool:
    """A shape MLX can build (dims are int32) with few elements (an earlier mutation may
    have declared any shape, e.g. [6429944580, 0])."""
    return max(shape, default=0) < 2**31 and math.prod(shape) < 2**16


def mutate(request: pb.ForwardRequest, kind: str, arg) -> None:
    hidden = request.hidden
    if kind == "dtype":
        hidden.dtype = arg
    elif kind == "cast":
        with contextlib.suppress(ValueError):  # an earlier mutation may have broken it
            tensor.encode(tensor.decode(hidden).astype(tensor.DTYPES[arg]), out=hidden)
    elif kind == "shape":
        hidden.shape[:] = arg
    elif kind == "reshape":
        tensor.encode(mx.zeros(tuple(arg)), out=hidden)
    elif kind == "truncate":
        hidden.data = hidden.data[:-arg]
    elif kind == "extend":
        hidden.data += arg
    elif kind == "garbage":
        hidden.data = arg
    elif kind == "fill" and min(hidden.shape, default=0) >= 0 and _small(hidden.shape):
        tensor.encode(mx.full(tuple(hidden.shape), arg), out=hidden)
    elif kind == "long":
        tensor.encode(mx.ones((len(request.session_ids), arg, HIDDEN)), out=hidden)
    elif kind == "session_ids":
        request.session_ids[:] = arg
    elif kind == "duplicate":
        request.session_ids[:] = [*request.session_ids, *request.session_ids[:1]]
    elif kind == "offsets":
        request.offsets[:] = arg
    elif kind == "offset_shift":
        request.offsets[:] = [max(o + arg, 0) for o in request.offsets]
    elif kind == "missing_hidden":
        request.ClearField("hidden")
    elif kind == "step_id":
        request.step_id = arg


async def test_mutated_forward_requests_get_contract_statuses(worker):
    kinds: Counter[str] = Counter()
    codes: Counter[grpc.StatusCode] = Counter()

    async def example(batch, length, last_only, after_valid_step, changes) -> None:
        # Session a is empty, b holds 2 tokens: a valid step names both at their offsets.
        # (Ended first: an example that failed half-way must not change the next one,
        # or Hypothesis cannot replay a failure.)
        await worker.end_all(["a", "b", "c"])
        await worker.open("a", "b", "c")
        code, _ = await send_steps(worker.stub, [step(["b"], mx.ones((1, 2, HIDDEN)), [0])])
        assert code == grpc.StatusCode.OK
        request = step(
            ["a", "b"][:batch], mx.random.normal((batch, length, HIDDEN)), [0, 2][:batch]
        )
        request.last_position_only = last_only
        for kind, arg in changes:
            mutate(request, kind, arg)
        # Optionally the bad step comes second on a stream that already served one.
        first = [step(["c"], mx.ones((1, 1, HIDDEN)), [0])] if after_valid_step else []

        code, replies = await send_steps(worker.stub, [*first, request])
        kinds.update(kind for kind, _ in changes)
        codes[code] += 1
        assert code in STEP_CODES, code
        if first:
            assert replies and tuple(replies[0].hidden.shape) == (1, 1, HIDDEN)
        if not changes:
            assert code == grpc.StatusCode.OK
        if code == grpc.StatusCode.OK:
            reply = replies[-1]
            out = tensor.decode(reply.hidden)
            rows, positions = len(request.session_ids), request.hidden.shape[1]
            assert reply.step_id == request.step_id
            assert out.shape == (rows, 1 if last_only else positions, HIDDEN)
        else:
            # A refused step changed nothing: the same sessions still step from their offsets.
            valid = step(["a", "b"], mx.ones((2, 1, HIDDEN)), [0, 2])
            code, _ = await send_steps(worker.stub, [valid])
            assert code == grpc.StatusCode.OK

        await worker.end_all(["a", "b", "c"])
        await worker.assert_healthy()

    shapes = dict(
        batch=st.integers(1, 2),
        length=st.integers(1, 4),
        last_only=st.booleans(),
        after_valid_step=st.booleans(),
    )
    await fuzz(example, FREE_EXAMPLES, **shapes, changes=st.lists(mutations, max_size=3))
    for kind in MUTATIONS:
        await fuzz(example, EXAMPLES_PER_KIND, **shapes, changes=changes_with(kind))
    assert_covered(kinds, MUTATIONS, EXAMPLES_PER_KIND, "mutation kinds")
    # Steps were accepted as well as refused, and a step past the KV budget came up.
    assert_covered(codes, [grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT], 5, "statuses")
    assert_covered(codes, [grpc.StatusCode.RESOURCE_EXHAUSTED], 1, "statuses")


# --- (b) raw bytes as the serialized ForwardRequest ---------------------------------


@st.composite
def corrupted(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` with some bytes flipped, cut off or inserted."""
    data = bytearray(valid)
    for position, mask in draw(st.lists(st.tuples(st.integers(0), st.integers(1, 255)))):
        data[position % len(data)] ^= mask
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    insert_at = draw(st.integers(0, len(data)))
    data[insert_at:insert_at] = draw(st.binary(max_size=16))
    return bytes(data)


def parses(payload: bytes) -> bool:
    try:
        pb.ForwardRequest.FromString(payload)
    except DecodeError:
        return False
    return True


VALID_BYTES = step(["a"], mx.ones((1, 2, HIDDEN)), [0]).SerializeToString()


async def test_raw_bytes_on_the_forward_stream_never_kill_the_worker(worker):
    forms: Counter[str] = Counter()
    codes: Counter[grpc.StatusCode] = Counter()
    raw = worker.channel.stream_stream(
        FORWARD_METHOD, request_serializer=None, response_deserializer=None
    )

    async def example(payload: bytes) -> None:
        await worker.open("a")
        call = raw(timeout=CALL_TIMEOUT_S)
        try:
            await call.write(payload)
            await call.read()
            await call.done_writing()
            code = await call.code()
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        forms["parses" if parses(payload) else "does not parse"] += 1
        codes[code] += 1
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, "the worker left the stream hanging"
        if parses(payload):
            assert code in STEP_CODES, code
        else:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, code
        await worker.end_all(["a"])
        await worker.assert_healthy()

    await fuzz(example, 200, payload=st.binary(max_size=512) | corrupted(VALID_BYTES))
    # Both kinds of payload came up, and some parsed into a step the worker ran.
    assert_covered(forms, ["parses", "does not parse"], 3, "payloads")
    assert_covered(codes, [grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT], 2, "statuses")


# --- (c) random session and loading calls -------------------------------------------

model_paths = st.just("MODEL") | (
    st.sampled_from(["", "/", "/nonexistent", "MODEL/config.json", ".", "m" * 300])
    | st.text(max_size=60)
)
# Half the calls name sessions that steps extend, so truncation and reuse get exercised.
ids = st.sampled_from(["a", "b"]) | session_ids
uint32 = st.integers(0, 9) | st.integers(0, 2**32 - 1)
calls = st.one_of(
    st.tuples(st.just("open"), ids, st.integers(0, 2**64 - 1) | st.integers(0, 300)),
    st.tuples(st.just("step"), st.sampled_from(["a", "b"]), st.integers(1, 120)),
    st.tuples(st.just("truncate"), ids, st.integers(0, 2**64 - 1) | st.integers(0, 8)),
    st.tuples(st.just("end"), st.lists(ids, max_size=4)),
    st.tuples(
        st.just("load"),
        model_paths,
        st.sampled_from([(2, 6), (0, 8), (7, 8)]) | st.tuples(uint32, uint32),
        st.integers(0, 2**64 - 1) | st.integers(0, 400),
        st.floats(min_value=0, max_value=1e6) | st.sampled_from([-1.0, math.nan, math.inf]),
    ),
    st.tuples(st.just("info")),
)
CALL_KINDS = ("open", "step", "truncate", "end", "load", "info")


async def make_call(worker: Worker, offsets: dict[str, int], call: tuple) -> grpc.StatusCode:
    """Run one drawn call; `offsets` tracks the tokens of the sessions steps may extend."""
    kind, *args = call
    stub = worker.stub
    try:
        if kind == "open":
            request = pb.OpenSessionRequest(session_id=args[0], reserve_tokens=args[1])
            await stub.OpenSession(request, timeout=5)
            offsets[args[0]] = 0
        elif kind == "step":
            sid, length = args
            request = step([sid], mx.ones((1, length, HIDDEN)), [offsets.get(sid, 0)])
            code, _ = await send_steps(stub, [request])
            if code == grpc.StatusCode.OK:
                offsets[sid] += length
            return code
        elif kind == "truncate":
            request = pb.TruncateSessionRequest(session_id=args[0], length=args[1])
            reply = await stub.TruncateSession(request, timeout=5)
            offsets[args[0]] = reply.length
        elif kind == "end":
            await stub.EndSession(pb.EndSessionRequest(session_ids=args[0]), timeout=5)
            for sid in args[0]:
                offsets.pop(sid, None)
        elif kind == "load":
            model, (start, end), budget, ttl = args
            model = model.replace("MODEL", str(worker.model))
            request = pb.LoadLayersRequest(
                model=model, start=start, end=end, kv_budget_tokens=budget, session_ttl_s=ttl
            )
            reply = await stub.LoadLayers(request, timeout=60)
            if reply.reloaded:
                offsets.clear()
        else:
            await stub.Info(pb.InfoRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_random_session_and_load_calls_get_contract_statuses(worker):
    outcomes: Counter[tuple[str, str]] = Counter()  # (call kind, "accepted" or "refused")

    async def example(sequence: list[tuple]) -> None:
        await worker.open("a", "b")
        offsets = {"a": 0, "b": 0}
        for call in sequence:
            code = await make_call(worker, offsets, call)
            outcomes[call[0], "accepted" if code == grpc.StatusCode.OK else "refused"] += 1
            assert code in SESSION_CODES, (call, code)
        # Put the slice back (a failed load drops it) and end whatever is open.
        await worker.load()
        opened = [c[1] for c in sequence if c[0] == "open" and 0 < len(c[1]) <= 128]
        await worker.end_all(["a", "b", *(sid for sid in opened if sid.isprintable())])
        await worker.assert_healthy()

    await fuzz(example, 120, sequence=st.lists(calls, min_size=1, max_size=5))
    kinds: Counter[str] = Counter()
    for (kind, _), count in outcomes.items():
        kinds[kind] += count
    assert_covered(kinds, CALL_KINDS, 5, "call kinds")
    # Steps really extended sessions (so truncation had tokens to cut), and bad
    # arguments were refused, not only accepted.
    wanted = [
        ("step", "accepted"),
        ("open", "refused"),
        ("truncate", "refused"),
        ("load", "refused"),
    ]
    assert_covered(outcomes, wanted, 3, "outcomes")


# --- cases the fuzzing found -----------------------------------------------------------


async def test_undecodable_forward_bytes_are_invalid_argument(worker):
    raw = worker.channel.stream_stream(
        FORWARD_METHOD, request_serializer=None, response_deserializer=None
    )
    call = raw(timeout=CALL_TIMEOUT_S)
    await call.write(b"\xff\xff\xff")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


def bad_model_dir(root: Path, name: str, config: str) -> str:
    (root / name).mkdir()
    (root / name / "config.json").write_text(config)
    return str(root / name)


@pytest.mark.parametrize("case", ["name-too-long", "config-is-a-list", "config-without-type"])
async def test_unreadable_model_dirs_are_invalid_argument(worker, tmp_path, case):
    model = {
        "name-too-long": lambda: "m" * 300,
        "config-is-a-list": lambda: bad_model_dir(tmp_path, case, "[1, 2]"),
        "config-without-type": lambda: bad_model_dir(tmp_path, case, '{"hidden_size": 64}'),
    }[case]()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await worker.stub.LoadLayers(pb.LoadLayersRequest(model=model, start=0, end=1), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


async def test_model_dir_without_weights_is_invalid_argument(worker, tmp_path):
    config = (worker.model / "config.json").read_text()
    model = bad_model_dir(tmp_path, "no-weights", json.dumps(json.loads(config)))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await worker.stub.LoadLayers(pb.LoadLayersRequest(model=model, start=0, end=1), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


@pytest.mark.parametrize("ttl", [-1.0, math.nan])
async def test_negative_or_nan_session_ttl_is_invalid_argument(worker, ttl):
    request = pb.LoadLayersRequest(model=str(worker.model), start=0, end=1, session_ttl_s=ttl)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await worker.stub.LoadLayers(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
