"""The cluster's health: each stage's worker asked for its Info, concurrently, with a deadline.

`serves` is the one rule for "this worker serves its stage": it holds the
planned model and exactly the planned layers. Health, the supervisor and
failover all ask it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mlx_cluster.contract.layers import LayerRange
from mlx_cluster.contract.worker_info import WorkerInfo
from mlx_cluster.coordinator.engine.weights import Transfer

INFO_TIMEOUT_S = 2.0

StageStatus = Literal["ok", "not_loaded", "unavailable"]
ClusterStatus = Literal["ok", "degraded", "unavailable"]


def serves(info: WorkerInfo, model_ref: str, layers: LayerRange) -> bool:
    """Whether a worker whose Info is `info` serves `layers` of `model_ref` (with the
    embedding on the first stage and the head on the last)."""
    held = (info.model, info.layer_start, info.layer_end, info.embedding, info.head)
    first, last = layers.start == 0, layers.end == layers.total
    return held == (model_ref, layers.start, layers.end, first, last)


@dataclass(frozen=True)
class StageHealth:
    """One stage's worker as it answered just now."""

    name: str
    address: str
    layers: LayerRange  # what the plan gives it
    status: StageStatus
    info: WorkerInfo | None = None  # None when it did not answer
    error: str | None = None  # why it did not answer
    round_trip_s: float | None = None  # of the Info call just made
    step_network_s: float | None = None  # of its last Forward step: round trip minus compute


@dataclass(frozen=True)
class Standby:
    name: str
    address: str


@dataclass(frozen=True)
class ClusterHealth:
    status: ClusterStatus
    model: str
    stages: list[StageHealth]
    standbys: list[Standby]
    transfers: list[Transfer] = field(default_factory=list)  # weights sent, the latest a worker

    @property
    def serving(self) -> bool:
        return self.status == "ok"


def cluster_status(stages: list[StageHealth]) -> ClusterStatus:
    serving = sum(s.status == "ok" for s in stages)
    return "ok" if serving == len(stages) else "degraded" if serving else "unavailable"
