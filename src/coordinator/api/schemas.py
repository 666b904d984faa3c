"""Request bodies of the HTTP API, validated once, turned into SamplingParams.

Field names and defaults follow OpenAI's API. Fields OpenAI clients send that
change nothing here (user, metadata, ...) are accepted and ignored; tools,
tool_choice and the chat template's options are checked against what the model
can do when the request settles (tools.py, chat_template.py); response_format is
enforced (response_format.py).
"""

from __future__ import annotations

import dataclasses
from contextvars import ContextVar
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mlx_cluster.contract.grammar import Constraint
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.contract.speculation import MAX_DRAFT_TOKENS, Speculation, SpeculativeMethod
from mlx_cluster.coordinator.api.response_format import ResponseFormat, checked
from mlx_cluster.coordinator.api.tools import FunctionTool, ToolCallIn, ToolChoice, unique_names

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Field(ge=1)]

# The app's limits.max_messages, set for each request by middleware.RequestLimits. It is
# checked before the messages are validated one by one (100,000 of them take 0.25 s).
max_messages: ContextVar[int | None] = ContextVar("max_messages", default=None)


class SpeculativeRequest(BaseModel):
    """Extension: how one request drafts tokens; a field left out keeps the server's."""

    model_config = ConfigDict(extra="forbid")

    method: SpeculativeMethod | None = None
    # strict: "4" is refused rather than read as 4
    num_draft_tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_DRAFT_TOKENS)] | None = None

    def resolve(self, default: Speculation) -> Speculation:
        """This request's drafting: its own fields over the server's `default`."""
        return dataclasses.replace(default, **self.model_dump(exclude_none=True))


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # any value is accepted; the cluster serves one model
    max_tokens: MaxTokens | None = None  # new tokens at most; default from the limits
    temperature: Temperature = 1.0  # 0 = greedy
    top_p: TopP = 1.0
    top_k: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0  # extension: 0 = off
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # extension: 0 = off
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10.0)] = 1.0  # extension
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1)] = 1  # choices of the prompt (at most limits.max_choices)
    stream: bool = False
    speculative: SpeculativeRequest | None = None  # extension: None = the server's default
    response_format: ResponseFormat | None = None  # structured output; None = free text

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 16 or not all(stops):
            raise ValueError("stop must be a non-empty string or a list of up to 16 of them")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"logit_bias keys must be token ids, got {key[:20]!r}")
        return bias

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def top_logprobs_wanted(self) -> int:
        return 0

    def constraint(self) -> Constraint | None:
        """The grammar this request's text must follow, checked; None for free text.

        The one place a request's constraint comes from: response_format here, and
        whatever else may force the text's shape (a tool call) by overriding this.

        Raises:
            InvalidParam: naming response_format and what the engine cannot enforce.
        """
        made = self.response_format.constraint() if self.response_format else None
        return checked(made, "response_format")

    def sampling(
        self, max_tokens: int, default_speculation: Speculation | None = None
    ) -> SamplingParams:
        """SamplingParams for this request with max_tokens already settled.

        Args:
            default_speculation: the server's drafting, which fills the fields a partial
                `speculative` leaves out (contract.speculation's defaults when None).

        Raises:
            InvalidParam: a value out of range, or a constraint the grammar engine
                refuses, naming its field.
        """
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        speculative = None
        if self.speculative is not None:
            speculative = self.speculative.resolve(default_speculation or Speculation())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            seed=self.seed,
            stop=tuple(stop),
            top_logprobs=self.top_logprobs_wanted(),
            speculative=speculative,
            constraint=self.constraint(),
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    reasoning_content: str | None = None  # an assistant's reasoning, for templates that show it

    @model_validator(mode="after")
    def _calls_are_the_assistants(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages make tool calls, not {self.role}")
        return self

    def strings(self) -> list[str]:
        """Every string of the message (role, name, content or each part's type and
        text, calls, reasoning): what its size counts against the prompt limit."""
        if isinstance(self.content, list):
            parts = [s for part in self.content for s in (part.type, part.text or "")]
        else:
            parts = [self.content or ""]
        calls = [c.model_dump_json() for c in self.tool_calls or []]
        extra = [self.tool_call_id or "", self.reasoning_content or "", *calls]
        return [self.role, self.name or "", *parts, *extra]

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"content parts of type {part.type!r} are not supported")
        return "".join(part.text or "" for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (calls' arguments as objects)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        return message


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None  # OpenAI's newer name for max_tokens
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[FunctionTool] | None = None  # rendered by the chat template
    tool_choice: ToolChoice | None = None  # None: auto when tools are given
    parallel_tool_calls: bool | None = None  # False needs constrained decoding: refused
    chat_template_kwargs: dict[str, Any] | None = None  # variables the template reads
    reasoning_effort: ReasoningEffort | None = None  # for templates that read it

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[FunctionTool] | None) -> list[FunctionTool] | None:
        return unique_names(tools)

    @field_validator("parallel_tool_calls")
    @classmethod
    def _one_call_at_most(cls, parallel: bool | None, info: ValidationInfo) -> bool | None:
        forced = info.data.get("tool_choice") not in (None, "auto", "none")  # one call
        if parallel is False and not forced:
            raise ValueError(
                "false is supported with a forced call (tool_choice required or a named "
                "function) only"
            )
        return parallel

    @field_validator("messages", mode="before")
    @classmethod
    def _message_count(cls, messages: Any) -> Any:
        limit = max_messages.get()
        if limit is not None and isinstance(messages, list) and len(messages) > limit:
            raise ValueError(f"{len(messages)} messages, at most {limit} are allowed")
        return messages

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_wanted(self) -> int:
        return max(self.top_logprobs or 0, 1) if self.logprobs else 0

    def chat_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) and len(prompt) != 1:
            raise ValueError(f"exactly one prompt is supported, got {len(prompt)}")
        if not prompt:
            raise ValueError("prompt must not be empty")
        return prompt

    def top_logprobs_wanted(self) -> int:
        return max(self.logprobs, 1) if self.logprobs is not None else 0


class GenerateRequest(_Request):
    """`POST /generate`: a prompt in, text and timings out."""

    prompt: Annotated[str, Field(min_length=1)]
    temperature: Temperature = 0.0  # greedy unless asked otherwise
    chat: bool = False  # render the prompt as one user message with the chat template
