"""The one thread that makes every MLX call of a worker.

MLX work never runs concurrently on a worker and needs no locks; the event loop
stays free for Info, EndSession, Lease and other streams while a step computes.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import mlx.core as mx

from mlx_cluster.contract.logs import request_id

log = logging.getLogger(__name__)
T = TypeVar("T")


class ComputeThread:
    """The one thread that makes every MLX call of a worker, in the order submitted.

    Every Forward step crosses from the event loop to this thread and back, so the
    crossing is kept lean: a job is a tuple on a SimpleQueue and its result returns
    through one `call_soon_threadsafe`, with no concurrent.futures.Future in between
    and no copy of the caller's context (only the request id travels, for log lines).
    That is measurably cheaper than `run_in_executor` on a one-thread pool.
    """

    def __init__(self, name: str = "mlx-compute") -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        # A daemon thread is not joined at exit: close it first, so that it clears its streams.
        atexit.register(self.close)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue fn(*args); the future (of the running loop) gets its result or exception.

        Cancelling the future before the job starts skips the job.
        """
        if self._closed:
            raise RuntimeError("the compute thread is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, request_id.get(), fn, args))
        return future

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue fn(*args) without waiting for it (housekeeping); a failure is logged.

        Once the thread is closed (the worker stopped), there is nothing left to keep.
        """
        if not self._closed:
            self.submit(fn, *args).add_done_callback(_log_failure)

    def _serve(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                loop, future, rid, fn, args = job
                if future.cancelled():
                    continue
                request_id.set(rid)
                try:
                    result = fn(*args)
                except BaseException as exc:  # handed to the caller, as concurrent.futures does
                    _reply(loop, _set_exception, future, exc)
                else:
                    _reply(loop, _set_result, future, result)
        finally:
            mx.clear_streams()  # MLX aborts at exit unless each thread that used it does this

    def close(self) -> None:
        """Finish the queued jobs, release the thread's MLX streams and end it."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._jobs.put(None)
        self._thread.join()


def _reply(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(fn, *args)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.cancelled():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.cancelled():
        future.set_exception(exc)


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("background job failed", exc_info=future.exception())
