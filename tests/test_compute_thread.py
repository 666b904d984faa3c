"""The worker's compute thread: one thread for every MLX call, cleared before it ends."""

from __future__ import annotations

import asyncio
import threading

import mlx.core as mx
import pytest

from mlx_cluster.contract.logs import request_id
from mlx_cluster.worker.compute_thread import ComputeThread


async def test_jobs_run_in_order_on_one_thread_with_the_callers_request_id():
    compute = ComputeThread()
    try:
        seen: list[tuple[int, int, str]] = []

        def job(i: int) -> int:
            seen.append((i, threading.get_ident(), request_id.get()))
            return int(mx.sum(mx.arange(i + 1)).item())

        request_id.set("req-7")
        results = await asyncio.gather(*(compute.submit(job, i) for i in range(20)))
    finally:
        compute.close()
    assert results == [i * (i + 1) // 2 for i in range(20)]
    assert [i for i, _, _ in seen] == list(range(20))
    threads = {ident for _, ident, _ in seen}
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert {rid for _, _, rid in seen} == {"req-7"}


async def test_exceptions_reach_the_caller_and_the_thread_goes_on():
    compute = ComputeThread()
    try:
        with pytest.raises(ValueError, match="bad step"):
            await compute.submit(_raise, ValueError("bad step"))
        assert await compute.submit(lambda: 41 + 1) == 42
    finally:
        compute.close()


async def test_a_job_cancelled_before_it_starts_is_skipped():
    compute = ComputeThread()
    gate, ran = threading.Event(), []
    try:
        blocker = compute.submit(gate.wait, 10)
        skipped = compute.submit(ran.append, "skipped")
        skipped.cancel()
        gate.set()
        assert await blocker is True
        assert await compute.submit(ran.append, "after") is None
    finally:
        compute.close()
    assert ran == ["after"]


async def test_close_finishes_queued_jobs_and_clears_streams_on_that_thread(monkeypatch):
    cleared: list[int] = []
    clear_streams = mx.clear_streams

    def spy() -> None:
        cleared.append(threading.get_ident())
        clear_streams()

    monkeypatch.setattr(mx, "clear_streams", spy)
    compute = ComputeThread()
    ident = await compute.submit(threading.get_ident)
    pending = compute.submit(lambda: mx.ones(3).sum().item())
    compute.close()
    assert cleared == [ident]
    assert await pending == 3.0
    with pytest.raises(RuntimeError, match="closed"):
        compute.submit(int)


def _raise(exc: Exception) -> None:
    raise exc
