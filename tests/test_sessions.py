"""SessionStore accounting, without gRPC."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from mlx_cluster.contract.errors import (
    InvalidArgument,
    KVCapacityExceeded,
    OffsetMismatch,
    SessionNotFound,
    SessionTooLarge,
)
from mlx_cluster.worker.sessions import SessionStore, StoreTotals


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(capacity: int = 100, clock: Clock | None = None) -> SessionStore:
    return SessionStore(capacity, lambda: [KVCache()], idle_ttl_s=30, clock=clock or Clock())


def test_charge_is_max_of_reservation_and_cached_tokens():
    s = store()
    a = s.open("a", reserve=10)
    s.check_step([a], [0], 25)
    s.advance(a, 25)
    assert s.used == 25
    s.open("b", reserve=70)
    assert s.used == 95
    with pytest.raises(KVCapacityExceeded, match="31 tokens needed, 30 of 100 free"):
        s.check_step([a], [25], 6)


def test_a_step_of_several_sessions_is_checked_as_a_whole():
    s = store(capacity=10)
    a, b = s.open("a", 0), s.open("b", 0)
    s.check_step([a], [0], 5)
    s.advance(a, 5)
    s.check_step([b], [0], 4)
    s.advance(b, 4)
    s.check_step([a], [5], 1)  # each alone still fits: 10 of 10
    s.check_step([b], [4], 1)
    with pytest.raises(
        KVCapacityExceeded, match=r"11 tokens needed, 10 of 10 free \(2 sessions in this step"
    ):
        s.check_step([a, b], [5, 4], 1)
    assert s.used == 9


def test_idle_sessions_are_evicted_after_the_ttl():
    clock = Clock()
    s = store(clock=clock)
    s.open("old", 0)
    clock.now = 20
    s.open("new", 0)
    clock.now = 40
    assert s.evict_idle() == ["old"]
    with pytest.raises(SessionNotFound, match="'old' is not open"):
        s.get("old")
    assert len(s) == 1


def test_session_ids_are_checked():
    with pytest.raises(InvalidArgument, match="1 to 128 printable characters, got 0"):
        store().open("", 0)
    with pytest.raises(InvalidArgument, match=r"got 129 characters$"):
        store().open("x" * 129, 0)
    with pytest.raises(InvalidArgument, match="got 3 characters, some of them control"):
        store().open("a\nb", 0)


def test_a_session_larger_than_the_whole_budget_is_too_large_not_a_full_budget():
    s = store(capacity=100)
    with pytest.raises(
        SessionTooLarge, match="session 'big' needs 101 tokens, the KV budget is 100"
    ):
        s.open("big", reserve=101)
    a = s.open("a", reserve=0)
    s.check_step([a], [0], 60)
    s.advance(a, 60)
    with pytest.raises(SessionTooLarge, match="needs 101 tokens, the KV budget is 100"):
        s.check_step([a], [60], 41)
    b = s.open("b", reserve=40)
    with pytest.raises(KVCapacityExceeded):  # fits once others end: full right now
        s.check_step([a], [60], 1)
    s.end(["b"])
    s.check_step([a], [60], 40)
    assert b.session_id == "b" and s.used == 60


def test_totals_follow_every_change():
    s = store(capacity=100)
    a = s.open("a", reserve=10)
    b = s.open("b", reserve=0)
    s.advance(b, 25)
    s.advance(a, 5)  # within its reservation: still charged 10
    assert s.totals() == StoreTotals(sessions=2, used=35, capacity=100)
    s.truncate("b", 5)
    assert s.totals().used == 15
    s.end(["a", "nobody"])
    assert s.totals() == StoreTotals(sessions=1, used=5, capacity=100) and s.used == 5


def test_sessions_end_with_their_lease_or_their_forward_call():
    s = store()
    s.open("mine", 0, lease_id="L")
    s.open("theirs", 0, lease_id="M")
    s.open("stepped", 0)
    s.advance(s.get("stepped"), 1, stream_id=7)
    assert s.end_lease("L") == ["mine"]
    assert s.end_stream(7) == ["stepped"] and s.end_stream(7) == []
    assert s.totals().sessions == 1 and s.get("theirs").lease_id == "M"


def test_sessions_are_bounded_in_number():
    s = SessionStore(100, lambda: [KVCache()], idle_ttl_s=30, max_sessions=2)
    s.open("a", 0)
    s.open("b", 0)
    with pytest.raises(KVCapacityExceeded, match="2 sessions open, at most 2 allowed"):
        s.open("c", 0)


def test_a_rewind_forgets_the_rejected_drafts_of_the_last_step_only():
    """A verified step fed 5 tokens and the last stage kept 3: the session forgets 2. A
    step that expects fewer tokens than that is still an offset mismatch."""
    s = store()
    a = s.open("a", 0)
    a.caches[0].update_and_fetch(mx.zeros((1, 1, 8, 4)), mx.zeros((1, 1, 8, 4)))
    s.advance(a, 3)  # a prompt chunk
    s.advance(a, 5)  # a decode step with 4 drafts
    s.rewind("a", 6)
    assert (a.offset, a.caches[0].offset, s.used) == (6, 6, 6)
    s.rewind("a", 6)  # nothing past it: nothing to forget
    with pytest.raises(OffsetMismatch, match="of which it may forget 0"):
        s.rewind("a", 5)  # a kept token
    s.advance(a, 2)
    with pytest.raises(OffsetMismatch, match="of which it may forget 1"):
        s.rewind("a", 6)  # into the step before
    assert a.offset == 8
