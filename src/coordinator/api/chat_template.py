"""What the served model's chat template can do, and the options one request gives it.

The template's own variables decide: it renders tools when it reads `tools` (and
mlx-lm has a parser for its family's calls), it takes `reasoning_effort` or any
`chat_template_kwargs` key only when it reads that variable. An option the template
would not read is a 400 naming it, never a silent ignore. A template rendered by
Python (mlx-lm's chat_templates) cannot be read: it is given every option.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2
from jinja2 import meta
from mlx_lm.tokenizer_utils import TokenizerWrapper

try:  # the environment transformers renders templates with (its extensions and tags)
    from transformers.utils.chat_template_utils import _compile_jinja_template
except ImportError:  # a transformers without it: a plain environment reads most templates
    _compile_jinja_template = None  # type: ignore[assignment]

from mlx_cluster.coordinator.api.errors import ApiError

# apply_chat_template's own arguments: a request sets them through its other fields.
RESERVED = frozenset(
    {"messages", "conversation", "tools", "documents", "add_generation_prompt", "tokenize"}
)
THINKING_SWITCH = "enable_thinking"  # TokenizerWrapper renames it for Python renderers
EFFORT = "reasoning_effort"


@functools.cache
def template_variables(tokenizer: TokenizerWrapper) -> frozenset[str] | None:
    """The variables the chat template reads (all of its named templates together);
    None when it cannot be read (no Jinja template, or one Jinja cannot parse)."""
    template = getattr(tokenizer, "chat_template", None)
    sources = list(template.values()) if isinstance(template, dict) else [template]
    if not sources or not all(isinstance(s, str) for s in sources):
        return None
    names: set[str] = set()
    for source in sources:
        environment = (
            _compile_jinja_template(source).environment
            if _compile_jinja_template is not None
            else jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
        )
        try:
            names |= meta.find_undeclared_variables(environment.parse(source))
        except jinja2.TemplateSyntaxError:
            return None
    return frozenset(names)


def _reads(tokenizer: TokenizerWrapper, variable: str) -> bool:
    variables = template_variables(tokenizer)
    return variables is None or variable in variables


def supports_tools(tokenizer: TokenizerWrapper) -> bool:
    """Whether the template renders tools and mlx-lm can parse the model's calls."""
    return _reads(tokenizer, "tools") and tokenizer.has_tool_calling


def capabilities(tokenizer: TokenizerWrapper) -> dict[str, bool]:
    """What /v1/models reports the model can do."""
    return {
        "tools": supports_tools(tokenizer),
        "reasoning": tokenizer.has_thinking,
        "structured_output": True,  # response_format, for any tokenizer (contract/grammar.py)
    }


def require_tools(tokenizer: TokenizerWrapper, param: str = "tools") -> None:
    """Raises: ApiError 400 naming `param` when the model cannot take tools."""
    if supports_tools(tokenizer):
        return
    why = (
        "mlx-lm has no parser for its tool calls"
        if _reads(tokenizer, "tools")
        else "its chat template does not render tools"
    )
    raise ApiError(400, f"{param}: the served model does not support tools: {why}", param=param)


def template_options(
    tokenizer: TokenizerWrapper, kwargs: dict[str, Any] | None, effort: str | None
) -> dict[str, Any]:
    """The extra variables of one request's template: its `chat_template_kwargs` and
    `reasoning_effort`.

    Raises:
        ApiError: 400 naming the key the template does not read, or one the request
            sets through another field.
    """
    options = dict(kwargs or {})
    for key in options:
        param = f"chat_template_kwargs.{key}"
        if key in RESERVED:
            raise ApiError(400, f"{param}: {key} is set by the request itself", param=param)
        if not _reads(tokenizer, key):
            raise ApiError(
                400, f"{param}: the model's chat template has no variable {key!r}", param=param
            )
    if effort is not None:
        if not _reads(tokenizer, EFFORT):
            raise ApiError(
                400,
                "reasoning_effort: the model's chat template does not take a reasoning effort",
                param="reasoning_effort",
            )
        options[EFFORT] = effort
    return options


def thinking_options(tokenizer: TokenizerWrapper, think: bool | str, param: str) -> dict[str, Any]:
    """The template variables that turn thinking on or off (True, False) or set its
    effort (a string): Anthropic's `thinking`, Ollama's `think`.

    Raises:
        ApiError: 400 naming `param` when the model cannot do what is asked.
    """
    if not tokenizer.has_thinking:
        if think is False:
            return {}
        raise ApiError(400, f"{param}: the served model does not think", param=param)
    if isinstance(think, str):
        if not _reads(tokenizer, EFFORT):
            raise ApiError(
                400, f"{param}: the model's chat template takes no reasoning effort", param=param
            )
        return {EFFORT: think}
    if _reads(tokenizer, THINKING_SWITCH):
        return {THINKING_SWITCH: think}
    if think:
        return {}  # the template always lets the model think
    raise ApiError(400, f"{param}: the model's chat template cannot turn thinking off", param=param)
