"""Errors shared by coordinator and worker, each tied to one gRPC status code.

Compute code raises these; the worker's servicer turns them into statuses and
the coordinator's client turns statuses back into them, so a message written
on a worker reaches the HTTP client unchanged.
"""

from __future__ import annotations

import grpc


class ClusterError(Exception):
    """Base class; `code` is the gRPC status the error travels as."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ClusterError, ValueError):
    """A request field is malformed or out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class SessionNotFound(ClusterError, KeyError):
    """A session id the worker does not hold (never opened, ended, or evicted)."""

    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "session not found"


class SessionExists(ClusterError):
    """OpenSession for an id that is already open."""

    code = grpc.StatusCode.ALREADY_EXISTS


class NotLoaded(ClusterError):
    """The worker has no layers loaded yet."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class OffsetMismatch(ClusterError):
    """A step's cache offset differs from what the worker holds for that session."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class KVCapacityExceeded(ClusterError):
    """The KV budget cannot hold the tokens asked for."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class WorkerUnavailable(ClusterError):
    """A worker cannot be reached or stopped answering."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ClusterError):
    """A call without the worker's cluster token, or with another one."""

    code = grpc.StatusCode.UNAUTHENTICATED


# A worker that failed this way lost a session's state: replaying the session restores it.
RECOVERABLE = (WorkerUnavailable, SessionNotFound, NotLoaded, OffsetMismatch)

_BY_CODE: dict[grpc.StatusCode, type[ClusterError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: SessionNotFound,
    grpc.StatusCode.ALREADY_EXISTS: SessionExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: KVCapacityExceeded,
    grpc.StatusCode.UNAVAILABLE: WorkerUnavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_from_status(code: grpc.StatusCode, details: str, worker: str) -> ClusterError:
    """Rebuild the error a worker sent as a gRPC status, naming the worker."""
    cls = _BY_CODE.get(code, ClusterError)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        cls = OffsetMismatch if "offset" in details else NotLoaded
    err = cls(f"worker {worker}: {details}")
    err.code = code
    return err
