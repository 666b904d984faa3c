"""Errors shared by coordinator and worker, each tied to one gRPC status code and one kind.

Compute code raises these; the worker's servicer turns them into statuses and
the coordinator's client turns statuses back into them, so a message written
on a worker reaches the HTTP client unchanged. Several errors share a status
code (FAILED_PRECONDITION: NotLoaded, OffsetMismatch), so the worker also names
the error's kind in the status's trailing metadata, and the client rebuilds the
class from that kind, never from the message text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import grpc


class ClusterError(Exception):
    """Base class; `code` is the gRPC status the error travels as, `kind` names the class."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    kind: str = "internal"  # sent as trailing metadata under ERROR_KIND_KEY; fixed on the wire


class InvalidArgument(ClusterError, ValueError):
    """A request field is malformed or out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    kind = "invalid_argument"


class SessionNotFound(ClusterError, KeyError):
    """A session id the worker does not hold (never opened, ended, or evicted)."""

    code = grpc.StatusCode.NOT_FOUND
    kind = "session_not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "session not found"


class SessionExists(ClusterError):
    """OpenSession for an id that is already open."""

    code = grpc.StatusCode.ALREADY_EXISTS
    kind = "session_exists"


class NotLoaded(ClusterError):
    """The worker has no layers loaded yet."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = "not_loaded"


class OffsetMismatch(ClusterError):
    """A step's cache offset differs from what the worker holds for that session."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = "offset_mismatch"


class KVCapacityExceeded(ClusterError):
    """The KV budget cannot hold the tokens asked for."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = "kv_capacity_exceeded"


class WorkerUnavailable(ClusterError):
    """A worker cannot be reached or stopped answering."""

    code = grpc.StatusCode.UNAVAILABLE
    kind = "worker_unavailable"


class Unauthenticated(ClusterError):
    """A call without the worker's cluster token, or with another one."""

    code = grpc.StatusCode.UNAUTHENTICATED
    kind = "unauthenticated"


# A worker that failed this way lost a session's state: replaying the session restores it.
RECOVERABLE = (WorkerUnavailable, SessionNotFound, NotLoaded, OffsetMismatch)

# The trailing metadata key under which a worker names the kind of error it sends.
ERROR_KIND_KEY = "mlx-cluster-error"

# Every error that travels between worker and coordinator: the one table both ends read.
WIRE_ERRORS: tuple[type[ClusterError], ...] = (
    InvalidArgument,
    SessionNotFound,
    SessionExists,
    NotLoaded,
    OffsetMismatch,
    KVCapacityExceeded,
    WorkerUnavailable,
    Unauthenticated,
)
_BY_KIND = {cls.kind: cls for cls in WIRE_ERRORS}

# Statuses that name no kind come from gRPC itself (an unreachable worker, a message over
# the size limit) or from the token check: read those by code where one error alone has it.
_CODE_USES = Counter(cls.code for cls in WIRE_ERRORS)
_BY_CODE = {cls.code: cls for cls in WIRE_ERRORS if _CODE_USES[cls.code] == 1}


def error_metadata(exc: ClusterError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a worker sends with `exc`'s status: the error's kind."""
    return ((ERROR_KIND_KEY, exc.kind),)


def error_from_status(
    code: grpc.StatusCode,
    details: str,
    worker: str,
    metadata: Iterable[tuple[str, str | bytes]] | None = None,
) -> ClusterError:
    """Rebuild the error a worker sent as a gRPC status, naming the worker.

    Args:
        metadata: the status's trailing metadata; its ERROR_KIND_KEY picks the class.
    """
    kinds = [value for key, value in metadata or () if key == ERROR_KIND_KEY]
    cls = _BY_KIND.get(str(kinds[0])) if kinds else None
    if cls is None or cls.code != code:  # no kind, or one that does not travel as this code
        cls = _BY_CODE.get(code, ClusterError)
    err = cls(f"worker {worker}: {details}")
    err.code = code
    return err
