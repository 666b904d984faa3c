"""The engine's own rules: admission misses no freed room; failures end as contract errors."""

from __future__ import annotations

import asyncio

import pytest

from mlx_cluster.contract.errors import RECOVERABLE, KVCapacityExceeded, NotLoaded
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.coordinator.api.errors import api_error
from mlx_cluster.coordinator.engine.admission import Admission
from tests.conftest import make_engine
from tests.test_golden import PROMPT


async def test_room_freed_between_a_failed_open_and_the_wait_is_not_missed():
    """A session that ends after the open failed, before the wait began, lets the waiter in.

    (Before, the wait cleared the 'freed' signal first and then slept until its deadline.)
    """
    admission = Admission(max_waiting=4, max_wait_s=30)
    seen = admission.version  # noted before the open attempt
    full = KVCapacityExceeded("KV cache budget full")
    admission.notify()  # another request ended in between
    loop = asyncio.get_running_loop()
    started = loop.time()
    await admission.wait_for_room(full, loop.time() + 5, seen)
    assert loop.time() - started < 0.5
    assert admission.waiting == 0


async def test_the_admission_queue_is_bounded_and_times_out():
    admission = Admission(max_waiting=1, max_wait_s=30)
    full = KVCapacityExceeded("KV cache budget full")
    loop = asyncio.get_running_loop()
    waiter = asyncio.create_task(admission.wait_for_room(full, loop.time() + 5, admission.version))
    await asyncio.sleep(0)
    with pytest.raises(KVCapacityExceeded):  # the queue holds one
        await admission.wait_for_room(full, loop.time() + 5, admission.version)
    admission.notify()
    await asyncio.wait_for(waiter, 1)
    with pytest.raises(KVCapacityExceeded):  # nobody frees anything: the deadline ends it
        await admission.wait_for_room(full, loop.time() + 0.05, admission.version)


async def test_a_stage_that_keeps_failing_ends_as_the_workers_error_not_stage_failed(
    tiny_llama, start_workers, monkeypatch
):
    """Recovery gives up with the worker's own error, which the HTTP API answers with 503."""
    clients = await start_workers(2)
    engine = await make_engine(tiny_llama, clients, [4, 4])
    calls = 0

    async def never_loaded(session_id: str, reserve_tokens=0, sampling=None, prefix=None) -> None:
        nonlocal calls
        calls += 1
        raise NotLoaded(f"worker {clients[1].name}: no layers loaded: call LoadLayers first")

    monkeypatch.setattr(clients[1], "open_session", never_loaded)
    with pytest.raises(NotLoaded) as caught:
        _ = [s async for s in engine.generate_tokens(PROMPT, SamplingParams(max_tokens=4))]
    assert isinstance(caught.value, RECOVERABLE)
    assert calls == 3  # the first try and two recoveries
    assert api_error(caught.value).status == 503
    for client in clients:
        assert (await client.info()).sessions_open == 0
    await engine.close()
