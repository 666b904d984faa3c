"""The worker's gRPC contract: bad input gets a clear status and the worker keeps serving."""

from __future__ import annotations

import grpc
import mlx.core as mx
import pytest

from mlx_cluster import tensor
from mlx_cluster.contract.errors import (
    ERROR_KIND_KEY,
    WIRE_ERRORS,
    ClusterError,
    KVCapacityExceeded,
    MessageTooLarge,
    NotLoaded,
    OffsetMismatch,
    WorkerUnavailable,
    error_from_status,
)
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from mlx_cluster.worker.settings import WorkerSettings

HIDDEN = 64  # the tiny models' hidden size


@pytest.fixture
async def worker(start_workers, tiny_llama):
    """A worker holding layers [2, 6) of the tiny llama, and a raw stub to it."""
    (client,) = await start_workers(1, kv_budget_tokens=100)
    await client.load_layers(str(tiny_llama), 2, 6)
    channel = grpc.aio.insecure_channel(client.address, options=CHANNEL_OPTIONS)
    yield pb_grpc.LayerServiceStub(channel), tiny_llama
    await channel.close()


def step(session_ids, hidden, offsets, step_id=1) -> pb.ForwardRequest:
    return pb.ForwardRequest(
        step_id=step_id, session_ids=session_ids, hidden=tensor.encode(hidden), offsets=offsets
    )


async def forward_once(stub, request) -> pb.ForwardResponse:
    call = stub.Forward(timeout=10)
    await call.write(request)
    reply = await call.read()
    await call.done_writing()
    return reply


async def assert_status(
    code: grpc.StatusCode, awaitable, *fragments: str, kind: str | None = None
) -> None:
    """The call fails with `code`, a message holding `fragments` and, if given, error `kind`."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()
    if kind is not None:
        assert (ERROR_KIND_KEY, kind) in tuple(info.value.trailing_metadata())


async def step_error(client, hidden, offsets) -> ClusterError:
    """The contract error the coordinator's client raises for one Forward step."""
    stream = client.open_stream(timeout=10)
    try:
        with pytest.raises(ClusterError) as info:
            await stream.step(["s"], hidden, offsets)
    finally:
        await stream.close()
    return info.value


async def assert_still_serves(stub) -> None:
    await stub.OpenSession(pb.OpenSessionRequest(session_id="probe"), timeout=5)
    reply = await forward_once(stub, step(["probe"], mx.ones((1, 3, HIDDEN)), [0]))
    assert tuple(reply.hidden.shape) == (1, 3, HIDDEN)
    await stub.EndSession(pb.EndSessionRequest(session_ids=["probe"]), timeout=5)


async def test_info_reports_slice_and_capabilities(worker):
    stub, model = worker
    info = await stub.Info(pb.InfoRequest(), timeout=5)
    assert (info.layer_start, info.layer_end, info.model_num_layers) == (2, 6, 8)
    assert info.model == str(model) and info.hidden_size == HIDDEN and info.dtype == "float32"
    assert info.capabilities.memory_total_bytes > 0 and info.capabilities.cpu_cores >= 1
    assert info.capabilities.device_kind in {"cpu", "gpu"}
    assert info.protocol_version == PROTOCOL_VERSION
    assert info.kv_capacity_tokens == 100 and info.weight_bytes > 0
    limits = info.limits
    assert (limits.kv_budget_tokens, limits.max_batch, limits.max_sessions) == (100, 256, 256)
    assert limits.max_message_bytes == MAX_MESSAGE_BYTES and limits.session_ttl_s == 600


async def test_unknown_session_is_not_found(worker):
    stub, _ = worker
    await assert_status(
        grpc.StatusCode.NOT_FOUND,
        forward_once(stub, step(["nobody"], mx.ones((1, 1, HIDDEN)), [0])),
        "nobody",
    )
    await assert_still_serves(stub)


@pytest.mark.parametrize(
    "hidden, fragment",
    [
        (mx.ones((1, 2, HIDDEN + 1)), "hidden size must be 64, got 65"),
        (mx.ones((1, 2, HIDDEN), dtype=mx.float16), "float16"),
        (mx.ones((2, 2, HIDDEN)), "[B, L, D]"),
        (mx.ones((2, HIDDEN)), "[B, L, D]"),
    ],
    ids=["hidden-size", "dtype", "batch", "rank"],
)
async def test_bad_hidden_states_are_invalid(worker, hidden, fragment):
    stub, _ = worker
    await stub.OpenSession(pb.OpenSessionRequest(session_id="s"), timeout=5)
    await assert_status(
        grpc.StatusCode.INVALID_ARGUMENT, forward_once(stub, step(["s"], hidden, [0])), fragment
    )
    await assert_still_serves(stub)


