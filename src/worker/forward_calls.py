"""How a Forward call's steps arrive and how a failed one leaves.

Each step's session ids are checked as it arrives, and a message that is no
ForwardRequest ends the call as InvalidArgument. A caller that writes steps ahead
of their answers asks for failures in band (contract/streams.py): the failed step
is answered with a StepFailure instead of the call's status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from mlx_cluster.contract.errors import ClusterError, InvalidArgument
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.streams import step_failure
from mlx_cluster.worker.relay import RelayFailed
from mlx_cluster.worker.sessions import check_id

log = logging.getLogger(__name__)

# gRPC ends the requests of a Forward call whose client vanished as if the client had
# half-closed, and cancels the handler a loop iteration or two later: wait this long
# before taking an end of requests as clean (1 ms caught every case measured).
CANCEL_SETTLE_S = 0.005


async def checked_steps(
    requests: AsyncIterator[pb.ForwardRequest],
) -> AsyncIterator[pb.ForwardRequest]:
    """A Forward call's steps, their session ids checked; a malformed one raises."""
    iterator = aiter(requests)
    while True:
        try:
            request = await anext(iterator)
        except StopAsyncIteration:
            await asyncio.sleep(CANCEL_SETTLE_S)
            return
        except Exception as exc:  # bytes that are no ForwardRequest
            log.warning("undecodable Forward message: %r", exc)
            raise InvalidArgument("malformed ForwardRequest") from exc
        for session_id in request.session_ids:
            check_id(session_id, "session id")
        yield request


def in_band(exc: ClusterError) -> pb.StepFailure:
    """`exc` as a failed step's answer; a failure further down the ring names its stage."""
    stage = exc.stage if isinstance(exc, RelayFailed) else 0
    return step_failure(exc.code, str(exc), exc.kind, stage)
