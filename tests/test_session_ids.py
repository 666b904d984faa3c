"""Session ids are checked at every entry point: never echoed when huge, never logged raw."""

from __future__ import annotations

import logging

import grpc
import mlx.core as mx
import pytest

from mlx_cluster import tensor
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc

HIDDEN = 64  # the tiny models' hidden size
HUGE = "x" * (1 << 20)
FORGED = "s1\n2030-01-01 00:00:00 INFO worker: all sessions ended by the administrator"


@pytest.fixture
async def stub(worker_channel, tiny_llama):
    return pb_grpc.LayerServiceStub(await worker_channel(tiny_llama, 0, 2))


async def forward(stub, session_id: str) -> pb.ForwardResponse:
    call = stub.Forward(timeout=10)
    hidden = tensor.encode(mx.ones((1, 1, HIDDEN)))
    await call.write(pb.ForwardRequest(session_ids=[session_id], offsets=[0], hidden=hidden))
    reply = await call.read()
    await call.done_writing()
    return reply


def calls(stub, session_id: str) -> dict[str, object]:
    return {
        "OpenSession": stub.OpenSession(pb.OpenSessionRequest(session_id=session_id), timeout=5),
        "Forward": forward(stub, session_id),
        "EndSession": stub.EndSession(pb.EndSessionRequest(session_ids=[session_id]), timeout=5),
        "TruncateSession": stub.TruncateSession(
            pb.TruncateSessionRequest(session_id=session_id, length=0), timeout=5
        ),
        "Lease": stub.Lease(pb.LeaseRequest(lease_id=session_id), timeout=5).read(),
    }


@pytest.mark.parametrize("bad", [HUGE, "", FORGED, "tab\there", "nul\x00"], ids=repr)
async def test_every_entry_point_refuses_a_bad_id_without_echoing_it(stub, bad):
    pending = calls(stub, bad)
    for method, call in pending.items():
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call  # type: ignore[misc]
        details = failure.value.details() or ""
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, details[:200])
        assert "1 to 128 printable characters" in details, method
        assert len(details) < 300 and "\n" not in details, method
    await stub.OpenSession(pb.OpenSessionRequest(session_id="fine"), timeout=5)
    await forward(stub, "fine")


async def test_ids_are_logged_escaped(stub, caplog):
    """A printable id with quotes and a backslash shows in a log line as its repr."""
    tricky = "quote'\\back"
    with caplog.at_level(logging.INFO, logger="mlx_cluster.worker"):
        await stub.OpenSession(pb.OpenSessionRequest(session_id=tricky), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.OpenSession(pb.OpenSessionRequest(session_id=FORGED), timeout=5)
        await stub.EndSession(pb.EndSessionRequest(session_ids=[tricky]), timeout=5)
    lines = [r.getMessage() for r in caplog.records]
    assert any(repr(tricky) in line for line in lines), lines
    assert not any("\n" in line for line in lines), lines
