"""Leases: a coordinator's sessions live as long as its Lease call, plus a short grace.

A coordinator holds one Lease call to each worker while it uses it, and opens its
sessions under that lease's id. When no call holds a lease any more (the
coordinator closed, crashed, or its host vanished and the server's keepalive
pings noticed), the worker waits `grace_s` for the lease to attach again, then
ends every session opened under it. A lease that OpenSession names before any
call holds it gets the same grace, so sessions never outlive a coordinator that
did not hold its lease.

Runs on the event loop; ending the sessions is the `expire` callback's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections import Counter
from collections.abc import Callable, Iterator


class Leases:
    """Which leases a Lease call holds now, and the grace timers of those none holds."""

    def __init__(self, grace_s: float, expire: Callable[[str], None]) -> None:
        self._grace_s = grace_s
        self._expire = expire
        self._holders: Counter[str] = Counter()  # Lease calls open, by lease id
        self._graces: dict[str, asyncio.TimerHandle] = {}  # leases no call holds, by id

    @contextlib.contextmanager
    def held(self, lease_id: str) -> Iterator[None]:
        """While inside, a Lease call holds `lease_id`; leaving starts its grace."""
        self._holders[lease_id] += 1
        grace = self._graces.pop(lease_id, None)
        if grace is not None:
            grace.cancel()
        try:
            yield
        finally:
            self._holders[lease_id] -= 1
            if not self._holders[lease_id]:
                del self._holders[lease_id]
                self._start_grace(lease_id)

    def opened_under(self, lease_id: str) -> None:
        """A session was opened under `lease_id`: unless a call holds it, its grace runs."""
        if lease_id not in self._holders and lease_id not in self._graces:
            self._start_grace(lease_id)

    def close(self) -> None:
        """Cancel every grace timer (the worker is stopping)."""
        for grace in self._graces.values():
            grace.cancel()
        self._graces.clear()

    def _start_grace(self, lease_id: str) -> None:
        loop = asyncio.get_running_loop()
        # A context of its own: the expiry belongs to no caller's request id.
        self._graces[lease_id] = loop.call_later(
            self._grace_s, self._end, lease_id, context=contextvars.Context()
        )

    def _end(self, lease_id: str) -> None:
        del self._graces[lease_id]
        self._expire(lease_id)
