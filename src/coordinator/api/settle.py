"""Settling a request before it runs: prompt -> tokens, the limits, max_tokens.

Every check that can fail fails here, as a 4xx naming the field, before a
generation (and a stream) starts. The chat template and the tokenizer run in a
worker thread, so that a large prompt does not stall the streams of others
(they touch no MLX, only the tokenizer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_cluster.contract.config import LimitsConfig
from mlx_cluster.contract.errors import InvalidParam
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.coordinator.api.chat_template import template_options
from mlx_cluster.coordinator.api.errors import ApiError
from mlx_cluster.coordinator.api.reply_parts import ReplyFormat
from mlx_cluster.coordinator.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    _Request,
)
from mlx_cluster.coordinator.api.served_model import ServedModel
from mlx_cluster.coordinator.api.tools import forced_call, offered_tools
from mlx_cluster.coordinator.engine.generation import check_request


@dataclass(frozen=True)
class Prepared:
    """A request ready to run: its prompt tokens and its settled sampling parameters."""

    tokens: list[int]
    params: SamplingParams
    started: float  # loop time the request began settling: its deadline counts from here
    choices: int = 1  # n: completions of the prompt
    reply: ReplyFormat = field(default_factory=ReplyFormat)  # how a chat's reply splits


async def settle_chat(
    request: ChatCompletionRequest, cluster: ServedModel, limits: LimitsConfig
) -> Prepared:
    """The chat template applied to the messages, the tools and the template's options,
    then `settle`."""
    started = asyncio.get_running_loop().time()
    tokenizer = cluster.tokenizer
    tools = offered_tools(tokenizer, request.tools, request.tool_choice)
    options = template_options(tokenizer, request.chat_template_kwargs, request.reasoning_effort)
    forced = forced_call(tokenizer, tools, request.tool_choice)
    tokens = await asyncio.to_thread(_chat_tokens, request, tools, options, cluster, limits)
    prepared = settle(request, tokens, cluster, limits, started)
    reply = ReplyFormat.of_prompt(tokenizer, tokens, tools)
    if forced is None:
        return dataclasses.replace(prepared, reply=reply)
    if prepared.params.constraint is not None:
        raise ApiError(
            400,
            "tool_choice: a forced call and response_format cannot both shape the reply",
            param="tool_choice",
        )
    params = dataclasses.replace(prepared.params, constraint=forced)
    return dataclasses.replace(prepared, params=params, reply=reply)


def _chat_tokens(
    request: ChatCompletionRequest,
    tools: list[dict[str, Any]] | None,
    options: dict[str, Any],
    cluster: ServedModel,
    limits: LimitsConfig,
) -> list[int]:
    """Every byte of the messages and tools counted (roles, names, each content part,
    calls), then the chat template; runs in a worker thread."""
    strings = (text for message in request.messages for text in message.strings())
    size = sum(_utf8_size(text, "messages") for text in strings)
    size += len(json.dumps(tools).encode("utf-8")) if tools else 0
    _check_prompt_size(size, request, cluster, limits)
    try:
        messages = request.chat_messages()
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    try:
        tokens = cluster.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, **options
        )
    except Exception as exc:  # jinja raises its own errors for unsupported conversations
        raise ApiError(
            400, f"the chat template rejected the messages: {exc}", param="messages"
        ) from exc
    return list(tokens)


async def settle_completion(
    request: CompletionRequest, cluster: ServedModel, limits: LimitsConfig
) -> Prepared:
    """The prompt as given (token ids) or encoded (text), then `settle`."""
    started = asyncio.get_running_loop().time()
    prompt = request.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], int):
        return settle(request, [int(t) for t in prompt], cluster, limits, started)
    text = prompt if isinstance(prompt, str) else str(prompt[0])
    _check_prompt_size(_utf8_size(text, "prompt"), request, cluster, limits)
    tokens = await asyncio.to_thread(cluster.encode, text)
    return settle(request, tokens, cluster, limits, started)


async def settle_generate(
    request: GenerateRequest, cluster: ServedModel, limits: LimitsConfig
) -> Prepared:
    """The prompt encoded (as one chat message with `chat`), then `settle`."""
    started = asyncio.get_running_loop().time()
    if request.n != 1:
        raise ApiError(
            400, f"/generate gives one completion: n must be 1, got {request.n}", param="n"
        )
    _check_prompt_size(_utf8_size(request.prompt, "prompt"), request, cluster, limits)
    tokens = await asyncio.to_thread(cluster.encode, request.prompt, request.chat)
    return settle(request, tokens, cluster, limits, started)


def settle(
    request: _Request,
    tokens: list[int],
    cluster: ServedModel,
    limits: LimitsConfig,
    started: float,
) -> Prepared:
    """Check the prompt against the limits and the context window; settle max_tokens."""
    context = cluster.context_length
    if request.n > limits.max_choices:
        raise ApiError(400, f"n must be at most {limits.max_choices}, got {request.n}", param="n")
    if not tokens:
        raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
    _check_token_count(len(tokens), "", request, cluster, limits)
    max_tokens = _max_tokens(request, len(tokens), context, limits)
    # generate_text runs the same checks; running them here makes a bad id a 400
    # naming its field, before a stream starts.
    try:
        params = request.sampling(max_tokens, cluster.speculative)
        check_request(tokens, params, cluster.vocab_size)
    except InvalidParam as exc:
        raise ApiError(400, str(exc), param=exc.param) from exc
    return Prepared(tokens, params, started, request.n)


def _max_tokens(request: _Request, prompt: int, context: int, limits: LimitsConfig) -> int:
    """What the request asked for (or the default), cut to what the context window leaves."""
    wanted = request.requested_max_tokens()
    if wanted is not None and wanted > limits.max_tokens_ceiling:
        raise ApiError(
            400,
            f"max_tokens is {wanted}, at most {limits.max_tokens_ceiling} is allowed",
            param="max_tokens",
        )
    return min(wanted or limits.default_max_tokens, context - prompt)


def _check_prompt_size(
    size: int, request: _Request, cluster: ServedModel, limits: LimitsConfig
) -> None:
    """The prompt's UTF-8 bytes against the limit; then the fewest tokens they can be
    against the token limit, so that a prompt sure to be too long is not tokenized
    (tokenizing megabytes holds the GIL for tenths of a second, even in a thread)."""
    if size > limits.max_prompt_bytes:
        raise ApiError(
            413,
            f"the prompt is {size} bytes, the limit is {limits.max_prompt_bytes} bytes",
            param="prompt",
            code="prompt_too_large",
        )
    fewest = size // _longest_token_bytes(cluster.tokenizer)
    _check_token_count(fewest, "at least ", request, cluster, limits)


def _check_token_count(
    count: int, at_least: str, request: _Request, cluster: ServedModel, limits: LimitsConfig
) -> None:
    context = cluster.context_length
    limit = min(limits.max_prompt_tokens or context, context - 1)
    if count > limit:
        raise ApiError(
            400,
            f"the prompt has {at_least}{count} tokens, the limit is {limit} tokens "
            f"(context window {context})",
            param="messages" if isinstance(request, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )


@functools.cache
def _longest_token_bytes(tokenizer: TokenizerWrapper) -> int:
    """The most UTF-8 bytes of one vocabulary entry: no token covers more bytes of text
    (byte-level and SentencePiece pieces spell a byte in one or more bytes)."""
    return max(len(token.encode("utf-8")) for token in tokenizer.get_vocab())


def _utf8_size(text: str, param: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param} is not valid Unicode: {exc.reason}", param=param) from exc
