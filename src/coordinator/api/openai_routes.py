"""OpenAI's routes: /v1/chat/completions, /v1/completions, /v1/models.

Each handler settles the request (settle.py), runs it (ApiState.generate) and
renders the chunks in OpenAI's shapes (openai_format.py), whole or streamed.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from mlx_cluster.coordinator.api import openai_format as fmt
from mlx_cluster.coordinator.api.chat_template import capabilities
from mlx_cluster.coordinator.api.reply_parts import Splitters
from mlx_cluster.coordinator.api.responses import answer
from mlx_cluster.coordinator.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    StreamOptions,
)
from mlx_cluster.coordinator.api.settle import settle_chat, settle_completion
from mlx_cluster.coordinator.api.state import State

router = APIRouter()


@router.get("/v1/models")
async def models(state: State) -> dict[str, Any]:
    cluster = state.cluster
    return {
        "object": "list",
        "data": [
            {
                "id": cluster.model_id,
                "object": "model",
                "created": cluster.created,
                "owned_by": "mlx-cluster",
                "context_length": cluster.context_length,
                "capabilities": capabilities(cluster.tokenizer),
            }
        ],
    }


@router.post("/v1/chat/completions", response_model=None)
async def chat(request: ChatCompletionRequest, state: State) -> dict[str, Any] | StreamingResponse:
    prepared = await settle_chat(request, state.cluster, state.limits)
    env = fmt.Envelope("chat.completion", state.cluster.model_id)
    text, logprobs = state.token_text, request.logprobs
    splitters = Splitters(state.cluster.tokenizer, prepared.reply)
    return await answer(
        await state.generate_choices(prepared),
        request.stream,
        lambda chunks: fmt.chat_response(env, chunks, splitters, text, logprobs),
        lambda chunk, first: fmt.chat_chunks(
            env, chunk, splitters[chunk.choice], text, logprobs, first
        ),
        _usage_envelope(env, request.stream_options),
    )


@router.post("/v1/completions", response_model=None)
async def completions(
    request: CompletionRequest, state: State
) -> dict[str, Any] | StreamingResponse:
    prepared = await settle_completion(request, state.cluster, state.limits)
    env = fmt.Envelope("text_completion", state.cluster.model_id)
    text, logprobs = state.token_text, request.logprobs is not None
    echo = state.cluster.tokenizer.decode(prepared.tokens) if request.echo else ""
    return await answer(
        await state.generate_choices(prepared),
        request.stream,
        lambda chunks: fmt.completion_response(env, chunks, text, logprobs, echo),
        lambda chunk, first: [
            fmt.completion_chunk(env, chunk, text, logprobs, echo if first else "")
        ],
        _usage_envelope(env, request.stream_options),
    )


def _usage_envelope(env: fmt.Envelope, options: StreamOptions | None) -> fmt.Envelope | None:
    """`env` when the client asked for a usage chunk at the end of the stream."""
    return env if options is not None and options.include_usage else None
