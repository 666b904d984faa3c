"""A streamed generation decoupled from its client: slow readers hold no shared capacity.

A producer task runs the generation at the engine's pace into a bounded buffer;
the response sends from that buffer at the client's pace. When the client
leaves the buffer full for `send_timeout_s`, or the request's deadline passes,
the producer closes the generation (which frees its decode place and its KV)
and cuts the sending, so the stream ends even while a send is blocked. A stream
whose generation ended on its own still ends by the deadline plus send_timeout_s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mlx_cluster.coordinator.api import openai_format as fmt
from mlx_cluster.coordinator.api.errors import api_error
from mlx_cluster.coordinator.engine.generation import TextChunk

log = logging.getLogger(__name__)

# Chunks a stream may hold for its client: enough for a burst of short answers to
# finish in the engine at once, small enough that a buffer costs little memory.
BUFFER_CHUNKS = 64

Item = TextChunk | Exception | None  # a chunk, the failure that ended it, or the end
Render = Callable[[TextChunk, bool], list[dict[str, Any]]]  # (chunk, first) -> events


@dataclass(frozen=True)
class Framing:
    """How a stream's events go on the wire: server-sent events (OpenAI's streams) or
    newline-delimited JSON (Ollama's)."""

    media_type: str
    frame: Callable[[dict[str, Any] | str], str]  # one event
    error: Callable[[Exception], dict[str, Any]]  # the event of the failure that ended it
    done: str | None = None  # the stream's last event, if it has one


def _ndjson(event: dict[str, Any] | str) -> str:
    return json.dumps(event) + "\n"


SSE = Framing("text/event-stream", fmt.sse, lambda exc: api_error(exc).body(), "[DONE]")
NDJSON = Framing("application/x-ndjson", _ndjson, lambda exc: {"error": api_error(exc).message})


class Relay:
    """One streamed generation: a producer task fills the buffer, the response empties it.

    Args:
        chunks: the generation, already under the request's deadline (responses.metered).
        deadline: loop time by which the whole request ends, sending included.
        send_timeout_s: the longest the buffer may stay full.
    """

    def __init__(
        self, chunks: AsyncGenerator[TextChunk, None], deadline: float, send_timeout_s: float
    ) -> None:
        self.deadline = deadline
        self.send_timeout_s = send_timeout_s
        self._buffer: asyncio.Queue[Item] = asyncio.Queue(BUFFER_CHUNKS)
        self._sending: asyncio.Timeout | None = None
        self._cut = False
        self._producer = asyncio.create_task(self._produce(chunks))

    async def _produce(self, chunks: AsyncGenerator[TextChunk, None]) -> None:
        end: Item = None
        async with contextlib.aclosing(chunks):
            try:
                async for chunk in chunks:
                    if not await self._put(chunk):
                        return self._cut_sending()
            except Exception as exc:  # it ends the stream as an error event
                end = exc
        if not await self._put(end):
            self._cut_sending()

    async def _put(self, item: Item) -> bool:
        """Whether the client made room for `item` in time."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(min(loop.time() + self.send_timeout_s, self.deadline)):
                await self._buffer.put(item)
        except TimeoutError:
            return False
        return True

    def _cut_sending(self) -> None:
        late = asyncio.get_running_loop().time() >= self.deadline
        log.warning(
            "stream cut off: %s",
            "the request's deadline passed"
            if late
            else f"its client read nothing for {self.send_timeout_s:g} s",
        )
        self._cut = True
        if self._sending is not None and not self._sending.expired():
            self._sending.reschedule(asyncio.get_running_loop().time())

    async def first(self) -> TextChunk:
        """The first chunk.

        Raises:
            Exception: the failure that ended the generation before its first chunk.
        """
        item = await self._buffer.get()
        if isinstance(item, Exception):
            raise item
        if item is None:
            raise RuntimeError("the generation ended without a chunk")
        return item

    async def events(
        self, first: TextChunk, render: Render, framing: Framing = SSE
    ) -> AsyncIterator[str]:
        """The stream's events: `first`, the buffered chunks, an error event if one
        ended it, then the framing's last event."""
        for event in render(first, True):
            yield framing.frame(event)
        while (item := await self._buffer.get()) is not None:
            if isinstance(item, Exception):
                yield framing.frame(framing.error(item))
                break
            for event in render(item, False):
                yield framing.frame(event)
        if framing.done is not None:
            yield framing.frame(framing.done)

    @contextlib.asynccontextmanager
    async def sending(self) -> AsyncIterator[None]:
        """The scope of the sending: cut by the producer, or at the latest send_timeout_s
        after the deadline (time for the last events to reach a client that reads)."""
        async with asyncio.timeout_at(self.deadline + self.send_timeout_s) as self._sending:
            if self._cut:
                self._sending.reschedule(asyncio.get_running_loop().time())
            yield

    async def close(self) -> None:
        """End the producer (and with it the generation) and wait until it has ended."""
        self._producer.cancel()
        await asyncio.wait([self._producer])


class RelayedResponse(StreamingResponse):
    """An event stream from a Relay; a stream cut off closes its connection."""

    def __init__(
        self, relay: Relay, first: TextChunk, render: Render, framing: Framing = SSE
    ) -> None:
        super().__init__(relay.events(first, render, framing), media_type=framing.media_type)
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with self.relay.sending():
                await super().__call__(scope, receive, send)
        except TimeoutError:
            pass  # the producer logged why; uvicorn closes the unfinished response
        finally:
            await self.relay.close()