async def test_corrupt_tensor_bytes_are_invalid(worker):
    stub, _ = worker
    await stub.OpenSession(pb.OpenSessionRequest(session_id="s"), timeout=5)
    request = step(["s"], mx.ones((1, 2, HIDDEN)), [0])
    request.hidden.data = request.hidden.data[:-3]
    await assert_status(
        grpc.StatusCode.INVALID_ARGUMENT, forward_once(stub, request), "expected 512 bytes", "509"
    )
    request = step(["s"], mx.ones((1, 2, HIDDEN)), [0])
    request.hidden.dtype = "float128"
    await assert_status(grpc.StatusCode.INVALID_ARGUMENT, forward_once(stub, request), "float128")
    await assert_still_serves(stub)


async def test_load_layers_outside_model_is_invalid(worker):
    stub, _ = worker
    for start, end in [(6, 9), (5, 5), (7, 3)]:
        await assert_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.LoadLayers(pb.LoadLayersRequest(model=worker[1].as_posix(), start=start, end=end)),
            f"[{start}, {end})",
        )
    await assert_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.LoadLayers(pb.LoadLayersRequest(model="/no/such/model", start=0, end=1)),
        "/no/such/model",
    )
    # The failed loads kept the slice held (tests/test_load_layers.py has more).
    reply = await stub.LoadLayers(pb.LoadLayersRequest(model=str(worker[1]), start=2, end=6))
    assert not reply.reloaded
    await assert_still_serves(stub)


async def test_load_layers_is_idempotent_and_a_new_range_replaces_the_old(worker):
    stub, model = worker
    again = await stub.LoadLayers(pb.LoadLayersRequest(model=str(model), start=2, end=6))
    assert not again.reloaded and (again.info.layer_start, again.info.layer_end) == (2, 6)
    await stub.OpenSession(pb.OpenSessionRequest(session_id="old"), timeout=5)
    other = await stub.LoadLayers(pb.LoadLayersRequest(model=str(model), start=0, end=1))
    assert other.reloaded and (other.info.layer_start, other.info.layer_end) == (0, 1)
    assert other.info.sessions_open == 0 and other.info.weight_bytes < again.info.weight_bytes


async def test_forward_before_load_is_failed_precondition(start_workers):
    (client,) = await start_workers(1)
    channel = grpc.aio.insecure_channel(client.address)
    stub = pb_grpc.LayerServiceStub(channel)
    await assert_status(
        grpc.StatusCode.FAILED_PRECONDITION,
        stub.OpenSession(pb.OpenSessionRequest(session_id="s")),
        "LoadLayers",
        kind="not_loaded",
    )
    await assert_status(
        grpc.StatusCode.FAILED_PRECONDITION,
        forward_once(stub, step(["s"], mx.zeros((1, 1, 8)), [0])),
        "LoadLayers",
        kind="not_loaded",
    )
    await channel.close()
    # The coordinator's client raises NotLoaded, not its status-sharing sibling OffsetMismatch.
    with pytest.raises(NotLoaded, match="LoadLayers"):
        await client.open_session("s")
    err = await step_error(client, mx.zeros((1, 1, 8)), [0])
    assert type(err) is NotLoaded and err.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_kv_budget_is_resource_exhausted_with_numbers(worker):
    stub, _ = worker
    await stub.OpenSession(pb.OpenSessionRequest(session_id="a", reserve_tokens=60), timeout=5)
    await assert_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        stub.OpenSession(pb.OpenSessionRequest(session_id="b", reserve_tokens=50)),
        "50 tokens needed",
        "40 of 100 free",
    )
    await stub.OpenSession(pb.OpenSessionRequest(session_id="c"), timeout=5)
    await assert_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        forward_once(stub, step(["c"], mx.ones((1, 41, HIDDEN)), [0])),
        "41 tokens needed",
    )
    await stub.EndSession(pb.EndSessionRequest(session_ids=["a", "c"]), timeout=5)
    await assert_still_serves(stub)


