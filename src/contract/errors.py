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
    advice: str = ""  # added to a status gRPC raised itself, which names no kind


class InvalidArgument(ClusterError, ValueError):
    """A request field is malformed or out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    kind = "invalid_argument"


class InvalidParam(InvalidArgument):
    """An InvalidArgument that names the request parameter at fault (OpenAI's `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


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
    """The KV budget is full right now: the tokens asked for fit once other sessions end."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = "kv_capacity_exceeded"


class SessionTooLarge(ClusterError):
    """A session needs more tokens than the whole KV budget: it never fits, whatever ends."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = "session_too_large"


class MessageTooLarge(ClusterError):
    """A message is over a gRPC size limit (the coordinator's limits.max_message_mb, or the
    worker's --max-message-mb)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = "message_too_large"
    # gRPC's own status names only the numbers: say which settings they are.
    advice = (
        " (a message over the gRPC size limit: raise limits.max_message_mb on the "
        "coordinator and --max-message-mb on the workers together)"
    )


class WorkerUnavailable(ClusterError):
    """A worker cannot be reached or stopped answering."""

    code = grpc.StatusCode.UNAVAILABLE
    kind = "worker_unavailable"


class Unauthenticated(ClusterError):
    """A call without the worker's cluster token, or with another one."""

    code = grpc.StatusCode.UNAUTHENTICATED
    kind = "unauthenticated"


class PrefixNotFound(ClusterError):
    """OpenSession from a prefix the worker does not keep (never kept, evicted, or the
    worker restarted): the coordinator forgets it and prefills the whole prompt."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = "prefix_not_found"


class ProtocolMismatch(ClusterError):
    """A worker speaks another protocol version than this coordinator (raised by the client)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = "protocol_mismatch"


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
    SessionTooLarge,
    MessageTooLarge,
    WorkerUnavailable,
    Unauthenticated,
    PrefixNotFound,
)
_BY_KIND = {cls.kind: cls for cls in WIRE_ERRORS}

# Statuses that name no kind come from gRPC itself (an unreachable worker, a message over
# the size limit) or from the token check: read those by code where one error alone has it,
# and RESOURCE_EXHAUSTED as gRPC's only use of it, a message over the size limit.
_CODE_USES = Counter(cls.code for cls in WIRE_ERRORS)
# INTERNAL with no kind is gRPC's own ("Internal error from Core"), e.g. writing to the
# stream of a worker that just died: the worker is gone, as with UNAVAILABLE. (A worker's
# own internal error names its kind, "internal", and stays a plain ClusterError.)
# DEADLINE_EXCEEDED with no kind is a worker that did not answer in time (frozen, or its
# link silently dropped): it is unavailable, and recovery turns to a standby.
_BY_CODE: dict[grpc.StatusCode, type[ClusterError]] = {
    **{cls.code: cls for cls in WIRE_ERRORS if _CODE_USES[cls.code] == 1},
    grpc.StatusCode.RESOURCE_EXHAUSTED: MessageTooLarge,
    grpc.StatusCode.INTERNAL: WorkerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: WorkerUnavailable,
}


def error_metadata(exc: ClusterError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a worker sends with `exc`'s status: the error's kind."""
    return ((ERROR_KIND_KEY, exc.kind),)


def error_from_status(
    code: grpc.StatusCode,
    details: str,
    worker: str | None,
    metadata: Iterable[tuple[str, str | bytes]] | None = None,
) -> ClusterError:
    """Rebuild the error a worker sent as a gRPC status, naming the worker.

    Args:
        worker: the worker the message names; None when `details` names it already (a
            failure relayed from further down the ring).
        metadata: the status's trailing metadata; its ERROR_KIND_KEY picks the class.
    """
    kinds = [value for key, value in metadata or () if key == ERROR_KIND_KEY]
    cls = _BY_KIND.get(str(kinds[0])) if kinds else None
    if kinds and cls is None:  # a kind that has no class of its own, e.g. "internal"
        cls = ClusterError
    if cls is None or cls.code != code:  # no kind, or one that does not travel as this code
        cls = _BY_CODE.get(code, ClusterError)
    where = "" if worker is None else f"worker {worker}: "
    err = cls(f"{where}{details}{'' if kinds else cls.advice}")
    err.code = code
    return err
