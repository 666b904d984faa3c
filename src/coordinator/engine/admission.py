"""The admission queue: sessions that find the KV budget full wait, bounded, for room."""

from __future__ import annotations

import asyncio

from mlx_cluster.contract.errors import KVCapacityExceeded


class Admission:
    """Sessions waiting for KV room: at most `max_waiting`, each for at most `max_wait_s`.

    Every ended session bumps `version`. A caller notes the version before it tries
    to open a session and passes it to `wait_for_room`, so a session that ended
    between the failed attempt and the wait is not missed.
    """

    def __init__(self, max_waiting: int = 0, max_wait_s: float = 0.0) -> None:
        self.max_waiting = max_waiting  # 0 (no queue): refuse at once when full
        self.max_wait_s = max_wait_s  # (limits.queue_length and queue_timeout_s in the config)
        self.waiting = 0
        self.version = 0
        self._freed = asyncio.Event()  # set (and replaced) each time a session ends

    def notify(self) -> None:
        """A session ended: its room may fit a waiter."""
        self.version += 1
        self._freed.set()
        self._freed = asyncio.Event()

    async def wait_for_room(
        self, error: KVCapacityExceeded, deadline: float, seen_version: int
    ) -> None:
        """Return once a session ended after `seen_version`; else re-raise `error`.

        Raises `error` at once if the queue is full or `deadline` (loop time) passed.
        """
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            raise error
        if self.version != seen_version:
            return  # room was freed while the caller was trying
        if self.waiting >= self.max_waiting:
            raise error
        freed = self._freed
        self.waiting += 1
        try:
            async with asyncio.timeout_at(deadline):
                await freed.wait()
        except TimeoutError:
            raise error from None
        finally:
            self.waiting -= 1
