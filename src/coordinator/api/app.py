"""The coordinator's HTTP API (FastAPI): OpenAI-compatible routes, /generate, /health.

Handlers validate and settle the request (prompt -> tokens, limits, max_tokens),
then hand it to the Cluster; formatting lives in openai_format, errors in
http_errors.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from mlx_cluster.contract.config import LimitsConfig
from mlx_cluster.contract.plan import plan_as_dict
from mlx_cluster.coordinator.api import openai_format as fmt
from mlx_cluster.coordinator.api.auth import ApiKeyAuth
from mlx_cluster.coordinator.api.errors import ApiError, install_error_handlers
from mlx_cluster.coordinator.api.metrics import Metrics
from mlx_cluster.coordinator.api.middleware import RequestContext
from mlx_cluster.coordinator.api.responses import Drain, collect, metered, stream
from mlx_cluster.coordinator.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    _Request,
)
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.coordinator.engine.generation import TextChunk, check_request
from mlx_cluster.coordinator.engine.health import ClusterHealth, StageHealth
from mlx_cluster.coordinator.engine.sampling import InvalidParam, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    tokens: list[int]
    params: SamplingParams


# --- settling a request -----------------------------------------------------------------


def _check_prompt_bytes(size: int, settings: LimitsConfig) -> None:
    if size > settings.max_prompt_bytes:
        raise ApiError(
            413,
            f"the prompt is {size} bytes, the limit is {settings.max_prompt_bytes} bytes",
            param="prompt",
            code="prompt_too_large",
        )


def _utf8_size(text: str, param: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param} is not valid Unicode: {exc.reason}", param=param) from exc


def _settle(
    request: _Request, tokens: list[int], cluster: Cluster, settings: LimitsConfig
) -> Prepared:
    """Check the prompt against the limits and the context window; settle max_tokens."""
    context = cluster.context_length
    limit = min(settings.max_prompt_tokens or context, context - 1)
    if not tokens:
        raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
    if len(tokens) > limit:
        raise ApiError(
            400,
            f"the prompt has {len(tokens)} tokens, the limit is {limit} tokens "
            f"(context window {context})",
            param="messages" if isinstance(request, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    wanted = request.requested_max_tokens()
    if wanted is not None and wanted > settings.max_tokens_ceiling:
        raise ApiError(
            400,
            f"max_tokens is {wanted}, at most {settings.max_tokens_ceiling} is allowed",
            param="max_tokens",
        )
    max_tokens = min(wanted or settings.default_max_tokens, context - len(tokens))
    # generate_text runs the same checks; running them here makes a bad id a 400
    # naming its field, before a stream starts.
    try:
        params = request.sampling(max_tokens)
        check_request(tokens, params, cluster.pipeline.edges.vocab_size)
    except InvalidParam as exc:
        raise ApiError(400, str(exc), param=exc.param) from exc
    return Prepared(tokens, params)


def _chat_tokens(
    request: ChatCompletionRequest, cluster: Cluster, settings: LimitsConfig
) -> Prepared:
    try:
        messages = request.chat_messages()
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    _check_prompt_bytes(sum(_utf8_size(m["content"], "messages") for m in messages), settings)
    try:
        tokens = cluster.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as exc:  # jinja raises its own errors for unsupported conversations
        raise ApiError(
            400, f"the chat template rejected the messages: {exc}", param="messages"
        ) from exc
    return _settle(request, list(tokens), cluster, settings)


def _completion_tokens(
    request: CompletionRequest, cluster: Cluster, settings: LimitsConfig
) -> Prepared:
    prompt = request.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], int):
        return _settle(request, [int(t) for t in prompt], cluster, settings)
    text = prompt if isinstance(prompt, str) else str(prompt[0])
    _check_prompt_bytes(_utf8_size(text, "prompt"), settings)
    return _settle(request, list(cluster.tokenizer.encode(text)), cluster, settings)


# --- health ---------------------------------------------------------------------------


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _stage_entry(stage: StageHealth) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": stage.name,
        "address": stage.address,
        "layers": [stage.layers.start, stage.layers.end],
        "status": stage.status,
    }
    info = stage.info
    if info is None:
        entry["error"] = stage.error
        return entry
    caps = info.capabilities
    entry.update(
        device={"kind": caps.device_kind, "name": caps.device_name},
        memory={
            "total_bytes": caps.memory_total_bytes,
            "available_bytes": caps.memory_available_bytes,
            "weight_bytes": info.weight_bytes,
        },
        kv_tokens={"used": info.kv_used_tokens, "capacity": info.kv_capacity_tokens},
        sessions_open=info.sessions_open,
        last_round_trip_ms=_ms(stage.round_trip_s),
        last_step_network_ms=_ms(stage.step_network_s),
    )
    return entry


def health_body(state: ClusterHealth) -> dict[str, Any]:
    return {
        "status": state.status,
        "model": state.model,
        "workers": [_stage_entry(s) for s in state.stages],
        "standby": [{"name": s.name, "address": s.address} for s in state.standbys],
    }


# --- the app -----------------------------------------------------------------------------


def create_app(
    cluster: Cluster,
    settings: LimitsConfig | None = None,
    cors_origins: Sequence[str] = (),
    api_keys: Sequence[str] = (),
) -> FastAPI:
    """The HTTP API over a started Cluster, with the request limits of `settings`.

    With `api_keys`, every route but `GET /` and `GET /health` needs one of them.
    """
    settings = settings or LimitsConfig()
    app = FastAPI(title="mlx-cluster", version="1")
    install_error_handlers(app)
    metrics = Metrics()
    drain = Drain()
    app.state.metrics, app.state.drain = metrics, drain
    cluster.events.subscribe(metrics.observe)
    if api_keys:  # innermost: refusals are logged and counted; CORS preflights pass
        app.add_middleware(ApiKeyAuth, keys=api_keys)
    app.add_middleware(RequestContext, metrics=metrics)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    model_id = cluster.model_id

    def token_text(token: int) -> str:
        return str(cluster.tokenizer.decode([token]))

    def run(prepared: Prepared) -> AsyncGenerator[TextChunk, None]:
        drain.refuse_new()
        timeout = settings.request_timeout_s
        chunks = cluster.generate(prepared.tokens, prepared.params, timeout=timeout)
        return metered(chunks, timeout, drain, metrics)

    @app.get("/")
    async def root() -> dict[str, Any]:
        return {
            "service": "mlx-cluster",
            "description": "one model served by a pipeline of MLX workers",
            "model": model_id,
            "endpoints": {
                "POST /v1/chat/completions": "OpenAI chat completions (streaming with stream=true)",
                "POST /v1/completions": "OpenAI text completions",
                "POST /generate": "prompt in; text, usage and timings out",
                "GET /v1/models": "the served model",
                "GET /health": "status of every worker and its layers",
            },
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_id,
                    "object": "model",
                    "created": cluster.created,
                    "owned_by": "mlx-cluster",
                    "context_length": cluster.context_length,
                }
            ],
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        for stage in (await cluster.health()).stages:
            metrics.set_worker(stage.name, stage.info)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> JSONResponse:
        state = await cluster.health()
        body = health_body(state)
        body["context_tokens"] = cluster.context_length
        body["plan"] = plan_as_dict(cluster.plan) if cluster.plan else None
        return JSONResponse(body, status_code=200 if state.serving else 503)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: ChatCompletionRequest) -> dict[str, Any] | StreamingResponse:
        prepared = _chat_tokens(request, cluster, settings)
        env = fmt.Envelope("chat.completion", model_id)
        logprobs = request.logprobs
        if not request.stream:
            return fmt.chat_response(env, await collect(run(prepared)), token_text, logprobs)
        usage = bool(request.stream_options and request.stream_options.include_usage)

        def render(chunk: TextChunk, first: bool) -> list[dict[str, Any]]:
            events = [fmt.chat_chunk(env, chunk, token_text, logprobs, first)]
            if usage and chunk.performance is not None:
                events.append(fmt.usage_chunk(env, chunk.performance))
            return events

        return await stream(run(prepared), render)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        prepared = _completion_tokens(request, cluster, settings)
        env = fmt.Envelope("text_completion", model_id)
        logprobs = request.logprobs is not None
        echo = cluster.tokenizer.decode(prepared.tokens) if request.echo else ""
        if not request.stream:
            chunks = await collect(run(prepared))
            return fmt.completion_response(env, chunks, token_text, logprobs, echo)
        usage = bool(request.stream_options and request.stream_options.include_usage)

        def render(chunk: TextChunk, first: bool) -> list[dict[str, Any]]:
            prefix = echo if first else ""
            events = [fmt.completion_chunk(env, chunk, token_text, logprobs, prefix)]
            if usage and chunk.performance is not None:
                events.append(env.wrap("text_completion", [], usage=fmt.usage(chunk.performance)))
            return events

        return await stream(run(prepared), render)

    @app.post("/generate", response_model=None)
    async def generate(request: GenerateRequest) -> dict[str, Any] | StreamingResponse:
        _check_prompt_bytes(_utf8_size(request.prompt, "prompt"), settings)
        tokens = cluster.encode(request.prompt, chat=request.chat)
        prepared = _settle(request, tokens, cluster, settings)
        if not request.stream:
            return fmt.generate_response(await collect(run(prepared)))
        return await stream(run(prepared), lambda chunk, first: [fmt.generate_chunk(chunk)])

    return app
