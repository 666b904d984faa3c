"""What a worker says about itself (Info, LoadLayers), as typed values.

The worker builds a WorkerInfo and sends `to_proto()`; the coordinator's client
reads replies with `from_proto`. These are the only conversions between the two:
past the client, no protobuf message travels through the coordinator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mlx_cluster.contract.layers import LayerRange
from mlx_cluster.contract.proto import layer_service_pb2 as pb

# WorkerInfo's fields that are messages of their own, converted one by one.
_NESTED = frozenset({"capabilities", "limits"})


@dataclass(frozen=True)
class Capabilities:
    """A host's resources as the planner sees them."""

    memory_total_bytes: int  # RAM, or the GPU working-set limit
    memory_available_bytes: int  # free now
    device_kind: str  # "gpu" or "cpu"
    device_name: str  # e.g. "Apple M2 Max", a CPU model, a CUDA GPU
    cpu_cores: int
    gpu_cores: int  # 0 where unknown
    platform: str  # e.g. "darwin-arm64", "linux-x86_64"


@dataclass(frozen=True)
class WorkerLimits:
    """What a worker allows; a coordinator checks its own settings against these."""

    max_batch: int  # sessions in one Forward step
    max_message_bytes: int  # largest gRPC message the worker sends or accepts
    max_sessions: int  # sessions open at once
    kv_budget_tokens: int  # the KV budget when LoadLayers gives 0
    session_ttl_s: float  # the idle TTL when LoadLayers gives 0


@dataclass(frozen=True)
class WorkerInfo:
    """A worker's answer to Info: who it is, what it holds, how full it is."""

    name: str
    version: str  # package version of the worker
    protocol_version: int  # bumps on incompatible message changes
    capabilities: Capabilities
    limits: WorkerLimits
    model: str = ""  # "" while nothing is loaded
    layer_start: int = 0
    layer_end: int = 0  # == layer_start while nothing is loaded
    model_num_layers: int = 0
    weight_bytes: int = 0  # bytes of the loaded slice's parameters, its edges' included
    kv_capacity_tokens: int = 0
    kv_used_tokens: int = 0
    sessions_open: int = 0
    dtype: str = ""  # dtype hidden states must arrive in
    hidden_size: int = 0
    embedding: bool = False  # holds the token embedding: the first stage
    head: bool = False  # holds the final norm and LM head, and samples: the last stage
    prefixes: int = 0  # prefixes kept for later sessions (prefix cache)
    prefix_tokens: int = 0  # tokens they hold (part of the KV budget, evicted first)
    prefix_bytes: int = 0
    prefix_capacity_bytes: int = 0  # 0: this worker keeps none
    shared_memory_probe: str = ""  # a segment peers on its host can open; "": takes none

    @property
    def layers(self) -> LayerRange | None:
        """The slice held, or None while nothing is loaded."""
        if self.layer_end <= self.layer_start:
            return None
        return LayerRange(self.layer_start, self.layer_end, self.model_num_layers)

    @classmethod
    def from_proto(cls, message: pb.InfoResponse) -> WorkerInfo:
        return cls(
            **_scalars(cls, message),
            capabilities=Capabilities(**_scalars(Capabilities, message.capabilities)),
            limits=WorkerLimits(**_scalars(WorkerLimits, message.limits)),
        )

    def to_proto(self) -> pb.InfoResponse:
        return pb.InfoResponse(
            **_scalars(WorkerInfo, self),
            capabilities=pb.Capabilities(**dataclasses.asdict(self.capabilities)),
            limits=pb.WorkerLimits(**dataclasses.asdict(self.limits)),
        )


@dataclass(frozen=True)
class LoadedSlice:
    """A worker's answer to LoadLayers."""

    info: WorkerInfo  # the worker after loading
    memory_used_bytes: int  # memory the slice's weights took
    reloaded: bool  # False when the same slice was already loaded (its sessions still end)

    @classmethod
    def from_proto(cls, message: pb.LoadLayersResponse) -> LoadedSlice:
        return cls(WorkerInfo.from_proto(message.info), message.memory_used_bytes, message.reloaded)


def _scalars(cls: type[Any], source: Any) -> dict[str, Any]:
    """The plain fields of dataclass `cls`, read from `source`: a message or a dataclass
    with fields of the same names."""
    return {
        f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if f.name not in _NESTED
    }
