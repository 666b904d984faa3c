"""Run one generation for an HTTP request: deadline, shutdown drain, metrics, SSE.

`metered` wraps a generation's chunks with the request's deadline and the
server's drain deadline and records token metrics; `answer` turns the chunks
into a JSON body (`collect`) or a server-sent event stream (`stream`, sent
through a relay.Relay so that a slow client cannot hold the generation).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from mlx_cluster.coordinator.api import openai_format as fmt
from mlx_cluster.coordinator.api.errors import ApiError, api_error
from mlx_cluster.coordinator.api.live_figures import LiveFigures
from mlx_cluster.coordinator.api.metrics import Metrics
from mlx_cluster.coordinator.api.relay import SSE, Framing, Relay, RelayedResponse, Render
from mlx_cluster.coordinator.engine.generation import Performance, TextChunk

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


async def metered(
    chunks: Chunks, deadline: float, drain: Drain, metrics: Metrics, live: LiveFigures
) -> Chunks:
    """Pass chunks through until the request's or the drain's deadline, recording metrics
    (Prometheus's and the dashboard's).

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
            if chunk.token is not None:
                live.token()
                if count:
                    metrics.inter_token.observe(now - last)
            last = now
            if chunk.performance is not None:
                metrics.finished(chunk.performance)
                live.finished(chunk.performance)
            yield chunk


async def collect(chunks: Chunks) -> list[TextChunk]:
    """All chunks of a generation; failures become ApiErrors."""
    try:
        return [c async for c in chunks]
    except Exception as exc:
        raise api_error(exc) from exc


async def _collect_all(generations: list[Generation]) -> list[list[TextChunk]]:
    """Every generation's chunks, run at once; the first failure ends them all, and is
    the one raised."""
    if len(generations) == 1:
        return [await collect(generations[0].chunks)]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(collect(g.chunks)) for g in generations]
    except* ApiError as failures:
        raise failures.exceptions[0] from None
    return [task.result() for task in tasks]


async def _merged(generations: list[Generation]) -> Chunks:
    """The chunks of n generations as they come, each marked with its choice."""
    queue: asyncio.Queue[TextChunk | int | Exception] = asyncio.Queue()

    async def pump(choice: int, chunks: Chunks) -> None:
        try:
            async for chunk in chunks:
                await queue.put(dataclasses.replace(chunk, choice=choice))
            await queue.put(choice)  # this one is done
        except Exception as exc:
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(i, g.chunks)) for i, g in enumerate(generations)]
    try:
        for _ in range(len(tasks)):
            while not isinstance(item := await queue.get(), int):
                if isinstance(item, Exception):
                    raise item
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def answer(
    generations: list[Generation],
    streaming: bool,
    whole: Callable[[list[list[TextChunk]]], dict[str, Any]],
    piece: Callable[[TextChunk, bool], list[dict[str, Any]]],
    usage: fmt.Envelope | None = None,
) -> dict[str, Any] | StreamingResponse:
    """A request's generations (its n completions of one prompt) as one JSON body
    (`whole`, given each one's chunks), or as one stream of events (`piece`, whose
    chunks carry their `choice`).

    Args:
        piece: the events for one chunk, given whether it is the first of its choice.
        usage: if given, the stream's last chunk is followed by a usage-only chunk
            in this envelope (OpenAI's stream_options.include_usage).
    """
    if not streaming:
        return whole(await _collect_all(generations))
    started: set[int] = set()
    finished: list[Performance] = []

    def render(chunk: TextChunk, _: bool) -> list[dict[str, Any]]:
        events = piece(chunk, chunk.choice not in started)
        started.add(chunk.choice)
        if chunk.performance is not None:
            finished.append(chunk.performance)
            if usage is not None and len(finished) == len(generations):
                events.append(fmt.usage_chunk(usage, Performance.of_choices(finished)))
        return events

    if len(generations) == 1:
        return await stream(generations[0], render)
    first = generations[0]
    return await stream(
        Generation(_merged(generations), first.deadline, first.send_timeout_s), render
    )


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
