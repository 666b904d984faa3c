"""Per-session KV caches of one worker, and the token budget they share.

A session is one request or conversation. Its caches cover this worker's layers
only. The store knows nothing of gRPC: it raises contract errors, which the
servicer turns into status codes.

Accounting is in tokens: a session is charged max(reserved, cached) tokens,
and the sum over sessions never exceeds the capacity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from mlx_cluster.contract.errors import (
    InvalidArgument,
    KVCapacityExceeded,
    OffsetMismatch,
    SessionExists,
    SessionNotFound,
)
from mlx_cluster.worker.batching import BatchGroup

MAX_SESSION_ID_LENGTH = 128


@dataclass
class Session:
    """One session's caches and bookkeeping."""

    session_id: str
    caches: list[Any]
    reserved: int = 0
    offset: int = 0  # tokens cached so far
    last_used: float = field(default_factory=time.monotonic)
    group: BatchGroup | None = None  # the batch whose caches hold this session's rows

    def own_caches(self) -> list[Any]:
        """This session's caches, taken out of its batch first if it is in one."""
        if self.group is not None:
            self.group.remove(self, keep_caches=True)
        return self.caches

    @property
    def charge(self) -> int:
        return max(self.reserved, self.offset)


class SessionStore:
    """The sessions of one worker, bounded by `capacity` cached tokens in total."""

    def __init__(
        self,
        capacity: int,
        make_caches: Callable[[], list[Any]],
        idle_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_sessions: int = 256,
    ) -> None:
        self.capacity = capacity
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self._make_caches = make_caches
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def used(self) -> int:
        """Tokens charged over all open sessions."""
        return sum(s.charge for s in self._sessions.values())

    def open(self, session_id: str, reserve: int) -> Session:
        """Open a session with empty caches, reserving `reserve` tokens of the budget."""
        if not session_id or len(session_id) > MAX_SESSION_ID_LENGTH:
            raise InvalidArgument(
                f"session id must be 1 to {MAX_SESSION_ID_LENGTH} characters, got {len(session_id)}"
            )
        if session_id in self._sessions:
            raise SessionExists(f"session {session_id!r} is already open")
        if len(self._sessions) >= self.max_sessions:
            raise KVCapacityExceeded(
                f"{len(self._sessions)} sessions open, at most {self.max_sessions} allowed"
            )
        self._check_room(reserve, self.used)
        session = Session(session_id, self._make_caches(), reserved=reserve)
        session.last_used = self._clock()
        self._sessions[session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        """The open session with this id, marked as used now."""
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(
                f"session {session_id!r} is not open on this worker "
                "(never opened, ended, or evicted after idling)"
            )
        session.last_used = self._clock()
        return session

    def check_step(self, sessions: list[Session], offsets: list[int], new_tokens: int) -> None:
        """Raise unless each session holds its offset and the budget has room for the whole step.

        The step's sessions grow together, so their growth is checked together: sessions
        that each fit alone may not fit at once.
        """
        for session, offset in zip(sessions, offsets, strict=True):
            if offset != session.offset:
                raise OffsetMismatch(
                    f"session {session.session_id!r}: step expects cache offset {offset}, "
                    f"worker holds {session.offset} tokens"
                )
        others = self.used - sum(s.charge for s in sessions)
        needed = sum(max(s.offset + new_tokens, s.reserved) for s in sessions)
        self._check_room(needed, others, step_sessions=len(sessions))

    def advance(self, session: Session, new_tokens: int) -> None:
        session.offset += new_tokens

    def truncate(self, session_id: str, length: int) -> int:
        """Keep only the first `length` cached tokens of a session; returns the new length."""
        session = self.get(session_id)
        if length > session.offset:
            raise InvalidArgument(
                f"cannot truncate session {session_id!r} to {length} tokens: "
                f"it holds {session.offset}"
            )
        drop = session.offset - length
        caches = session.own_caches()
        if drop and not can_trim_prompt_cache(caches):
            raise InvalidArgument(
                f"session {session_id!r}: its caches (e.g. sliding-window caches past "
                "their window) cannot be truncated"
            )
        if drop:
            trim_prompt_cache(caches, drop)
        session.offset = length
        return length

    def end(self, session_ids: list[str]) -> int:
        """Drop sessions; unknown ids are ignored. Returns how many were open."""
        ended = 0
        for sid in session_ids:
            session = self._sessions.pop(sid, None)
            if session is None:
                continue
            ended += 1
            if session.group is not None:
                session.group.remove(session, keep_caches=False)
        return ended

    def evict_idle(self) -> list[str]:
        """End sessions idle longer than the TTL; returns their ids."""
        cutoff = self._clock() - self.idle_ttl_s
        stale = [sid for sid, s in self._sessions.items() if s.last_used < cutoff]
        self.end(stale)
        return stale

    def _check_room(self, needed: int, others: int, step_sessions: int = 1) -> None:
        """Raise unless `needed` tokens fit beside the `others` that other sessions hold."""
        if others + needed > self.capacity:
            step = f"{step_sessions} sessions in this step, " if step_sessions > 1 else ""
            raise KVCapacityExceeded(
                f"KV cache budget full: {needed} tokens needed, "
                f"{self.capacity - others} of {self.capacity} free "
                f"({step}{len(self._sessions)} sessions open)"
            )
