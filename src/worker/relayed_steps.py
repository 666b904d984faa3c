"""Relayed Forward steps, pipelined: this stage computes step k + 1 while the stages
after it take step k.

A prompt's chunks arrive at the first stage back to back (the coordinator writes
them all), and each stage sends its output for a chunk on as soon as it has it,
so every stage of the ring is busy with some chunk. Answers still come back in the
order the steps came in, each with the time its stages spent on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.worker.relay import NextStage

# Steps sent on and not yet answered, at most: enough that this stage never waits for
# the next while it has work, few enough that a failure strands little work.
RELAY_DEPTH = 2

Compute = Callable[[pb.ForwardRequest], Awaitable[tuple[pb.ForwardRequest, float]]]


async def relay_steps(
    requests: AsyncIterator[pb.ForwardRequest], compute: Compute, next_stage: NextStage
) -> AsyncGenerator[pb.ForwardResponse, None]:
    """Each request's answer in order: this stage's part (`compute`: the request for the
    next stage and its seconds), then the next stages' answer.

    Raises:
        The first failure (of `requests`, `compute` or the next stages), once every
        step before it has been answered.
    """
    sent: asyncio.Queue[tuple[int, float] | Exception | None] = asyncio.Queue(RELAY_DEPTH)

    async def send_on() -> None:
        try:
            async for request in requests:
                step_id = request.step_id
                onward, compute_s = await compute(request)
                await next_stage.send(onward)
                await sent.put((step_id, compute_s))
        except Exception as exc:  # answered in its turn, after the steps before it
            await sent.put(exc)
        else:
            await sent.put(None)

    sender = asyncio.create_task(send_on())
    try:
        while (item := await sent.get()) is not None:
            if isinstance(item, Exception):
                raise item
            step_id, compute_s = item
            reply, relay_s = await next_stage.answer()
            reply.step_id = step_id
            reply.relay_seconds = relay_s - reply.compute_seconds
            reply.compute_seconds += compute_s
            reply.stage_compute_seconds.insert(0, compute_s)
            reply.stage_relay_seconds.insert(0, relay_s)
            yield reply
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
