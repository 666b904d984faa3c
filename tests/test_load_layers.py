"""LoadLayers: a rejected request leaves a serving worker as it was; a repeated one starts over."""

from __future__ import annotations

import json
import shutil

import grpc
import mlx.core as mx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlx_cluster import tensor
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import LAYER_SERVICE_NAME

HIDDEN = 64  # the tiny models' hidden size


@pytest.fixture
async def serving(worker_channel, tiny_llama):
    """A worker serving layers [0, 4) of the tiny llama with one session 'kept' one token in."""
    channel = await worker_channel(tiny_llama, 0, 4)
    stub = pb_grpc.LayerServiceStub(channel)
    await stub.OpenSession(pb.OpenSessionRequest(session_id="kept", reserve_tokens=5), timeout=5)
    await step(stub, "kept", 0)
    return stub, health_pb2_grpc.HealthStub(channel)


async def step(stub, session_id: str, offset: int) -> pb.ForwardResponse:
    call = stub.Forward(timeout=10)
    hidden = tensor.encode(mx.ones((1, 1, HIDDEN)))
    await call.write(
        pb.ForwardRequest(step_id=1, session_ids=[session_id], offsets=[offset], hidden=hidden)
    )
    reply = await call.read()
    await call.done_writing()
    return reply


def broken_copies(model, tmp_path) -> dict[str, str]:
    """Model directories that fail in different ways, each named by what is wrong."""
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(model / "config.json", no_weights / "config.json")
    bad_config = tmp_path / "bad-config"
    shutil.copytree(model, bad_config)
    (bad_config / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return {"no-weights": str(no_weights), "bad-config": str(bad_config)}


async def test_a_rejected_load_leaves_the_serving_slice_its_sessions_and_health(
    serving, tiny_llama, tmp_path
):
    stub, health = serving
    model = str(tiny_llama)
    broken = broken_copies(tiny_llama, tmp_path)
    rejected = [
        pb.LoadLayersRequest(model=model, start=0, end=1000),
        pb.LoadLayersRequest(model=model, start=6, end=9),
        pb.LoadLayersRequest(model=model, start=3, end=3),
        pb.LoadLayersRequest(model="/no/such/model", start=0, end=1),
        pb.LoadLayersRequest(model=broken["no-weights"], start=0, end=2),
        pb.LoadLayersRequest(model=broken["bad-config"], start=0, end=2),
        pb.LoadLayersRequest(model=model, start=0, end=2, session_ttl_s=float("nan")),
    ]
    for offset, request in enumerate(rejected, start=1):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.LoadLayers(request, timeout=30)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        info = await stub.Info(pb.InfoRequest(), timeout=5)
        assert (info.model, info.layer_start, info.layer_end) == (model, 0, 4), request
        assert info.sessions_open == 1, request
        check = health_pb2.HealthCheckRequest(service=LAYER_SERVICE_NAME)
        status = (await health.Check(check, timeout=5)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, request
        await step(stub, "kept", offset)  # the session's cache is still there


async def test_loading_the_same_slice_again_keeps_the_weights_but_ends_the_sessions(
    serving, tiny_llama
):
    stub, _ = serving
    again = await stub.LoadLayers(pb.LoadLayersRequest(model=str(tiny_llama), start=0, end=4))
    assert not again.reloaded and (again.info.layer_start, again.info.layer_end) == (0, 4)
    assert again.info.sessions_open == 0 and again.info.kv_used_tokens == 0
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await step(stub, "kept", 1)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
