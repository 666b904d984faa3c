"""Per-session KV caches of one worker, and the token budget they share.

A session is one request or conversation. Its caches cover this worker's layers
only. The store knows nothing of gRPC: it raises contract errors, which the
servicer turns into status codes.

Accounting is in tokens: a session is charged max(reserved, cached) tokens,
and the sum over sessions never exceeds the capacity. Prefixes kept for later
sessions (worker/prefixes.py) hold the rest of the budget, and are evicted before a
session is refused room.

Only the compute thread changes the store. Info reads `totals()` from the event
loop: the store keeps running totals under a lock, so that read is one
consistent snapshot and never iterates the sessions while they change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.models.cache import (
    BatchKVCache,
    KVCache,
    QuantizedKVCache,
    can_trim_prompt_cache,
    trim_prompt_cache,
)

from mlx_cluster.contract.errors import (
    InvalidArgument,
    KVCapacityExceeded,
    OffsetMismatch,
    SessionExists,
    SessionNotFound,
    SessionTooLarge,
)
from mlx_cluster.contract.sampling import TokenPicker
from mlx_cluster.worker.batching import BatchGroup
from mlx_cluster.worker.prefixes import PrefixStore

MAX_ID_LENGTH = 128
# Caches whose last positions can always be forgotten exactly (a rotating cache cannot
# once it has wrapped around, nor can a state-space model's state).
EXACT_TRIM = (KVCache, QuantizedKVCache, BatchKVCache)


def check_id(value: str, what: str = "session id") -> str:
    """`value` if it is 1 to MAX_ID_LENGTH printable characters, else InvalidArgument.

    The error never repeats the id: a huge one would overflow the status, and one
    with a newline could forge log lines.
    """
    if 0 < len(value) <= MAX_ID_LENGTH and value.isprintable():
        return value
    problem = "" if value.isprintable() else ", some of them control characters"
    raise InvalidArgument(
        f"a {what} must be 1 to {MAX_ID_LENGTH} printable characters, "
        f"got {len(value)} characters{problem}"
    )


@dataclass(frozen=True)
class StoreTotals:
    """The store's numbers at one moment."""

    sessions: int  # open
    used: int  # tokens charged
    capacity: int  # tokens in the budget


