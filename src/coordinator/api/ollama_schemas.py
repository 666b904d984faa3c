"""Ollama's request bodies, turned into the OpenAI-shaped requests the API settles.

`/api/chat` becomes a chat completion, `/api/generate` a chat completion of one
user message (and the `system` one) or, with `raw`, a completion of the prompt
as it is. Ollama's `options` map onto the same sampling fields; options that
only tune Ollama's own runtime (threads, GPU layers, memory mapping, the context
it allocates) change nothing here and are accepted; any other option, and the
fields not supported yet (`tools`, `images`, `suffix`, `template`, `context`),
are refused with a 400 naming them, never ignored. `format` ("json" or a JSON
schema) becomes a response_format.
"""

from __future__ import annotations

from typing import Annotated, Any

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


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    thinking: str | None = None


class _OllamaRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    stream: bool = True
    options: dict[str, Any] | None = None
    format: Any = None
    keep_alive: Any = None  # how long Ollama keeps a model loaded: the cluster always does
    think: bool | str | None = None

    def _refuse(self, unsupported: dict[str, Any]) -> None:
        """400 for the first field given that this API does not support yet."""
        for name, value in unsupported.items():
            if value not in (None, False, "", []):
                raise ApiError(400, f"{name} is not supported yet", param=name)

    def _fields(self) -> dict[str, Any]:
        """Our request fields for `options`, `stream` and `model`."""
        self._refuse({"think": self.think})
        fields: dict[str, Any] = {
            "model": self.model,
            "stream": self.stream,
            "temperature": DEFAULT_TEMPERATURE,
        }
        try:
            fields["response_format"] = ollama_format(self.format)
        except InvalidParam as exc:
            raise ApiError(400, str(exc), param=exc.param) from exc
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
        name = str(first.get("loc", ("",))[0])
        ours = {v: k for k, v in SAMPLING_OPTIONS.items()} | {"max_tokens": "num_predict"}
        param = f"options.{ours[name]}" if name in ours else name or None
        raise ApiError(400, f"{param}: {first.get('msg', exc)}", param=param) from exc


class OllamaChatRequest(_OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None

    def as_chat(self) -> ChatCompletionRequest:
        self._refuse({"tools": self.tools})
        for message in self.messages:
            self._refuse({"images": message.images, "tool_calls": message.tool_calls})
        if not self.messages:
            raise ApiError(400, "messages must hold at least one message", param="messages")
        messages = [{"role": m.role, "content": m.content} for m in self.messages]
        return _validated(ChatCompletionRequest, {**self._fields(), "messages": messages})


class OllamaGenerateRequest(_OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None

    def as_request(self) -> ChatCompletionRequest | CompletionRequest:
        """A completion of the prompt as it is (`raw`), else a chat of its messages."""
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
            return _validated(CompletionRequest, {**self._fields(), "prompt": self.prompt})
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = [*system, {"role": "user", "content": self.prompt}]
        return _validated(ChatCompletionRequest, {**self._fields(), "messages": messages})
