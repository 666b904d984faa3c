"""Anthropic's Messages request, turned into the chat completion the API settles.

`system` and the messages become the chat's messages: text blocks their content,
`tool_use` blocks an assistant's tool calls, `tool_result` blocks tool messages,
`thinking` blocks an assistant's reasoning. `tools` and `tool_choice` become
OpenAI's (tools.py); `thinking` turns the template's thinking on or off
(chat_template.thinking_options; `budget_tokens` is not enforced: max_tokens
bounds the whole reply). `max_tokens` (required, as Anthropic's API has it),
`stop_sequences`, `temperature` (0 to 1), `top_p` and `top_k` the sampling. Other
content blocks, server tools, `disable_parallel_tool_use` and `output_config` are
not supported yet: a 400 names them, never a silent ignore. Fields about
Anthropic's own service (`metadata`, `service_tier`, `cache_control`: prompts are
cached here anyway, `speed`, `inference_geo`, ...) change nothing and are accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mlx_cluster.coordinator.api.errors import ApiError
from mlx_cluster.coordinator.api.schemas import ChatCompletionRequest, ContentPart
from mlx_cluster.coordinator.api.tools import FunctionName, unenforceable

TOOL_ID_PREFIX = "toolu_"


class AnthropicBlock(ContentPart):
    """A content block; its `type` decides which fields it holds (checked by _Turns)."""

    id: str | None = None  # tool_use
    name: str | None = None  # tool_use
    input: dict[str, Any] | None = None  # tool_use
    tool_use_id: str | None = None  # tool_result
    content: str | list[ContentPart] | None = None  # tool_result
    is_error: bool = False  # tool_result
    thinking: str | None = None  # thinking
    signature: str | None = None  # thinking: Anthropic's check of it, not needed here


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str | list[AnthropicBlock]


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None  # server tools (web search, ...) are not supported
    cache_control: dict[str, Any] | None = None
    strict: bool | None = None

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.input_schema}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


class AnthropicToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # type "tool": the tool to call
    disable_parallel_tool_use: bool | None = None

    def as_openai(self) -> str | dict[str, Any]:
        if self.disable_parallel_tool_use and self.type not in ("any", "tool"):  # forced: one
            raise unenforceable("tool_choice.disable_parallel_tool_use", "one call at most")
        if self.type == "tool":
            return {"type": "function", "function": {"name": self.name or ""}}
        return {"auto": "auto", "none": "none", "any": "required"}[self.type]


class ThinkingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Annotated[int, Field(ge=1)] | None = None  # not enforced


def _unsupported(where: str, kind: str) -> ApiError:
    return ApiError(
        400,
        f"{where}.type: content blocks of type {kind!r} are not supported yet "
        "(text, tool_use, tool_result and thinking are)",
        param=f"{where}.type",
    )


def _text(content: str | list[ContentPart] | None, where: str) -> str:
    """The text of `content`; a block of another type is a 400 naming it."""
    if content is None or isinstance(content, str):
        return content or ""
    for index, block in enumerate(content):
        if block.type != "text":
            raise _unsupported(f"{where}.{index}", block.type)
    return "".join(block.text or "" for block in content)


def _missing(where: str, field: str) -> ApiError:
    return ApiError(400, f"{where}.{field}: field required", param=f"{where}.{field}")


class _Turns:
    """The chat messages of Anthropic's messages, built block by block."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def add(self, message: AnthropicMessage, where: str) -> None:
        if isinstance(message.content, str):
            self.messages.append({"role": message.role, "content": message.content})
        elif message.role == "assistant":
            self._assistant(message.content, where)
        else:
            self._user(message.content, where)

    def _assistant(self, blocks: list[AnthropicBlock], where: str) -> None:
        text, reasoning, calls = [], [], []
        for index, block in enumerate(blocks):
            at = f"{where}.{index}"
            if block.type == "text":
                text.append(block.text or "")
            elif block.type == "thinking":
                reasoning.append(block.thinking or "")
            elif block.type == "tool_use":
                for field in ("id", "name", "input"):
                    if getattr(block, field) is None:
                        raise _missing(at, field)
                function = {"name": block.name, "arguments": block.input}
                calls.append({"id": block.id, "type": "function", "function": function})
            else:
                raise _unsupported(at, block.type)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = calls
        self.messages.append(message)

    def _user(self, blocks: list[AnthropicBlock], where: str) -> None:
        text: list[str] = []
        for index, block in enumerate(blocks):
            at = f"{where}.{index}"
            if block.type == "text":
                text.append(block.text or "")
                continue
            if block.type != "tool_result":
                raise _unsupported(at, block.type)
            if block.tool_use_id is None:
                raise _missing(at, "tool_use_id")
            self._flush(text)
            result = _text(block.content, f"{at}.content")
            # Templates have no place for a failed call: the model reads it in the result.
            result = f"Error: {result}" if block.is_error else result
            self.messages.append(
                {"role": "tool", "tool_call_id": block.tool_use_id, "content": result}
            )
        self._flush(text)

    def _flush(self, text: list[str]) -> None:
        if text:
            self.messages.append({"role": "user", "content": "".join(text)})
            text.clear()


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
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: dict[str, Any] | None = None  # structured output, effort

    def thinking_wanted(self) -> bool | None:
        """Whether the request turns thinking on (True) or off (False); None: the
        model's default ("adaptive" too: the model decides)."""
        if self.thinking is None or self.thinking.type == "adaptive":
            return None
        return self.thinking.type == "enabled"

    def _tools(self) -> list[dict[str, Any]] | None:
        forced = self.tool_choice is not None and self.tool_choice.type in ("any", "tool")
        for index, tool in enumerate(self.tools or []):
            if tool.strict and not forced:  # a forced call's grammar holds strict schemas
                raise unenforceable(f"tools.{index}.strict", "a strict tool the model may not call")
        return [tool.as_openai() for tool in self.tools] if self.tools else None

    def as_chat(self, template_options: dict[str, Any] | None = None) -> ChatCompletionRequest:
        """The chat completion of this request; `template_options` are the chat
        template's variables its `thinking` sets."""
        if self.output_config:
            raise ApiError(400, "output_config is not supported yet", param="output_config")
        system = [] if self.system is None else [_text(self.system, "system")]
        turns = _Turns()
        turns.messages += [{"role": "system", "content": text} for text in system if text]
        for index, message in enumerate(self.messages):
            turns.add(message, f"messages.{index}.content")
        fields: dict[str, Any] = {
            "model": self.model,
            "messages": turns.messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": self.stream,
            "stop": self.stop_sequences or None,
            "tools": self._tools(),
            "tool_choice": self.tool_choice.as_openai() if self.tool_choice else None,
            "chat_template_kwargs": template_options or None,
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
            loc = [str(part) for part in first.get("loc", ("",))]
            name = {"stop": "stop_sequences"}.get(loc[0], ".".join(loc))
            raise ApiError(400, f"{name}: {first.get('msg', exc)}", param=name or None) from exc
