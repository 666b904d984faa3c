"""SessionStore accounting, without gRPC."""

from __future__ import annotations

import pytest
from mlx_lm.models.cache import KVCache

from mlx_cluster.contract.errors import InvalidArgument, KVCapacityExceeded, SessionNotFound
from mlx_cluster.worker.sessions import SessionStore


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
    with pytest.raises(InvalidArgument, match="1 to 128 characters, got 0"):
        store().open("", 0)
    with pytest.raises(InvalidArgument, match="got 129"):
        store().open("x" * 129, 0)


def test_sessions_are_bounded_in_number():
    s = SessionStore(100, lambda: [KVCache()], idle_ttl_s=30, max_sessions=2)
    s.open("a", 0)
    s.open("b", 0)
    with pytest.raises(KVCapacityExceeded, match="2 sessions open, at most 2 allowed"):
        s.open("c", 0)
