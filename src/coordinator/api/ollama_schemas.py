"""Ollama's request bodies, turned into the OpenAI-shaped requests the API settles.

`/api/chat` becomes a chat completion (its `tools`, and messages' `tool_calls`,
`tool_name` and `thinking` too), `/api/generate` a chat completion of one user
message (and the `system` one) or, with `raw`, a completion of the prompt as it
is. `think` turns the template's thinking on or off, or sets its effort
(chat_template.thinking_options). Ollama's `options` map onto the same sampling
fields; options that only tune Ollama's own runtime (threads, GPU layers, memory
mapping, the context it allocates) change nothing here and are accepted; any
other option, and the fields not supported yet (`images`, `suffix`, `template`,
`context`), are refused with a 400 naming them, never ignored. `format` ("json"
or a JSON schema) becomes a response_format.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mlx_cluster.contract.errors import InvalidParam
from mlx_cluster.coordinator.api.errors import ApiError
from mlx_cluster.coordinator.api.response_format import ollama_format
from mlx_cluster.coordinator.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    _Request,
)

DEFAULT_TEMPERATURE = 0.8  # Ollama's, where a request gives none

# Ollama option -> our request field.
SAMPLING_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
# Options of Ollama's runtime, not of the text: they change nothing here.
RUNTIME_OPTIONS = frozenset(
    {
        "num_ctx",
        "num_keep",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "use_mmap",
        "use_mlock",
        "low_vram",
        "numa",
        "f16_kv",
        "vocab_only",
    }
)


class OllamaFunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = None  # its place among the message's calls


class OllamaToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    function: OllamaFunctionCall


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None  # a tool message: the tool that answered
    thinking: str | None = None

    def as_chat(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "function": call.function.model_dump(exclude={"index"})}
                for call in self.tool_calls
            ]
        if self.tool_name is not None:
            message["name"] = self.tool_name
        if self.thinking is not None:
            message["reasoning_content"] = self.thinking
        return message


class _OllamaRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    stream: bool = True
    options: dict[str, Any] | None = None
    format: Any = None
    keep_alive: Any = None  # how long Ollama keeps a model loaded: the cluster always does
    think: bool | Literal["low", "medium", "high"] | None = None

    def _refuse(self, unsupported: dict[str, Any]) -> None:
        """400 for the first field given that this API does not support yet."""
        for name, value in unsupported.items():
            if value not in (None, False, "", []):
                raise ApiError(400, f"{name} is not supported yet", param=name)

    def _fields(self, template_options: dict[str, Any] | None) -> dict[str, Any]:
        """Our request fields for `options`, `stream`, `model`, `format` and the chat
        template's variables `think` sets."""
        fields: dict[str, Any] = {
            "model": self.model,
            "stream": self.stream,
            "temperature": DEFAULT_TEMPERATURE,
        }
        try:
            fields["response_format"] = ollama_format(self.format)
        except InvalidParam as exc:
            raise ApiError(400, str(exc), param=exc.param) from exc
        if template_options:
            fields["chat_template_kwargs"] = template_options
        for name, value in (self.options or {}).items():
            if name in SAMPLING_OPTIONS:
                fields[SAMPLING_OPTIONS[name]] = value
            elif name == "num_predict":
                if value is not None and value >= 0:  # -1: no limit, -2: fill the context
                    fields["max_tokens"] = value
            elif name not in RUNTIME_OPTIONS:
                raise ApiError(400, f"option {name!r} is not supported", param=f"options.{name}")
        return fields


def _validated(cls: type[_Request], fields: dict[str, Any]) -> Any:
    """`cls` from `fields`; a value out of range is a 400 naming Ollama's option."""
    try:
        return cls.model_validate(fields)
    except ValueError as exc:
        errors: list[Any] = list(getattr(exc, "errors", lambda: [])())
        first: dict[str, Any] = dict(errors[0]) if errors else {}
        loc = [str(part) for part in first.get("loc", ("",))]
        ours = {v: k for k, v in SAMPLING_OPTIONS.items()} | {"max_tokens": "num_predict"}
        param = f"options.{ours[loc[0]]}" if loc[0] in ours else ".".join(loc) or None
        raise ApiError(400, f"{param}: {first.get('msg', exc)}", param=param) from exc


class OllamaChatRequest(_OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None  # OpenAI's shape, checked as OpenAI's

    def as_chat(self, template_options: dict[str, Any] | None = None) -> ChatCompletionRequest:
        """The chat completion of this request; `template_options` are the chat
        template's variables its `think` sets."""
        for message in self.messages:
            self._refuse({"images": message.images})
        if not self.messages:
            raise ApiError(400, "messages must hold at least one message", param="messages")
        fields = self._fields(template_options)
        fields |= {"messages": [m.as_chat() for m in self.messages], "tools": self.tools}
        return _validated(ChatCompletionRequest, fields)


class OllamaGenerateRequest(_OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None

    def as_request(
        self, template_options: dict[str, Any] | None = None
    ) -> ChatCompletionRequest | CompletionRequest:
        """A completion of the prompt as it is (`raw`), else a chat of its messages;
        `template_options` are the chat template's variables its `think` sets."""
        unsupported = {
            "suffix": self.suffix,
            "template": self.template,
            "context": self.context,
            "images": self.images,
        }
        self._refuse(unsupported)
        if not self.prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        if self.raw:
            if self.think is not None:
                raise ApiError(400, "think needs the chat template, not raw", param="think")
            return _validated(CompletionRequest, {**self._fields(None), "prompt": self.prompt})
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = [*system, {"role": "user", "content": self.prompt}]
        fields = {**self._fields(template_options), "messages": messages}
        return _validated(ChatCompletionRequest, fields)
