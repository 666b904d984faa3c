"""A worker's settings: one typed, validated schema, and the only place of their defaults.

`mlx-cluster worker` flags default to None and take these defaults; tests and
benchmarks build WorkerSettings directly. Info reports the limits among them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from mlx_cluster.contract.rpc import MAX_MESSAGE_BYTES, MIB
from mlx_cluster.contract.worker_info import WorkerLimits
from mlx_cluster.models.short_steps import ShortStepAttention, backend_default
from mlx_cluster.tensor.shared import MIN_SHARED_BYTES


class WorkerSettings(BaseModel):
    """Settings a worker starts with."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    name: str = Field(min_length=1)  # shown in Info, the coordinator's /health and log lines
    kv_budget_tokens: int = Field(default=65_536, gt=0)  # cached tokens when LoadLayers gives 0
    session_ttl_s: float = Field(default=600.0, gt=0)  # idle TTL when LoadLayers gives 0
    max_sessions: int = Field(default=256, ge=1)  # sessions open at once; more: KV budget full
    max_batch: int = Field(default=256, ge=1)  # sessions in one Forward step (the coordinator's)
    batch_decode: bool = True  # decode steps of several sessions run as one batch
    # The largest gRPC message, in or out (the coordinator's limits.max_message_mb must match).
    max_message_bytes: int = Field(default=MAX_MESSAGE_BYTES, ge=4096, le=2047 * MIB)
    # Start computing every this many layers of a step while the rest is built (0: at the
    # end); None: this backend's measured best (`layer_eval_every`).
    eval_every: int | None = Field(default=None, ge=0)
    # How steps of a few positions (a turn's new tokens, speculative verification) attend
    # (models/short_steps.py); None: this backend's default.
    short_step_attention: ShortStepAttention | None = None
    # Hidden states of at least this many bytes go to a next stage on this host through
    # shared memory (tensor/shared.py); 0: always as gRPC messages.
    shared_memory_min_bytes: int = Field(default=MIN_SHARED_BYTES, ge=0)
    lease_grace_s: float = Field(default=2.0, ge=0)  # a lease's sessions outlive its call this long
    lease_heartbeat_s: float = Field(default=5.0, gt=0)  # a Lease call gets an event this often

    def layer_eval_every(self, metal: bool) -> int:
        """`eval_every`, or this backend's best by measurement (benchmarks/RESULTS.md).

        CUDA (one H200, 8B-shaped layers, batch 1): after every layer is fastest, 2.4-3.0 ms
        for 16 layers against 3.0-4.3 every 4 and 3.7-3.9 at the end. CPU (the demo model's
        layers): every layer, every 4 and at the end are within noise (121-127 ms). Metal
        is not measured yet and keeps every 4 layers, the earlier default.
        """
        if self.eval_every is not None:
            return self.eval_every
        return 4 if metal else 1

    def short_steps(self) -> ShortStepAttention:
        """`short_step_attention`, or this backend's default: padded on CUDA, where a step
        at a new shape builds a new cuDNN plan (benchmarks/RESULTS.md)."""
        return self.short_step_attention or backend_default()

    @property
    def limits(self) -> WorkerLimits:
        """What Info tells coordinators this worker allows."""
        return WorkerLimits(
            max_batch=self.max_batch,
            max_message_bytes=self.max_message_bytes,
            max_sessions=self.max_sessions,
            kv_budget_tokens=self.kv_budget_tokens,
            session_ttl_s=self.session_ttl_s,
        )
