"""Tools offered to the model and the calls it makes, shared by the three APIs.

Requests give tools in OpenAI's shape (Anthropic's and Ollama's are turned into
it); the chat template renders them; the tool parser mlx-lm picks for the model's
family (TokenizerWrapper.tool_parser) reads the calls back from the generated
text. `tool_choice` "required" or a named function is enforced by a grammar of
the call (tool_grammar.py, `forced_call`); so are strict schemas then. A strict
tool the model may or may not call, and "one call at most", are refused.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mlx_lm.tokenizer_utils import TokenizerWrapper
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mlx_cluster.contract.errors import InvalidParam
from mlx_cluster.contract.grammar import Constraint
from mlx_cluster.coordinator.api import tool_grammar
from mlx_cluster.coordinator.api.chat_template import require_tools
from mlx_cluster.coordinator.api.errors import ApiError
from mlx_cluster.coordinator.api.response_format import checked

FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\-]{1,64}$")]


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of an object
    strict: bool | None = None  # exact schema adherence: needs constrained decoding

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None and schema.get("type", "object") != "object":
            raise ValueError(f"parameters must describe an object, got type {schema['type']!r}")
        return schema


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def unique_names(tools: list[FunctionTool] | None) -> list[FunctionTool] | None:
    """Raises: ValueError when two tools share a name (a field validator's check)."""
    names = [tool.function.name for tool in tools or []]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"tool names must be unique, {twice} appear more than once")
    return tools


class CalledFunction(BaseModel):
    """A call of the conversation's history: arguments as JSON text (OpenAI's) or as an
    object (Ollama's, Anthropic's input)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str | dict[str, Any]

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str | dict[str, Any]) -> str | dict[str, Any]:
        _as_object(arguments)
        return arguments

    def for_template(self) -> dict[str, Any]:
        # Templates index into the arguments (mlx-lm's server hands them an object too).
        return {"name": self.name, "arguments": _as_object(self.arguments)}


def _as_object(arguments: object) -> dict[str, Any]:
    """`arguments` as a JSON object: itself, or parsed from JSON text.

    Raises:
        ValueError: neither an object nor the JSON text of one.
    """
    value = arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"arguments must be a JSON object, got {type(value).__name__}")
    return value


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction

    def for_template(self) -> dict[str, Any]:
        call: dict[str, Any] = {"type": "function", "function": self.function.for_template()}
        return call if self.id is None else {"id": self.id, **call}


# --- settling ----------------------------------------------------------------------------


def unenforceable(param: str, what: str) -> ApiError:
    """The 400 for `what` only constrained decoding can enforce."""
    message = f"{param}: {what} is not supported yet: it needs constrained decoding"
    return ApiError(400, message, param=param)


def forced_call(
    tokenizer: TokenizerWrapper, tools: list[dict[str, Any]] | None, choice: ToolChoice | None
) -> Constraint | None:
    """The grammar that makes the reply one call (tool_choice "required", or of a named
    function); None when the model may choose.

    Raises:
        ApiError: 400 naming tool_choice when the call cannot be forced on this model.
    """
    if tools is None or choice in (None, "auto", "none"):
        return None
    name = None if choice == "required" else choice.function.name  # type: ignore[union-attr]
    try:
        return checked(tool_grammar.forced_call(tokenizer, tools, name), "tool_choice")
    except (ValueError, InvalidParam) as exc:
        raise ApiError(400, f"tool_choice: {exc}", param="tool_choice") from exc


def offered_tools(
    tokenizer: TokenizerWrapper, tools: list[FunctionTool] | None, choice: ToolChoice | None
) -> list[dict[str, Any]] | None:
    """The tools the chat template renders and the parser is told; None when no tools
    are offered (none given, or tool_choice "none": then calls are not parsed either).

    Raises:
        ApiError: 400 for tools the model cannot take, a choice that needs tools or
            constrained decoding, or a strict tool.
    """
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    for index, tool in enumerate(tools):  # a forced call's grammar holds strict schemas
        if tool.function.strict and choice in (None, "auto"):
            raise unenforceable(
                f"tools.{index}.function.strict", "a strict tool the model may not call"
            )
    require_tools(tokenizer)
    return [tool.model_dump(exclude_none=True) for tool in tools]


# --- calls the model made ----------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """A call the model made."""

    id: str
    name: str
    arguments: dict[str, Any]
    index: int = 0  # its place among the reply's calls

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def new_call_id(prefix: str = "call_") -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def parse_calls(
    tokenizer: TokenizerWrapper, text: str, tools: list[dict[str, Any]], id_prefix: str
) -> list[ToolCall] | None:
    """The calls in one tool-call span of the generated text (its markers stripped),
    read by mlx-lm's parser for the model's family; None when it does not parse."""
    try:
        parsed = tokenizer.tool_parser(text, tools)
    # The parsers raise these on text they cannot read (a call cut off by max_tokens).
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    calls = []
    for call in parsed if isinstance(parsed, list) else [parsed]:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        try:
            arguments = _as_object(call.get("arguments") or {})
        except ValueError:
            return None
        calls.append(ToolCall(call.get("id") or new_call_id(id_prefix), call["name"], arguments))
    return calls
