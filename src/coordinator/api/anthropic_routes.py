"""Anthropic's Messages API: `POST /v1/messages`, so that clients written for Claude
work against the cluster.

The request is settled as a chat completion (anthropic_schemas.py). The answer
is a `message` whose blocks are the reply's parts (reply_parts.py): thinking,
text, tool_use (stop_reason "tool_use"); or a stream of Anthropic's server-sent
events (message_start, then per block content_block_start, its deltas: text_delta,
thinking_delta, input_json_delta, and content_block_stop; message_delta with the
stop reason and usage, message_stop), each with its `event:` line. Errors take
Anthropic's shape (errors.shaped).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from mlx_cluster.coordinator.api.anthropic_schemas import TOOL_ID_PREFIX, MessagesRequest
from mlx_cluster.coordinator.api.chat_template import thinking_options
from mlx_cluster.coordinator.api.errors import ANTHROPIC_TYPES, api_error
from mlx_cluster.coordinator.api.relay import Framing
from mlx_cluster.coordinator.api.reply_parts import Part, Reasoning, Reply, ReplySplitter
from mlx_cluster.coordinator.api.responses import collect, stream
from mlx_cluster.coordinator.api.settle import settle_chat
from mlx_cluster.coordinator.api.state import State
from mlx_cluster.coordinator.api.tools import ToolCall
from mlx_cluster.coordinator.engine.generation import Performance, TextChunk

router = APIRouter()


def _event(event: dict[str, Any] | str) -> str:
    kind = event["type"] if isinstance(event, dict) else "message"
    return f"event: {kind}\ndata: {json.dumps(event)}\n\n"


def _error(exc: Exception) -> dict[str, Any]:
    error = api_error(exc)
    kind = ANTHROPIC_TYPES.get(error.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


EVENTS = Framing("text/event-stream", _event, _error)


def _stop(last: TextChunk, splitter: ReplySplitter) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a generation's last chunk."""
    if last.finish_reason == "length":
        return "max_tokens", None
    if last.stop_sequence is not None:
        return "stop_sequence", last.stop_sequence
    if splitter.calls:
        return "tool_use", None
    return "end_turn", None


def _usage(perf: Performance | None, prompt_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": prompt_tokens,
        "output_tokens": perf.completion_tokens if perf else 0,
        "cache_read_input_tokens": perf.cached_prompt_tokens if perf else 0,
        "cache_creation_input_tokens": 0,
    }


def _message(model: str, message_id: str, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": None,
        "stop_sequence": None,
    }


def _tool_use(call: ToolCall, streamed: bool = False) -> dict[str, Any]:
    """A tool_use block; streamed, its input comes in input_json_delta events."""
    return {"type": "tool_use", "id": call.id, "name": call.name} | {
        "input": {} if streamed else call.arguments
    }


def _blocks(reply: Reply) -> list[dict[str, Any]]:
    """A whole reply's blocks: its thinking, its text, its tool calls."""
    blocks: list[dict[str, Any]] = []
    if reply.reasoning:
        blocks.append({"type": "thinking", "thinking": reply.reasoning, "signature": ""})
    if reply.content or not reply.calls:
        blocks.append({"type": "text", "text": reply.content})
    return blocks + [_tool_use(call) for call in reply.calls]


class _StreamedBlocks:
    """A reply's parts as content block events: a block opens when the kind of part
    changes, and closes before the next one opens."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # the open block's type

    def events(self, parts: list[Part]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for part in parts:
            if isinstance(part, ToolCall):
                events += self._start(_tool_use(part, streamed=True))
                delta = {"type": "input_json_delta", "partial_json": part.arguments_json}
                events += [self._delta(delta), *self.close()]
                continue
            kind = "thinking" if isinstance(part, Reasoning) else "text"
            if self.open != kind:
                block = {"type": kind, kind: ""} | ({"signature": ""} if kind == "thinking" else {})
                events += self._start(block)
            events.append(self._delta({"type": f"{kind}_delta", kind: part.text}))
        return events

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        self.index += 1
        self.open = block["type"]
        return [
            *events,
            {"type": "content_block_start", "index": self.index, "content_block": block},
        ]

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def close(self) -> list[dict[str, Any]]:
        """The open block's stop event, if one is open."""
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.index}]

    def finish(self) -> list[dict[str, Any]]:
        """The last block's stop; a reply of no parts gets an empty text block."""
        if self.index < 0:
            return [*self._start({"type": "text", "text": ""}), *self.close()]
        return self.close()


@router.post("/v1/messages", response_model=None)
async def messages(request: MessagesRequest, state: State) -> dict[str, Any] | StreamingResponse:
    tokenizer = state.cluster.tokenizer
    think = request.thinking_wanted()
    options = {} if think is None else thinking_options(tokenizer, think, "thinking")
    prepared = await settle_chat(request.as_chat(options), state.cluster, state.limits)
    generation = state.generate(prepared)
    splitter = ReplySplitter(tokenizer, prepared.reply, TOOL_ID_PREFIX)
    message_id, prompt_tokens = f"msg_{uuid.uuid4().hex}", len(prepared.tokens)
    if not request.stream:
        chunks = await collect(generation.chunks)
        body = _message(request.model, message_id, _blocks(Reply.of(splitter, chunks)))
        reason, sequence = _stop(chunks[-1], splitter)
        body |= {"stop_reason": reason, "stop_sequence": sequence}
        return body | {"usage": _usage(chunks[-1].performance, prompt_tokens)}
    blocks = _StreamedBlocks()

    def render(chunk: TextChunk, first: bool) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if first:
            start = _message(request.model, message_id, [])
            start["usage"] = _usage(None, prompt_tokens)
            events.append({"type": "message_start", "message": start})
        done = chunk.finish_reason is not None
        events += blocks.events(splitter.feed(chunk.text, last=done))
        if done:
            reason, sequence = _stop(chunk, splitter)
            usage = {"output_tokens": _usage(chunk.performance, prompt_tokens)["output_tokens"]}
            events += [
                *blocks.finish(),
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": usage,
                },
                {"type": "message_stop"},
            ]
        return events

    return await stream(generation, render, EVENTS)
