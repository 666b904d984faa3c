"""The contract between coordinator and workers: wire messages, errors, layer ranges.

Coordinator and worker both import this package; neither imports the other.
"""

from mlx_cluster.contract.errors import (
    ClusterError,
    InvalidArgument,
    KVCapacityExceeded,
    NotLoaded,
    OffsetMismatch,
    SessionExists,
    SessionNotFound,
    WorkerUnavailable,
)
from mlx_cluster.contract.layers import LayerRange, split_by_counts, split_evenly
from mlx_cluster.contract.rpc import CHANNEL_OPTIONS, PROTOCOL_VERSION

__all__ = [
    "CHANNEL_OPTIONS",
    "PROTOCOL_VERSION",
    "ClusterError",
    "InvalidArgument",
    "KVCapacityExceeded",
    "LayerRange",
    "NotLoaded",
    "OffsetMismatch",
    "SessionExists",
    "SessionNotFound",
    "WorkerUnavailable",
    "split_by_counts",
    "split_evenly",
]
