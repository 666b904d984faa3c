"""Anthropic's Messages request, turned into the chat completion the API settles.

`system` and each message's text blocks become the chat's messages; `max_tokens`
(required, as Anthropic's API has it), `stop_sequences`, `temperature` (0 to 1),
`top_p` and `top_k` the sampling. Content blocks other than text, `tools`,
`tool_choice`, `output_config` and enabled `thinking` are not supported yet: a
400 names them, never a silent ignore. Fields about Anthropic's own service
(`metadata`, `service_tier`, `cache_control`: prompts are cached here anyway,
`speed`, `inference_geo`, ...) change nothing here and are accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mlx_cluster.coordinator.api.errors import ApiError
from mlx_cluster.coordinator.api.schemas import ChatCompletionRequest, ContentPart


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str | list[ContentPart]


def _text(content: str | list[ContentPart], where: str) -> str:
    """The text of `content`; a block of another type is a 400 naming it."""
    if isinstance(content, str):
        return content
    for index, block in enumerate(content):
        if block.type != "text":
            raise ApiError(
                400,
                f"{where}.{index}.type: content blocks of type {block.type!r} are not "
                "supported yet (only text)",
                param=f"{where}.{index}.type",
            )
    return "".join(block.text or "" for block in content)


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)]
    system: str | list[ContentPart] | None = None
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None  # structured output, effort

    def as_chat(self) -> ChatCompletionRequest:
        for name in ("tools", "tool_choice", "output_config"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported yet", param=name)
        if self.thinking and self.thinking.get("type") != "disabled":
            raise ApiError(400, "thinking is not supported yet", param="thinking")
        system = [] if self.system is None else [_text(self.system, "system")]
        messages = [{"role": "system", "content": text} for text in system if text]
        for index, message in enumerate(self.messages):
            text = _text(message.content, f"messages.{index}.content")
            messages.append({"role": message.role, "content": text})
        fields: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": self.stream,
            "stop": self.stop_sequences or None,
        }
        if self.top_p is not None:
            fields["top_p"] = self.top_p
        if self.top_k is not None:
            fields["top_k"] = self.top_k
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValueError as exc:
            errors: list[Any] = list(getattr(exc, "errors", lambda: [])())
            first: dict[str, Any] = dict(errors[0]) if errors else {}
            name = {"stop": "stop_sequences"}.get(str(first.get("loc", ("",))[0]), "")
            raise ApiError(400, f"{name}: {first.get('msg', exc)}", param=name or None) from exc
