"""Run one generation for an HTTP request: deadline, shutdown drain, metrics, SSE.

`metered` wraps a generation's chunks with the request's deadline and the
server's drain deadline and records token metrics; `answer` turns the chunks
into a JSON body (`collect`) or a server-sent event stream (`stream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from mlx_cluster.coordinator.api import openai_format as fmt
from mlx_cluster.coordinator.api.errors import ApiError, api_error
from mlx_cluster.coordinator.api.metrics import Metrics
from mlx_cluster.coordinator.engine.generation import TextChunk

Chunks = AsyncGenerator[TextChunk, None]
Render = Callable[[TextChunk, bool], list[dict[str, Any]]]  # (chunk, first) -> events


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


async def metered(chunks: Chunks, timeout: float, drain: Drain, metrics: Metrics) -> Chunks:
    """Pass chunks through until the request's or the drain's deadline, recording metrics.

    Raises:
        TimeoutError: the request ran past `timeout` seconds.
        ApiError: 503 when the server's shutdown grace period ended first.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
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
                metrics.ttft.observe(chunk.performance.ttft_s)
                metrics.generated.inc(chunk.performance.completion_tokens)
                metrics.prompt.inc(chunk.performance.prompt_tokens)
            yield chunk


async def collect(chunks: Chunks) -> list[TextChunk]:
    """All chunks of a generation; failures become ApiErrors."""
    try:
        return [c async for c in chunks]
    except Exception as exc:
        raise api_error(exc) from exc


async def answer(
    chunks: Chunks,
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
        return whole(await collect(chunks))

    def render(chunk: TextChunk, first: bool) -> list[dict[str, Any]]:
        events = [piece(chunk, first)]
        if usage is not None and chunk.performance is not None:
            events.append(fmt.usage_chunk(usage, chunk.performance))
        return events

    return await stream(chunks, render)


async def stream(chunks: Chunks, render: Render) -> StreamingResponse:
    """Start a stream: failures before the first chunk are HTTP errors, later ones events."""
    try:
        first = await anext(chunks)
    except BaseException as exc:
        await chunks.aclose()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise api_error(exc) from exc

    async def events() -> AsyncIterator[str]:
        async with contextlib.aclosing(chunks):
            for event in render(first, True):
                yield fmt.sse(event)
            try:
                async for chunk in chunks:
                    for event in render(chunk, False):
                        yield fmt.sse(event)
            except Exception as exc:
                yield fmt.sse(api_error(exc).body())
            yield fmt.sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