async def test_offset_mismatch_and_duplicate_session(worker, start_workers):
    stub, _ = worker
    await stub.OpenSession(pb.OpenSessionRequest(session_id="s"), timeout=5)
    await assert_status(
        grpc.StatusCode.ALREADY_EXISTS, stub.OpenSession(pb.OpenSessionRequest(session_id="s"))
    )
    await assert_status(
        grpc.StatusCode.FAILED_PRECONDITION,
        forward_once(stub, step(["s"], mx.ones((1, 1, HIDDEN)), [5])),
        "offset 5",
        "holds 0",
        kind="offset_mismatch",
    )
    # The coordinator's client raises OffsetMismatch, not its status-sharing sibling NotLoaded.
    (client,) = start_workers.clients
    err = await step_error(client, mx.ones((1, 1, HIDDEN)), [5])
    assert type(err) is OffsetMismatch and err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "offset 5" in str(err) and str(err).startswith(f"worker {client.name}: ")
    await assert_still_serves(stub)


@pytest.mark.parametrize(
    "raised",
    [NotLoaded("cache offset lost: reload"), OffsetMismatch("call LoadLayers, not loaded")],
    ids=["not-loaded", "offset-mismatch"],
)
async def test_client_picks_the_class_from_the_kind_not_the_message(
    start_workers, tiny_llama, monkeypatch, raised
):
    """Messages that name the other error's words still come back as the class raised."""
    (client,) = await start_workers(1)
    await client.load_layers(str(tiny_llama), 2, 6)
    await client.open_session("s")

    def forward(*args):
        raise raised

    monkeypatch.setattr(start_workers.servers[client.address].servicer.runtime, "forward", forward)
    err = await step_error(client, mx.ones((1, 1, HIDDEN)), [0])
    assert type(err) is type(raised) and str(raised) in str(err)


@pytest.mark.parametrize("cls", WIRE_ERRORS, ids=lambda cls: cls.__name__)
def test_each_wire_error_round_trips_through_code_and_kind(cls):
    rebuilt = error_from_status(cls.code, "details", "w", [(ERROR_KIND_KEY, cls.kind)])
    assert type(rebuilt) is cls and rebuilt.code == cls.code and str(rebuilt) == "worker w: details"


def test_a_status_without_a_kind_is_read_by_code_only_where_one_error_has_it():
    code = grpc.StatusCode.FAILED_PRECONDITION  # NotLoaded's and OffsetMismatch's
    assert type(error_from_status(code, "offset 5", "w")) is ClusterError
    assert type(error_from_status(code, "x", "w", [(ERROR_KIND_KEY, "nonsense")])) is ClusterError
    # gRPC's own statuses carry no kind: an unreachable worker is still WorkerUnavailable.
    unavailable = error_from_status(grpc.StatusCode.UNAVAILABLE, "connection refused", "w")
    assert type(unavailable) is WorkerUnavailable
    # ... and so is one that did not answer in time (a frozen worker's OpenSession).
    late = error_from_status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", "w")
    assert type(late) is WorkerUnavailable and late.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # ... and its RESOURCE_EXHAUSTED is a message over the size limit, not a full KV budget.
    details = "Received message larger than max (4194405 vs. 4096)"
    too_large = error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, details, "w")
    assert type(too_large) is MessageTooLarge and "limits.max_message_mb" in str(too_large)
    full = [(ERROR_KIND_KEY, KVCapacityExceeded.kind)]
    assert type(error_from_status(too_large.code, "full", "w", full)) is KVCapacityExceeded
    # gRPC core's INTERNAL (a write to the stream of a worker that just died) is a lost
    # worker, which recovery replays; a worker's own internal error names its kind.
    core = error_from_status(grpc.StatusCode.INTERNAL, "Internal error from Core", "w")
    assert type(core) is WorkerUnavailable
    own = [(ERROR_KIND_KEY, ClusterError.kind)]
    assert (
        type(error_from_status(grpc.StatusCode.INTERNAL, "layers failed", "w", own)) is ClusterError
    )


async def test_truncate_then_replay_gives_the_same_output(worker):
    """Truncating a session's cache and re-sending the dropped tokens restores its state."""
    stub, _ = worker
    await stub.OpenSession(pb.OpenSessionRequest(session_id="s"), timeout=5)
    x = mx.random.normal((1, 6, HIDDEN))
    await forward_once(stub, step(["s"], x[:, :4], [0]))
    first = await forward_once(stub, step(["s"], x[:, 4:], [4]))
    reply = await stub.TruncateSession(pb.TruncateSessionRequest(session_id="s", length=4))
    assert reply.length == 4
    again = await forward_once(stub, step(["s"], x[:, 4:], [4]))
    assert mx.array_equal(tensor.decode(first.hidden), tensor.decode(again.hidden))
    await assert_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.TruncateSession(pb.TruncateSessionRequest(session_id="s", length=99)),
        "99",
    )


