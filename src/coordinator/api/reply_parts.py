"""A generated reply split into its parts as it streams: reasoning, content, tool calls.

mlx-lm's TextStateMachine, built as its server builds it (make_text_state_machine),
follows the model family's markers (`<think>`...`</think>`, `<tool_call>`...) and
strips them; a tool-call span is parsed when it closes (tools.parse_calls). The
parts never change what the model wrote: a span that is not parsed (no tools were
offered, or it does not parse) goes to the content as written, markers included.
All three APIs render the same parts in their own shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.generate import TextStateMachine, make_text_state_machine
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_cluster.coordinator.api.tools import ToolCall, parse_calls
from mlx_cluster.coordinator.engine.generation import TextChunk

REASONING, TOOL = "reasoning", "tool"  # the machine's states; any other one is content


@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class Content:
    text: str


Part = Reasoning | Content | ToolCall


@dataclass(frozen=True)
class ReplyFormat:
    """How one request's reply splits."""

    tools: list[dict[str, Any]] | None = None  # offered: their calls are parsed; None: none
    reasoning_first: bool = False  # the prompt opened a think block the reply continues

    @classmethod
    def of_prompt(
        cls, tokenizer: TokenizerWrapper, prompt: Sequence[int], tools: list[dict[str, Any]] | None
    ) -> ReplyFormat:
        """The format of a reply to `prompt`: it starts in reasoning when the prompt's
        last think marker opens a block (DeepSeek-R1's templates end with `<think>`)."""
        opened = tokenizer.has_thinking and (
            tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt)
        )
        return cls(tools, opened)


@functools.cache
def _machine(tokenizer: TokenizerWrapper) -> TextStateMachine:
    return make_text_state_machine(tokenizer)


@dataclass
class ReplySplitter:
    """One choice's reply, fed chunk by chunk; each feed returns the parts it completed.

    Args:
        id_prefix: the ids given to calls the parser gives none ("call_", "toolu_").
    """

    tokenizer: TokenizerWrapper
    reply: ReplyFormat
    id_prefix: str = "call_"
    calls: int = field(default=0, init=False)  # tool calls parsed so far
    _span: str | None = field(default=None, init=False)  # the open tool-call span's text
    _state: Any = field(init=False)  # the TextStateMachine's

    def __post_init__(self) -> None:
        start = REASONING if self.reply.reasoning_first else "normal"
        self._state = _machine(self.tokenizer).make_state(start)

    def feed(self, text: str, last: bool = False) -> list[Part]:
        """The parts `text` completes; with `last`, also every part still held back."""
        self._state, segments = TextStateMachine.split(self._state, text)
        if last:
            self._state, held, state = TextStateMachine.flush(self._state)
            segments.append((state, held))
        parts: list[Part] = []
        for state, piece in segments:
            if state == TOOL:
                self._span = (self._span or "") + piece
                continue
            if self._span is not None:
                parts += self._close_span(closed=True)
            if piece:
                parts.append(Reasoning(piece) if state == REASONING else Content(piece))
        if last and self._span is not None:
            parts += self._close_span(closed=False)
        return merged(parts)

    def _close_span(self, closed: bool) -> list[Part]:
        span, self._span = self._span or "", None
        tools = self.reply.tools
        calls = None if tools is None else parse_calls(self.tokenizer, span, tools, self.id_prefix)
        if calls:
            numbered = [dataclasses.replace(c, index=self.calls + i) for i, c in enumerate(calls)]
            self.calls += len(calls)
            return list(numbered)
        end = (self.tokenizer.tool_call_end or "") if closed else ""
        return [Content(f"{self.tokenizer.tool_call_start}{span}{end}")]

    def finish_reason(self, chunk: TextChunk) -> str | None:
        """OpenAI's finish reason: "tool_calls" for a reply that stopped after calls."""
        if chunk.finish_reason == "stop" and self.calls:
            return "tool_calls"
        return chunk.finish_reason


class Splitters:
    """A request's splitters, one per choice, made as its chunks come."""

    def __init__(self, tokenizer: TokenizerWrapper, reply: ReplyFormat, id_prefix: str = "call_"):
        self._make = functools.partial(ReplySplitter, tokenizer, reply, id_prefix)
        self._by_choice: dict[int, ReplySplitter] = {}

    def __getitem__(self, choice: int) -> ReplySplitter:
        if choice not in self._by_choice:
            self._by_choice[choice] = self._make()
        return self._by_choice[choice]


def merged(parts: Iterable[Part]) -> list[Part]:
    """Neighbouring reasoning or content parts joined into one."""
    out: list[Part] = []
    for part in parts:
        last = out[-1] if out else None
        if isinstance(part, Reasoning) and isinstance(last, Reasoning):
            out[-1] = Reasoning(last.text + part.text)
        elif isinstance(part, Content) and isinstance(last, Content):
            out[-1] = Content(last.text + part.text)
        else:
            out.append(part)
    return out


@dataclass(frozen=True)
class Reply:
    """A whole reply's parts, by kind."""

    reasoning: str
    content: str
    calls: list[ToolCall]

    @classmethod
    def of(cls, splitter: ReplySplitter, chunks: Sequence[TextChunk]) -> Reply:
        ends = [i == len(chunks) - 1 for i in range(len(chunks))]
        parts = [p for c, end in zip(chunks, ends, strict=True) for p in splitter.feed(c.text, end)]
        return cls(
            "".join(p.text for p in parts if isinstance(p, Reasoning)),
            "".join(p.text for p in parts if isinstance(p, Content)),
            [p for p in parts if isinstance(p, ToolCall)],
        )
