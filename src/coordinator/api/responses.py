"""Run one generation for an HTTP request: deadline, shutdown drain, metrics, SSE.

`metered` wraps a generation's chunks with the request's deadline and the
server's drain deadline and records token metrics; `answer` turns the chunks
into a JSON body (`collect`) or a server-sent event stream (`stream`, sent
through a relay.Relay so that a slow client cannot hold the generation).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from mlx_cluster.coordinator.api import openai_format as fmt
from mlx_cluster.coordinator.api.errors import ApiError, api_error
from mlx_cluster.coordinator.api.metrics import Metrics
from mlx_cluster.coordinator.api.relay import SSE, Framing, Relay, RelayedResponse, Render
from mlx_cluster.coordinator.engine.generation import TextChunk

Chunks = AsyncGenerator[TextChunk, None]


@dataclass(frozen=True)
class Generation:
    """A running request's chunks and the bounds on sending them."""

    chunks: Chunks  # already under the request's deadline (metered)
    deadline: float  # loop time by which the request ends, sending included
    send_timeout_s: float  # the longest a streamed client may leave its buffer full


class Drain:
    """The server's shutdown: after `begin(grace)`, generations end by the grace deadline."""

    def __init__(self) -> None:
        self.deadline: float | None = None  # loop time by which generations must end

    def begin(self, grace_s: float) -> None:
        self.deadline = asyncio.get_running_loop().time() + grace_s

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def refuse_new(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")


async def metered(chunks: Chunks, deadline: float, drain: Drain, metrics: Metrics) -> Chunks:
    """Pass chunks through until the request's or the drain's deadline, recording metrics.

    Raises:
        TimeoutError: the request ran past `deadline` (loop time).
        ApiError: 503 when the server's shutdown grace period ended first.
    """
    last = time.perf_counter()
    async with contextlib.aclosing(chunks):
        for count in range(1 << 62):
            limit = min(deadline, drain.deadline or deadline)
            try:
                # A timeout scope, not wait_for: the generation must keep running in this
                # task, so that cancelling it (a client gone) closes it right here.
                async with asyncio.timeout_at(limit):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                drain.refuse_new()
                raise
            now = time.perf_counter()
            if count and chunk.token is not None:
                metrics.inter_token.observe(now - last)
            last = now
            if chunk.performance is not None:
                metrics.finished(chunk.performance)
            yield chunk


async def collect(chunks: Chunks) -> list[TextChunk]:
    """All chunks of a generation; failures become ApiErrors."""
    try:
        return [c async for c in chunks]
    except Exception as exc:
        raise api_error(exc) from exc


async def answer(
    generation: Generation,
    streaming: bool,
    whole: Callable[[list[TextChunk]], dict[str, Any]],
    piece: Callable[[TextChunk, bool], dict[str, Any]],
    usage: fmt.Envelope | None = None,
) -> dict[str, Any] | StreamingResponse:
    """A generation as one JSON body (`whole`), or as a stream of events (`piece`).

    Args:
        piece: the event for one chunk, given whether it is the first.
        usage: if given, the stream's last chunk is followed by a usage-only chunk
            in this envelope (OpenAI's stream_options.include_usage).
    """
    if not streaming:
        return whole(await collect(generation.chunks))

    def render(chunk: TextChunk, first: bool) -> list[dict[str, Any]]:
        events = [piece(chunk, first)]
        if usage is not None and chunk.performance is not None:
            events.append(fmt.usage_chunk(usage, chunk.performance))
        return events

    return await stream(generation, render)


async def stream(
    generation: Generation, render: Render, framing: Framing = SSE
) -> StreamingResponse:
    """Start a stream: failures before the first chunk are HTTP errors, later ones events."""
    relay = Relay(generation.chunks, generation.deadline, generation.send_timeout_s)
    try:
        first = await relay.first()
    except BaseException as exc:
        await relay.close()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise api_error(exc) from exc
    return RelayedResponse(relay, first, render, framing)
