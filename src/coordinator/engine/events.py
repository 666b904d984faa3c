"""What the engine tells its observers: one event per hop and per decode step.

Observers (Prometheus metrics, benchmarks, tests) subscribe to a Cluster's
`EventBus`; the engine publishes and never knows who listens. A subscriber runs
on the event loop, inside the step, so it must be quick and must not raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class HopTiming:
    """Where the time of one step on one worker went (seconds)."""

    encode: float = 0.0
    round_trip: float = 0.0  # send to receive, worker compute included
    compute: float = 0.0  # as the worker measured it
    decode: float = 0.0

    @property
    def network(self) -> float:
        """Round trip minus the worker's compute: transport, queueing, framing."""
        return max(self.round_trip - self.compute, 0.0)


@dataclass(frozen=True)
class HopEvent:
    """One step on one worker: where its time went (seconds)."""

    worker: str
    rows: int  # requests the step carried
    tokens: int  # positions per row (1 for decode, the chunk length for prefill)
    encode_s: float  # the coordinator serializing the hidden states
    network_s: float  # round trip minus the worker's compute: transport, queueing, framing
    compute_s: float  # the worker's own time, as it measured it
    decode_s: float  # the coordinator deserializing the answer


@dataclass(frozen=True)
class StepEvent:
    """One decode step of a lane's ring through every stage, sampling included (seconds)."""

    lane: int
    rows: int  # requests the step carried
    wall_s: float  # since the lane's previous step arrived (or its rows were sent)
    hops_s: float  # the step's time on the ring beyond the stages' compute
    compute_s: float  # the workers' own compute (the last stage's sampling too), summed
    stage_compute_s: tuple[float, ...] = ()  # each stage's part of it, in chain order


Event = HopEvent | StepEvent
Subscriber = Callable[[Event], None]


class EventBus:
    """Subscribers get every event published after they subscribed, in order."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the call that removes it."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def publish(self, event: Event) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:  # an observer's bug must not fail a request's step
                log.exception("event subscriber %r failed on %r", subscriber, event)
