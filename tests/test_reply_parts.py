"""The split of a reply into reasoning, content and tool calls, with the trained models'
real tokenizers (their markers, mlx-lm's parser): however the text is cut into chunks,
the parts are the same, and text that is not a parsed call stays as the model wrote it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

from mlx_cluster.coordinator.api.reply_parts import (
    Content,
    Part,
    Reasoning,
    Reply,
    ReplyFormat,
    ReplySplitter,
    merged,
)
from mlx_cluster.coordinator.api.tools import ToolCall
from mlx_cluster.coordinator.engine.generation import TextChunk
from tests.trained_models import CALL_ARGUMENTS, CALL_TEXT, WEATHER_TOOL

TOOLS = [WEATHER_TOOL]


@pytest.fixture(scope="module")
def tool_tokenizer(tool_model: Path) -> TokenizerWrapper:
    return load_tokenizer(tool_model)


@pytest.fixture(scope="module")
def think_tokenizer(thinking_model: Path) -> TokenizerWrapper:
    return load_tokenizer(thinking_model)


def split(tokenizer: TokenizerWrapper, text: str, step: int, **reply: Any) -> list[Any]:
    """The parts of `text` fed `step` characters at a time (neighbours of a kind joined,
    calls as ("call", name, arguments))."""
    splitter = ReplySplitter(tokenizer, ReplyFormat(**reply))
    pieces = [text[i : i + step] for i in range(0, len(text), step)] or [""]
    parts: list[Part] = merged(
        p for i, piece in enumerate(pieces) for p in splitter.feed(piece, i == len(pieces) - 1)
    )
    return [("call", p.name, p.arguments) if isinstance(p, ToolCall) else p for p in parts]


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_parts_do_not_depend_on_how_the_text_is_cut(tool_tokenizer, think_tokenizer, step):
    text = f"Let me look.\n{CALL_TEXT}\n{CALL_TEXT}"
    call = ("call", "get_weather", CALL_ARGUMENTS)
    assert split(tool_tokenizer, text, step, tools=TOOLS) == [
        Content("Let me look.\n"), call, Content("\n"), call
    ]  # fmt: skip
    thought = "<think>a < b</think>so a"
    assert split(think_tokenizer, thought, step) == [Reasoning("a < b"), Content("so a")]


def test_a_reply_that_starts_inside_a_think_block(think_tokenizer):
    hi = [{"role": "user", "content": "hi"}]
    opened = think_tokenizer.apply_chat_template(hi, add_generation_prompt=True)
    opened += [think_tokenizer.convert_tokens_to_ids("<think>")]  # as DeepSeek-R1's template
    assert ReplyFormat.of_prompt(think_tokenizer, opened, None).reasoning_first
    closed = think_tokenizer.apply_chat_template(
        hi, add_generation_prompt=True, enable_thinking=False
    )
    assert not ReplyFormat.of_prompt(think_tokenizer, closed, None).reasoning_first
    parts = split(think_tokenizer, "hmm</think>Hi", 3, reasoning_first=True)
    assert parts == [Reasoning("hmm"), Content("Hi")]


@pytest.mark.parametrize(
    "text, tools",
    [
        (CALL_TEXT, None),  # no tools offered: nothing is parsed
        ("<tool_call>\n{not json}\n</tool_call>", TOOLS),  # does not parse
        ('<tool_call>\n{"name": "get_weather", "argu', TOOLS),  # cut off by max_tokens
        ('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', TOOLS),  # not an object
    ],
)
def test_text_that_is_not_a_parsed_call_stays_as_written(tool_tokenizer, text, tools):
    assert split(tool_tokenizer, text, 4, tools=tools) == [Content(text)]


def test_a_whole_reply_and_its_finish_reason(tool_tokenizer):
    splitter = ReplySplitter(tool_tokenizer, ReplyFormat(TOOLS), id_prefix="toolu_")
    chunks = [TextChunk(CALL_TEXT[:9]), TextChunk(CALL_TEXT[9:] + CALL_TEXT, finish_reason="stop")]
    reply = Reply.of(splitter, chunks)
    assert reply.content == "" and reply.reasoning == ""
    assert [(c.index, c.name, c.arguments) for c in reply.calls] == [
        (0, "get_weather", CALL_ARGUMENTS), (1, "get_weather", CALL_ARGUMENTS)
    ]  # fmt: skip
    assert all(c.id.startswith("toolu_") for c in reply.calls)
    assert splitter.finish_reason(chunks[-1]) == "tool_calls"
    assert splitter.finish_reason(TextChunk("", finish_reason="length")) == "length"
