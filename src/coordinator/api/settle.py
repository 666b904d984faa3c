"""Settling a request before it runs: prompt -> tokens, the limits, max_tokens.

Every check that can fail fails here, as a 4xx naming the field, before a
generation (and a stream) starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_cluster.contract.config import LimitsConfig
from mlx_cluster.coordinator.api.errors import ApiError
from mlx_cluster.coordinator.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    _Request,
)
from mlx_cluster.coordinator.api.served_model import ServedModel
from mlx_cluster.coordinator.engine.generation import check_request
from mlx_cluster.coordinator.engine.sampling import InvalidParam, SamplingParams


@dataclass(frozen=True)
class Prepared:
    """A request ready to run: its prompt tokens and its settled sampling parameters."""

    tokens: list[int]
    params: SamplingParams


def settle_chat(
    request: ChatCompletionRequest, cluster: ServedModel, limits: LimitsConfig
) -> Prepared:
    """The chat template applied to the messages, then `settle`."""
    try:
        messages = request.chat_messages()
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    _check_prompt_bytes(sum(_utf8_size(m["content"], "messages") for m in messages), limits)
    try:
        tokens = cluster.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as exc:  # jinja raises its own errors for unsupported conversations
        raise ApiError(
            400, f"the chat template rejected the messages: {exc}", param="messages"
        ) from exc
    return settle(request, list(tokens), cluster, limits)


def settle_completion(
    request: CompletionRequest, cluster: ServedModel, limits: LimitsConfig
) -> Prepared:
    """The prompt as given (token ids) or encoded (text), then `settle`."""
    prompt = request.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], int):
        return settle(request, [int(t) for t in prompt], cluster, limits)
    text = prompt if isinstance(prompt, str) else str(prompt[0])
    _check_prompt_bytes(_utf8_size(text, "prompt"), limits)
    return settle(request, list(cluster.tokenizer.encode(text)), cluster, limits)


def settle_generate(
    request: GenerateRequest, cluster: ServedModel, limits: LimitsConfig
) -> Prepared:
    """The prompt encoded (as one chat message with `chat`), then `settle`."""
    _check_prompt_bytes(_utf8_size(request.prompt, "prompt"), limits)
    tokens = cluster.encode(request.prompt, chat=request.chat)
    return settle(request, tokens, cluster, limits)


def settle(
    request: _Request, tokens: list[int], cluster: ServedModel, limits: LimitsConfig
) -> Prepared:
    """Check the prompt against the limits and the context window; settle max_tokens."""
    context = cluster.context_length
    limit = min(limits.max_prompt_tokens or context, context - 1)
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
    max_tokens = _max_tokens(request, len(tokens), context, limits)
    # generate_text runs the same checks; running them here makes a bad id a 400
    # naming its field, before a stream starts.
    try:
        params = request.sampling(max_tokens)
        check_request(tokens, params, cluster.vocab_size)
    except InvalidParam as exc:
        raise ApiError(400, str(exc), param=exc.param) from exc
    return Prepared(tokens, params)


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


def _check_prompt_bytes(size: int, limits: LimitsConfig) -> None:
    if size > limits.max_prompt_bytes:
        raise ApiError(
            413,
            f"the prompt is {size} bytes, the limit is {limits.max_prompt_bytes} bytes",
            param="prompt",
            code="prompt_too_large",
        )


def _utf8_size(text: str, param: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param} is not valid Unicode: {exc.reason}", param=param) from exc