@dataclass
class Session:
    """One session's caches and bookkeeping."""

    session_id: str
    caches: list[Any]
    reserved: int = 0
    offset: int = 0  # tokens cached so far
    last_used: float = field(default_factory=time.monotonic)
    group: BatchGroup | None = None  # the batch whose caches hold this session's rows
    lease_id: str = ""  # the session ends with this lease; "" = by the idle TTL only
    stream_id: int = 0  # the Forward call of its last step; 0 = none yet
    rewindable: int = 0  # positions past its last step's first, which a rewind may forget
    draft: Any = None  # the draft model's cache for it, on the first stage (worker/drafter.py)
    picker: TokenPicker | None = None  # how it samples, on the worker holding the head

    def own_caches(self) -> list[Any]:
        """This session's caches, taken out of its batch first if it is in one."""
        if self.group is not None:
            self.group.remove(self, keep_caches=True)
        return self.caches

    @property
    def steps_back_exactly(self) -> bool:
        """Whether its last cached position can be forgotten exactly (`step_back`)."""
        caches = self.group.caches if self.group is not None else self.caches
        return all(type(c) in EXACT_TRIM for c in caches)

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
        max_sessions: int = 256,
        clock: Callable[[], float] = time.monotonic,
        prefixes: PrefixStore | None = None,
    ) -> None:
        self.capacity = capacity
        self.prefixes = prefixes or PrefixStore(0)
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self._make_caches = make_caches
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._used = 0  # sum of the sessions' charges, kept as they change
        self._lock = threading.Lock()  # between changes and `totals()` on another thread

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def used(self) -> int:
        """Tokens charged over all open sessions."""
        return self._used

    def totals(self) -> StoreTotals:
        """Sessions open, tokens charged and capacity, as one snapshot (from any thread)."""
        with self._lock:
            return StoreTotals(len(self._sessions), self._used, self.capacity)

    def open(
        self,
        session_id: str,
        reserve: int,
        lease_id: str = "",
        picker: TokenPicker | None = None,
        prefix: tuple[str, int] | None = None,
    ) -> Session:
        """Open a session with empty caches, reserving `reserve` tokens of the budget.

        `picker` samples its tokens, on the worker holding the LM head. With `prefix`
        (a kept prefix's id, a length), its caches start with that prefix's first
        `length` tokens (PrefixNotFound if it is not kept here).
        """
        check_id(session_id)
        if session_id in self._sessions:
            raise SessionExists(f"session {session_id!r} is already open")
        if len(self._sessions) >= self.max_sessions:
            raise KVCapacityExceeded(
                f"{len(self._sessions)} sessions open, at most {self.max_sessions} allowed"
            )
        self._check_fits(session_id, reserve)
        prefix_id, length = prefix or ("", 0)
        # branched first: room made for it may evict that very prefix, not what it holds
        caches = self.prefixes.branch(prefix_id, length) if prefix else self._make_caches()
        self._check_room(reserve, self.used)
        session = Session(session_id, caches, reserve, length, lease_id=lease_id, picker=picker)
        session.last_used = self._clock()
        with self._lock:
            self._sessions[session_id] = session
            self._used += session.charge
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
            self._check_fits(session.session_id, session.offset + new_tokens)
        others = self.used - sum(s.charge for s in sessions)
        needed = sum(max(s.offset + new_tokens, s.reserved) for s in sessions)
        self._check_room(needed, others, step_sessions=len(sessions))

    def advance(self, session: Session, new_tokens: int, stream_id: int = 0) -> None:
        """Count `new_tokens` more cached tokens, stepped on Forward call `stream_id`."""
        self._set_offset(session, session.offset + new_tokens)
        session.stream_id = stream_id
        session.rewindable = new_tokens - 1

    def rewind(self, session_id: str, offset: int) -> None:
        """Forget what a session holds past `offset`: drafts its last step fed and the
        last stage rejected. Only those: a step that lost more is an offset mismatch.
        """
        session = self.get(session_id)
        surplus = session.offset - offset
        if surplus <= 0:
            return
        if surplus > session.rewindable:
            raise OffsetMismatch(
                f"session {session_id!r}: step expects cache offset {offset}, worker holds "
                f"{session.offset} tokens, of which it may forget {session.rewindable} "
                "(drafts of its last step)"
            )
        self.truncate(session_id, offset)
        session.rewindable = 0

    def truncate(self, session_id: str, length: int) -> int:
        """Keep only the first `length` cached tokens of a session; returns the new length.

        Its picker's token history is cut to the same length, so the logits processors
        see the tokens the cache holds.
        """
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
        if session.picker is not None:
            session.picker.truncate(length)
        self._set_offset(session, length)
        return length

    def step_back(self, session_ids: list[str]) -> None:
        """Forget the last cached position of each open session named (unknown ids are
        skipped): a step computed ahead and not taken (see worker/lookahead.py).

        Sessions that are exactly the rows of one batch step back together, without
        leaving it; others are truncated one by one.
        """
        sessions = [self._sessions[sid] for sid in session_ids if sid in self._sessions]
        group = sessions[0].group if sessions else None
        whole_group = group is not None and len(group.members) == len(sessions)
        if group is not None and whole_group and all(s.group is group for s in sessions):
            for cache in group.caches:
                cache.trim(1)
            for session in sessions:
                if session.picker is not None:
                    session.picker.truncate(session.offset - 1)
                self._set_offset(session, session.offset - 1)
            return
        for session in sessions:
            self.truncate(session.session_id, session.offset - 1)

    def end(self, session_ids: list[str]) -> int:
        """Drop sessions; unknown ids are ignored. Returns how many were open."""
        ended = 0
        for sid in session_ids:
            with self._lock:
                session = self._sessions.pop(sid, None)
                if session is None:
                    continue
                self._used -= session.charge
            ended += 1
            if session.group is not None:
                session.group.remove(session, keep_caches=False)
        return ended

    def end_keeping(
        self,
        session_ids: Sequence[str],
        keep: Sequence[tuple[str, str, int]] = (),
        drop_prefixes: Sequence[str] = (),
    ) -> tuple[int, list[str]]:
        """End sessions (unknown ids are no error), those in `keep` (session id, prefix
        id, length) kept as prefixes where they fit; forget the prefixes named in
        `drop_prefixes`. Returns how many of `session_ids` were open, and the prefixes kept."""
        for prefix_id in drop_prefixes:
            self.prefixes.drop(prefix_id)
        kept = [pid for sid, pid, length in keep if self.keep_as_prefix(sid, pid, length)]
        return self.end(list(session_ids)), kept

    def keep_as_prefix(self, session_id: str, prefix_id: str, length: int) -> bool:
        """End a session, keeping its first `length` cached tokens as prefix `prefix_id`
        for later sessions; False if they could not be kept (the session ends anyway)."""
        check_id(prefix_id, "prefix id")
        session = self._sessions.get(session_id)
        if session is None or not 0 < length <= session.offset:
            self.end([session_id])
            return False
        caches = session.own_caches()
        self.end([session_id])
        return self.prefixes.keep(prefix_id, caches, length)

    def end_lease(self, lease_id: str) -> list[str]:
        """End the sessions opened under this lease; returns their ids."""
        return self._end_where(lambda s: s.lease_id == lease_id)

    def end_stream(self, stream_id: int) -> list[str]:
        """End the sessions whose last step was on this Forward call; returns their ids."""
        return self._end_where(lambda s: s.stream_id == stream_id)

    def evict_idle(self) -> list[str]:
        """End sessions idle longer than the TTL; returns their ids."""
        cutoff = self._clock() - self.idle_ttl_s
        return self._end_where(lambda s: s.last_used < cutoff)

    def _end_where(self, condition: Callable[[Session], bool]) -> list[str]:
        chosen = [sid for sid, s in self._sessions.items() if condition(s)]
        self.end(chosen)
        return chosen

    def _set_offset(self, session: Session, offset: int) -> None:
        with self._lock:
            before = session.charge
            session.offset = offset
            self._used += session.charge - before

    def _check_fits(self, session_id: str, needed: int) -> None:
        """Raise SessionTooLarge if one session needs more than the whole budget."""
        if needed > self.capacity:
            raise SessionTooLarge(
                f"session {session_id!r} needs {needed} tokens, the KV budget is {self.capacity}"
            )

    def _check_room(self, needed: int, others: int, step_sessions: int = 1) -> None:
        """Raise unless `needed` tokens fit beside the `others` that other sessions hold;
        kept prefixes make room first."""
        self.prefixes.evict_for(max(self.capacity - others - needed, 0))
        if others + needed > self.capacity:
            step = f"{step_sessions} sessions in this step, " if step_sessions > 1 else ""
            raise KVCapacityExceeded(
                f"KV cache budget full: {needed} tokens needed, "
                f"{self.capacity - others} of {self.capacity} free "
                f"({step}{len(self._sessions)} sessions open)"
            )
