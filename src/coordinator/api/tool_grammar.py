"""The grammar of a forced tool call: `tool_choice` "required" or a named function.

The model writes its calls in its family's format; the grammar accepts exactly one
call of an offered function (or of the named one), with arguments that validate
against the function's parameters, and then the end of the reply. It is enforced
token by token like a response_format (contract/grammar.py), so the reply always
parses into a call.

Families whose calls are one JSON object between markers (mlx-lm's json_tools
parser: Hermes, Qwen 2.5 and many others) are supported; a forced call on another
family is a 400 that names it.
"""

from __future__ import annotations

import json
from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_cluster.contract.grammar import Constraint

# The parser module whose calls are `<start> {"name": ..., "arguments": {...}} <end>`.
JSON_CALLS = "mlx_lm.tool_parsers.json_tools"


def call_format(tokenizer: TokenizerWrapper) -> str:
    """The module of the parser that reads the model's calls ("" if none)."""
    parser = getattr(tokenizer, "_tool_parser", None)
    return getattr(parser, "__module__", "") or ""


def forced_call(
    tokenizer: TokenizerWrapper, tools: list[dict[str, Any]], name: str | None
) -> Constraint:
    """A grammar for one call of `name` (None: of any of `tools`), then the end.

    Raises:
        ValueError: the model's call format has no grammar here, or `name` is not offered.
    """
    family = call_format(tokenizer)
    if family != JSON_CALLS:
        raise ValueError(
            f"forcing a call is supported for models whose calls are JSON between "
            f"markers (mlx-lm's json_tools parser), not {family or 'this model'}'s"
        )
    functions = [tool["function"] for tool in tools]
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise ValueError(f"function {name!r} is not among the tools")
    call = {"oneOf": [_call_schema(f) for f in functions]}
    start = _marker(tokenizer.tool_call_start, tokenizer.tool_call_start_tokens)
    end = _marker(tokenizer.tool_call_end, tokenizer.tool_call_end_tokens)
    grammar = f"start: {start} NL? call NL? {end}\nNL: /\\n/\ncall: %json {json.dumps(call)}\n"
    return Constraint.lark(grammar)


def _marker(text: str, ids: tuple[int, ...] | None) -> str:
    """A call marker in the grammar: its token where it is one (an added token, which
    the engine does not read as text), else its text."""
    return f"<[{ids[0]}]>" if ids and len(ids) == 1 else json.dumps(text)


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            "arguments": function.get("parameters") or {"type": "object"},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
