"""Recent performance for the dashboard: tokens/s and time to first token over the last
minutes, and where a decode step's time went (the workers' compute, the hops between
them, the coordinator).

Fed by the HTTP layer (each streamed token, each finished generation) and by the
engine's step events; read as one JSON-ready snapshot. Time is bucketed by
`BUCKET_S` seconds, kept for `WINDOW_S`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlx_cluster.coordinator.engine.events import Event, StepEvent
from mlx_cluster.coordinator.engine.generation import Performance

BUCKET_S = 5  # one point of the charts
WINDOW_S = 300  # how far back the charts go
RECENT_STEPS = 64  # decode steps averaged for a token's time split


@dataclass
class _Bucket:
    start: int  # unix seconds, a multiple of BUCKET_S
    tokens: int = 0
    ttft_s: float = 0.0  # summed over `requests`
    requests: int = 0


class LiveFigures:
    """Tokens and first-token times per bucket, and the latest decode steps' split."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: deque[_Bucket] = deque(maxlen=WINDOW_S // BUCKET_S)
        self._steps: deque[StepEvent] = deque(maxlen=RECENT_STEPS)

    def token(self) -> None:
        """A token was generated (any request)."""
        self._bucket().tokens += 1

    def finished(self, perf: Performance) -> None:
        """A generation ended; its time to first token is charted."""
        bucket = self._bucket()
        bucket.ttft_s += perf.ttft_s
        bucket.requests += 1

    def observe(self, event: Event) -> None:
        """An engine event: decode steps are kept for the split."""
        if isinstance(event, StepEvent):
            self._steps.append(event)

    def snapshot(self) -> dict[str, Any]:
        """The charts' points (oldest first, empty buckets included) and the split."""
        now = int(self._clock()) // BUCKET_S * BUCKET_S
        by_start = {b.start: b for b in self._buckets}
        points = []
        for start in range(now - WINDOW_S + BUCKET_S, now + BUCKET_S, BUCKET_S):
            bucket = by_start.get(start, _Bucket(start))
            points.append(
                {
                    "t": start,
                    "tokens_per_s": round(bucket.tokens / BUCKET_S, 2),
                    "ttft_ms": _ms(bucket.ttft_s / bucket.requests) if bucket.requests else None,
                }
            )
        return {"bucket_s": BUCKET_S, "points": points, "token_split_ms": self._split()}

    def _split(self) -> dict[str, Any] | None:
        """A decode step's mean time, per part (ms), and each stage's compute in chain
        order (of the steps through as many stages as the latest); None before any step."""
        steps = list(self._steps)
        if not steps:
            return None
        compute = sum(s.compute_s for s in steps) / len(steps)
        hops = sum(s.hops_s for s in steps) / len(steps)
        wall = sum(s.wall_s for s in steps) / len(steps)
        chained = [
            s.stage_compute_s
            for s in steps
            if len(s.stage_compute_s) == len(steps[-1].stage_compute_s)
        ]
        return {
            "compute": _ms(compute),
            "hop": _ms(hops),
            "coordinator": _ms(max(wall - compute - hops, 0.0)),
            "stages": [_ms(sum(part) / len(chained)) for part in zip(*chained, strict=True)],
        }

    def _bucket(self) -> _Bucket:
        start = int(self._clock()) // BUCKET_S * BUCKET_S
        if not self._buckets or self._buckets[-1].start != start:
            self._buckets.append(_Bucket(start))
        return self._buckets[-1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
