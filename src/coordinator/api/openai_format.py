"""Responses and stream chunks in the shapes OpenAI's API uses.

Pure functions over TextChunks; the route handlers decide what to send when.
Timing figures ride along in a `performance` field, which OpenAI clients ignore.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from mlx_cluster.coordinator.api.reply_parts import (
    Content,
    Part,
    Reasoning,
    Reply,
    ReplySplitter,
    Splitters,
)
from mlx_cluster.coordinator.api.tools import ToolCall
from mlx_cluster.coordinator.engine.generation import Performance, TextChunk

TokenText = Callable[[int], str]


@dataclass
class Envelope:
    """What every response or chunk of one request carries."""

    kind: str  # "chat.completion", "text_completion" or "generate"
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = {"chat.completion": "chatcmpl", "text_completion": "cmpl"}.get(self.kind, "gen")
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

    @property
    def chunk_object(self) -> str:
        """The `object` of this request's stream chunks."""
        return "chat.completion.chunk" if self.kind == "chat.completion" else self.kind

    def wrap(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def usage(perf: Performance) -> dict[str, Any]:
    """OpenAI's usage, with the prompt tokens a kept prefix gave as its cached tokens."""
    return {
        "prompt_tokens": perf.prompt_tokens,
        "completion_tokens": perf.completion_tokens,
        "total_tokens": perf.prompt_tokens + perf.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": perf.cached_prompt_tokens},
    }


def usage_chunk(env: Envelope, perf: Performance) -> dict[str, Any]:
    """A stream's last chunk when the client asked for usage: no choices, only usage."""
    return env.wrap(env.chunk_object, [], usage=usage(perf))


def performance(perf: Performance) -> dict[str, float]:
    """Timings, the prompt tokens a kept prefix gave, and the drafts: verified, accepted,
    decode steps and tokens per step (0 when no decode step ran)."""
    return {
        "ttft_ms": round(perf.ttft_s * 1000, 3),
        "tokens_per_second": round(perf.tokens_per_second, 3),
        "prefill_tokens_per_second": round(perf.prefill_tokens_per_second, 3),
        "total_ms": round(perf.total_s * 1000, 3),
        "cached_prompt_tokens": perf.cached_prompt_tokens,
        "draft_tokens": perf.draft_tokens,
        "accepted_draft_tokens": perf.accepted_draft_tokens,
        "decode_steps": perf.decode_steps,
        "tokens_per_step": round(perf.tokens_per_step, 3),
    }


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# --- logprobs ------------------------------------------------------------------------


def _finite(logprob: float | None) -> float | None:
    # JSON has no -Infinity; OpenAI reports impossible tokens as -9999.0.
    return logprob if logprob is None or math.isfinite(logprob) else -9999.0


def _entry(token_text: TokenText, token: int, logprob: float) -> dict[str, Any]:
    text = token_text(token)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(chunks: Sequence[TextChunk], token_text: TokenText) -> dict[str, Any]:
    content = []
    for c in chunks:
        if c.token is None or c.logprob is None:
            continue
        entry = _entry(token_text, c.token, c.logprob)
        entry["top_logprobs"] = [_entry(token_text, t, lp) for t, lp in c.top_logprobs]
        content.append(entry)
    return {"content": content}


def completion_logprobs(
    chunks: Sequence[TextChunk], token_text: TokenText, offset: int = 0
) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for c in chunks:
        if c.token is None:
            continue
        tokens.append(token_text(c.token))
        token_logprobs.append(_finite(c.logprob))
        top.append({token_text(t): _finite(lp) for t, lp in c.top_logprobs})
        offsets.append(offset)
        offset += len(c.text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


# --- one choice, whole or streamed -------------------------------------------------------


def _whole(
    env: Envelope,
    choices: Sequence[Sequence[TextChunk]],
    fields: Callable[[int, Sequence[TextChunk]], dict[str, Any]],
) -> dict[str, Any]:
    """A whole response: choice i holds `fields` of its chunks (which may give its
    finish_reason); then the usage and timings over them all (Performance.of_choices)."""
    perfs = [chunks[-1].performance for chunks in choices]
    assert all(p is not None for p in perfs)
    total = Performance.of_choices(cast(list[Performance], perfs))
    body = [
        {"index": i, "finish_reason": chunks[-1].finish_reason} | fields(i, chunks)
        for i, chunks in enumerate(choices)
    ]
    return env.wrap(env.kind, body, usage=usage(total), performance=performance(total))


def _piece(
    env: Envelope, chunk: TextChunk, finish_reason: str | None = None, **fields: Any
) -> dict[str, Any]:
    """One stream chunk: the choice it belongs to, holding `fields`; timings ride on the
    last chunk of each choice."""
    reason = finish_reason or chunk.finish_reason
    choice = {"index": chunk.choice, **fields, "finish_reason": reason}
    extra = {"performance": performance(chunk.performance)} if chunk.performance else {}
    return env.wrap(env.chunk_object, [choice], **extra)


# --- chat ------------------------------------------------------------------------------


def _call(call: ToolCall, streamed: bool = False) -> dict[str, Any]:
    function = {"name": call.name, "arguments": call.arguments_json}
    body = {"id": call.id, "type": "function", "function": function}
    return {"index": call.index, **body} if streamed else body


def _message(reply: Reply) -> dict[str, Any]:
    """The assistant's message: content, reasoning_content where the model reasoned,
    tool_calls where it called (content then null if it wrote nothing else)."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if reply.calls:
        message["content"] = reply.content or None
        message["tool_calls"] = [_call(call) for call in reply.calls]
    return message


def chat_response(
    env: Envelope,
    choices: Sequence[Sequence[TextChunk]],
    splitters: Splitters,
    token_text: TokenText,
    logprobs: bool,
) -> dict[str, Any]:
    def fields(choice: int, chunks: Sequence[TextChunk]) -> dict[str, Any]:
        splitter = splitters[choice]
        return {
            "message": _message(Reply.of(splitter, chunks)),
            "logprobs": chat_logprobs(chunks, token_text) if logprobs else None,
            "finish_reason": splitter.finish_reason(chunks[-1]),
        }

    return _whole(env, choices, fields)


def _delta(part: Part) -> dict[str, Any]:
    if isinstance(part, Reasoning):
        return {"reasoning_content": part.text}
    if isinstance(part, Content):
        return {"content": part.text}
    return {"tool_calls": [_call(part, streamed=True)]}


def chat_chunks(
    env: Envelope,
    chunk: TextChunk,
    splitter: ReplySplitter,
    token_text: TokenText,
    logprobs: bool,
    first: bool,
) -> list[dict[str, Any]]:
    """The stream chunks of one generated chunk: a delta for each part it completes (at
    least one); the last carries its logprobs, finish reason and timings."""
    done = chunk.finish_reason is not None
    deltas = [_delta(part) for part in splitter.feed(chunk.text, last=done)]
    if not deltas:
        deltas = [{} if done and not first else {"content": ""}]
    if first:
        deltas[0] = {"role": "assistant"} | deltas[0]
    quiet = dataclasses.replace(chunk, finish_reason=None, performance=None)
    events = [_piece(env, quiet, delta=delta, logprobs=None) for delta in deltas[:-1]]
    last = _piece(
        env,
        chunk,
        splitter.finish_reason(chunk),
        delta=deltas[-1],
        logprobs=chat_logprobs([chunk], token_text) if logprobs else None,
    )
    return [*events, last]


# --- text completions --------------------------------------------------------------------


def completion_response(
    env: Envelope,
    choices: Sequence[Sequence[TextChunk]],
    token_text: TokenText,
    logprobs: bool,
    echo: str = "",
) -> dict[str, Any]:
    return _whole(
        env,
        choices,
        lambda _, chunks: {
            "text": echo + "".join(c.text for c in chunks),
            "logprobs": completion_logprobs(chunks, token_text, len(echo)) if logprobs else None,
        },
    )


def completion_chunk(
    env: Envelope, chunk: TextChunk, token_text: TokenText, logprobs: bool, prefix: str = ""
) -> dict[str, Any]:
    return _piece(
        env,
        chunk,
        text=prefix + chunk.text,
        logprobs=completion_logprobs([chunk], token_text) if logprobs else None,
    )


# --- /generate -------------------------------------------------------------------------


def generate_response(chunks: Sequence[TextChunk]) -> dict[str, Any]:
    last = chunks[-1]
    assert last.performance is not None
    return {
        "text": "".join(c.text for c in chunks),
        "finish_reason": last.finish_reason,
        "usage": usage(last.performance),
        "performance": performance(last.performance),
    }


def generate_chunk(chunk: TextChunk) -> dict[str, Any]:
    out: dict[str, Any] = {"text": chunk.text, "finish_reason": chunk.finish_reason}
    if chunk.performance is not None:
        out["usage"] = usage(chunk.performance)
        out["performance"] = performance(chunk.performance)
    return out
