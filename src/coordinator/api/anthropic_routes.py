"""Anthropic's Messages API: `POST /v1/messages`, so that clients written for Claude
work against the cluster.

The request is settled as a chat completion (anthropic_schemas.py). The answer
is a `message` with one text block, or a stream of Anthropic's server-sent events
(message_start, content_block_start, content_block_delta..., content_block_stop,
message_delta with the stop reason and usage, message_stop), each with its
`event:` line. Errors take Anthropic's shape (errors.shaped).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from mlx_cluster.coordinator.api.anthropic_schemas import MessagesRequest
from mlx_cluster.coordinator.api.errors import ANTHROPIC_TYPES, api_error
from mlx_cluster.coordinator.api.relay import Framing
from mlx_cluster.coordinator.api.responses import collect, stream
from mlx_cluster.coordinator.api.settle import settle_chat
from mlx_cluster.coordinator.api.state import State
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


def _stop(last: TextChunk) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a generation's last chunk."""
    if last.finish_reason == "length":
        return "max_tokens", None
    if last.stop_sequence is not None:
        return "stop_sequence", last.stop_sequence
    return "end_turn", None


def _usage(perf: Performance | None, prompt_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": prompt_tokens,
        "output_tokens": perf.completion_tokens if perf else 0,
        "cache_read_input_tokens": perf.cached_prompt_tokens if perf else 0,
        "cache_creation_input_tokens": 0,
    }


def _message(model: str, message_id: str, text_blocks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": text_blocks,
        "stop_reason": None,
        "stop_sequence": None,
    }


@router.post("/v1/messages", response_model=None)
async def messages(request: MessagesRequest, state: State) -> dict[str, Any] | StreamingResponse:
    prepared = await settle_chat(request.as_chat(), state.cluster, state.limits)
    generation = state.generate(prepared)
    message_id, prompt_tokens = f"msg_{uuid.uuid4().hex}", len(prepared.tokens)
    if not request.stream:
        chunks = await collect(generation.chunks)
        text = "".join(c.text for c in chunks)
        reason, sequence = _stop(chunks[-1])
        body = _message(request.model, message_id, [{"type": "text", "text": text}])
        body |= {"stop_reason": reason, "stop_sequence": sequence}
        return body | {"usage": _usage(chunks[-1].performance, prompt_tokens)}

    def render(chunk: TextChunk, first: bool) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if first:
            start = _message(request.model, message_id, [])
            start["usage"] = _usage(None, prompt_tokens)
            events += [
                {"type": "message_start", "message": start},
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ]
        if chunk.text:
            delta = {"type": "text_delta", "text": chunk.text}
            events.append({"type": "content_block_delta", "index": 0, "delta": delta})
        if chunk.finish_reason is not None:
            reason, sequence = _stop(chunk)
            usage = {"output_tokens": _usage(chunk.performance, prompt_tokens)["output_tokens"]}
            events += [
                {"type": "content_block_stop", "index": 0},
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": usage,
                },
                {"type": "message_stop"},
            ]
        return events

    return await stream(generation, render, EVENTS)
