"""Ollama's API: /api/chat, /api/generate, /api/tags, /api/show, /api/version.

Tools written for Ollama talk to the cluster unmodified: requests are turned into
the OpenAI-shaped ones the rest of the API settles (ollama_schemas.py), and the
answers come back in Ollama's shapes: one JSON body, or newline-delimited JSON
chunks (`stream`, on by default), the last one with the timings, durations in
nanoseconds. Errors are `{"error": message}` (errors.py, under /api/).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_cluster.contract.rpc import PACKAGE_VERSION
from mlx_cluster.coordinator.api.chat_template import capabilities, thinking_options
from mlx_cluster.coordinator.api.errors import ApiError
from mlx_cluster.coordinator.api.ollama_schemas import (
    OllamaChatRequest,
    OllamaGenerateRequest,
)
from mlx_cluster.coordinator.api.relay import NDJSON
from mlx_cluster.coordinator.api.reply_parts import Content, Part, Reasoning, Reply, ReplySplitter
from mlx_cluster.coordinator.api.responses import collect, stream
from mlx_cluster.coordinator.api.schemas import ChatCompletionRequest
from mlx_cluster.coordinator.api.settle import Prepared, settle_chat, settle_completion
from mlx_cluster.coordinator.api.state import ApiState, State
from mlx_cluster.coordinator.api.tools import ToolCall
from mlx_cluster.coordinator.engine.generation import Performance, TextChunk

router = APIRouter(prefix="/api")
DETAILS = {"format": "mlx", "family": "", "parameter_size": "", "quantization_level": ""}


def _iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def _now() -> str:
    return _iso(datetime.now(UTC))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _timings(perf: Performance) -> dict[str, Any]:
    """Ollama's counts and durations (ns): the prompt's evaluation is the time to the
    first token; the cluster holds its model loaded, so loading takes none."""
    return {
        "total_duration": _ns(perf.total_s),
        "load_duration": 0,
        "prompt_eval_count": perf.prompt_tokens,
        "prompt_eval_duration": _ns(perf.ttft_s),
        "eval_count": perf.completion_tokens,
        "eval_duration": _ns(max(perf.total_s - perf.ttft_s, 0.0)),
    }


def _chunk(
    model: str, chat: bool, parts: list[Part], last: TextChunk | None = None
) -> dict[str, Any]:
    """One of Ollama's chunks: `message` for a chat, `response` for a generation, with
    the thinking and (in a chat) the tool calls of `parts`."""
    body: dict[str, Any] = {"model": model, "created_at": _now()}
    content = "".join(p.text for p in parts if isinstance(p, Content))
    thinking = "".join(p.text for p in parts if isinstance(p, Reasoning))
    calls = [p for p in parts if isinstance(p, ToolCall)]
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = [
                {"function": {"name": c.name, "arguments": c.arguments}} for c in calls
            ]
        body["message"] = message
    else:
        body["response"] = content
        body |= {"thinking": thinking} if thinking else {}
    body["done"] = last is not None
    if last is not None and last.performance is not None:
        body["done_reason"] = last.finish_reason or "stop"
        body |= _timings(last.performance)
    return body


async def _answer(
    state: ApiState, prepared: Prepared, model: str, chat: bool, streaming: bool
) -> dict[str, Any] | StreamingResponse:
    generation = state.generate(prepared)
    splitter = ReplySplitter(state.cluster.tokenizer, prepared.reply)
    if not streaming:
        chunks = await collect(generation.chunks)
        reply = Reply.of(splitter, chunks)
        parts: list[Part] = [Reasoning(reply.reasoning), Content(reply.content), *reply.calls]
        return _chunk(model, chat, parts, chunks[-1])

    def render(chunk: TextChunk, first: bool) -> list[dict[str, Any]]:
        done = chunk.finish_reason is not None
        parts = splitter.feed(chunk.text, last=done)
        if not done:
            return [_chunk(model, chat, parts)]
        tail = [_chunk(model, chat, parts)] if parts else []
        return [*tail, _chunk(model, chat, [], chunk)]

    return await stream(generation, render, NDJSON)


def _template_options(state: ApiState, think: bool | str | None) -> dict[str, Any]:
    return {} if think is None else thinking_options(state.cluster.tokenizer, think, "think")


@router.post("/chat", response_model=None)
async def chat(request: OllamaChatRequest, state: State) -> dict[str, Any] | StreamingResponse:
    settled = request.as_chat(_template_options(state, request.think))
    prepared = await settle_chat(settled, state.cluster, state.limits)
    return await _answer(state, prepared, request.model, True, request.stream)


@router.post("/generate", response_model=None)
async def generate(
    request: OllamaGenerateRequest, state: State
) -> dict[str, Any] | StreamingResponse:
    if not request.prompt and not request.system:  # Ollama's way to load a model: it is
        return {"model": request.model, "created_at": _now(), "response": "", "done": True,
                "done_reason": "load"}  # fmt: skip
    settled = request.as_request(None if request.raw else _template_options(state, request.think))
    if isinstance(settled, ChatCompletionRequest):
        prepared = await settle_chat(settled, state.cluster, state.limits)
    else:
        prepared = await settle_completion(settled, state.cluster, state.limits)
    return await _answer(state, prepared, request.model, False, request.stream)


@router.get("/tags")
async def tags(state: State) -> dict[str, Any]:
    cluster = state.cluster
    modified = _iso(datetime.fromtimestamp(cluster.created, UTC))
    return {
        "models": [
            {
                "name": cluster.model_id,
                "model": cluster.model_id,
                "modified_at": modified,
                "size": 0,
                "digest": "",
                "details": DETAILS,
            }
        ]
    }


@router.post("/show")
async def show(body: dict[str, Any], state: State) -> dict[str, Any]:
    """The model's details (Ollama's clients POST the model's name)."""
    if not (body.get("model") or body.get("name")):
        raise ApiError(400, "model is required", param="model")
    return _shown(state)


@router.get("/show")
async def show_by_query(state: State, model: str = "") -> dict[str, Any]:
    """The same, for `GET /api/show?model=NAME`."""
    if not model:
        raise ApiError(400, "model is required", param="model")
    return _shown(state)


def _shown(state: ApiState) -> dict[str, Any]:
    cluster = state.cluster
    template = getattr(cluster.tokenizer, "chat_template", None) or ""
    return {
        "modelfile": "",
        "parameters": "",
        "template": template,
        "details": DETAILS,
        "model_info": {"general.context_length": cluster.context_length},
        "capabilities": _capabilities(cluster.tokenizer),
        "modified_at": _now(),
    }


def _capabilities(tokenizer: TokenizerWrapper) -> list[str]:
    """Ollama's names for what the model can do."""
    can = capabilities(tokenizer)
    names = {"tools": "tools", "reasoning": "thinking"}
    return ["completion", *(names[name] for name, able in can.items() if able and name in names)]


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": PACKAGE_VERSION}