async def test_batched_step_equals_single_steps(worker):
    """One Forward carrying two sessions at different offsets = two separate steps."""
    stub, _ = worker
    x = mx.random.normal((2, 3, HIDDEN))
    for sid in ("a", "b", "a1", "b1"):
        await stub.OpenSession(pb.OpenSessionRequest(session_id=sid), timeout=5)
    await forward_once(stub, step(["a"], x[:1], [0]))
    await forward_once(stub, step(["a1"], x[:1], [0]))
    batched = await forward_once(stub, step(["a", "b"], x, [3, 0]))
    alone_a = await forward_once(stub, step(["a1"], x[:1], [3]))
    alone_b = await forward_once(stub, step(["b1"], x[1:], [0]))
    out = tensor.decode(batched.hidden)
    assert mx.array_equal(out[:1], tensor.decode(alone_a.hidden))
    assert mx.array_equal(out[1:], tensor.decode(alone_b.hidden))


async def test_end_session_frees_and_unknown_ids_are_ignored(worker):
    stub, _ = worker
    await stub.OpenSession(pb.OpenSessionRequest(session_id="s", reserve_tokens=10), timeout=5)
    assert (await stub.Info(pb.InfoRequest())).kv_used_tokens == 10
    reply = await stub.EndSession(pb.EndSessionRequest(session_ids=["s", "never"]))
    info = await stub.Info(pb.InfoRequest())
    assert reply.ended == 1 and info.sessions_open == 0 and info.kv_used_tokens == 0


async def test_bfloat16_crosses_the_wire_at_two_bytes(start_workers, model_factory):
    model = model_factory("llama", dtype="bfloat16")
    (client,) = await start_workers(1)
    await client.load_layers(str(model), 0, 4)
    channel = grpc.aio.insecure_channel(client.address)
    stub = pb_grpc.LayerServiceStub(channel)
    await stub.OpenSession(pb.OpenSessionRequest(session_id="s"))
    hidden = mx.random.normal((1, 7, HIDDEN)).astype(mx.bfloat16)
    request = step(["s"], hidden, [0])
    reply = await forward_once(stub, request)
    values = 7 * HIDDEN
    assert len(request.hidden.data) == 2 * values and request.ByteSize() < 2 * values + 64
    assert reply.hidden.dtype == "bfloat16" and len(reply.hidden.data) == 2 * values
    assert reply.ByteSize() < 2 * values + 64
    await channel.close()


async def test_standard_health_service_tracks_loading(start_workers, tiny_llama):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from mlx_cluster.contract.rpc import LAYER_SERVICE_NAME

    (client,) = await start_workers(1)
    channel = grpc.aio.insecure_channel(client.address)
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING

    async def status(service: str) -> int:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return reply.status

    assert await status("") == serving
    assert await status(LAYER_SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
    await client.load_layers(str(tiny_llama), 0, 2)
    assert await status(LAYER_SERVICE_NAME) == serving
    await channel.close()


async def test_messages_over_the_configured_size_are_refused(start_workers, tiny_llama):
    (client,) = await start_workers(1, max_message_bytes=4096)
    await client.load_layers(str(tiny_llama), 0, 2)
    channel = grpc.aio.insecure_channel(client.address)  # a client allowing big messages
    stub = pb_grpc.LayerServiceStub(channel)
    await stub.OpenSession(pb.OpenSessionRequest(session_id="s"))
    await assert_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        forward_once(stub, step(["s"], mx.ones((1, 32, HIDDEN)), [0])),
    )
    await assert_still_serves(stub)
    await channel.close()
    # The coordinator's client tells it from a full KV budget.
    await client.open_session("t")
    stream = client.open_stream(timeout=10)
    with pytest.raises(MessageTooLarge, match="max_message_mb"):
        await stream.step(["t"], mx.ones((1, 32, HIDDEN)), [0])
    await stream.close()


def test_eval_every_defaults_to_each_backends_measured_best():
    """Every layer on CUDA and CPU, every 4 on Metal; a setting given wins everywhere."""
    default = WorkerSettings(name="w")
    assert (default.layer_eval_every(metal=False), default.layer_eval_every(metal=True)) == (1, 4)
    chosen = WorkerSettings(name="w", eval_every=0)
    assert (chosen.layer_eval_every(metal=False), chosen.layer_eval_every(metal=True)) == (0, 0)
