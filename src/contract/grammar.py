"""What a request's generated text must match: a grammar, enforced token by token.

A Constraint is a JSON schema, any JSON object, a Lark grammar or a regular
expression. The coordinator checks it once (`check`: a schema feature the engine
cannot enforce is an InvalidParam naming it) and sends it in the session's
sampling spec; the last stage builds a matcher from it (worker/constraint.py)
that masks every step's logits. The engine is llguidance, chosen by measured
per-token cost (benchmarks/RESULTS.md, `python -m benchmarks.grammar`).

Anything that must shape the output goes through here: response_format, Ollama's
`format`, and tool calls forced by tool_choice (a JSON schema of the call, or a
Lark grammar), so there is one implementation of constrained decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

import llguidance

from mlx_cluster.contract.errors import InvalidParam
from mlx_cluster.contract.proto import layer_service_pb2 as pb

GrammarKind = Literal["json_schema", "json_object", "lark", "regex"]
KINDS: tuple[str, ...] = get_args(GrammarKind)

# JSON as json.dumps writes it by default: ", " and ": ", no other whitespace. Free
# whitespace lets a model pad its output with newlines until max_tokens runs out.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
MAX_SOURCE_BYTES = 1 << 20  # a schema or grammar larger than this is refused


@dataclass(frozen=True)
class Constraint:
    """A grammar the generated tokens must follow from position `start` on."""

    kind: GrammarKind
    source: str  # the JSON schema as JSON text, the Lark grammar or the regex; "" for json_object
    start: int = 0  # the first generated token's position: the prompt's length (set per request)

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> Constraint:
        """JSON that validates against `schema`."""
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object."""
        return cls("json_object", "")

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        """Text of a Lark grammar (llguidance's dialect: `start` is the top rule; JSON
        schemas may be embedded as `%json {...}`)."""
        return cls("lark", grammar)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Text that matches `pattern` whole."""
        return cls("regex", pattern)

    def starting_at(self, start: int) -> Constraint:
        """The same grammar, for text generated from position `start` on."""
        return Constraint(self.kind, self.source, start)

    def grammar(self) -> str:
        """The engine's grammar for this constraint (not yet checked; see `check`)."""
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.source)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        schema = self.source if self.kind == "json_schema" else '{"type":"object"}'
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)  # type: ignore[arg-type]

    def check(self, param: str = "response_format") -> None:
        """Refuse a constraint the engine cannot enforce exactly.

        Raises:
            InvalidParam: naming `param`, with the engine's reason: the schema keywords
                it does not implement ('Unimplemented keys: ["uniqueItems"]'), a bad
                type, a dangling $ref, a Lark or regex syntax error.
        """
        if self.kind not in KINDS:
            raise InvalidParam(param, f"{param}: unknown grammar kind {self.kind!r}")
        if len(self.source.encode("utf-8")) > MAX_SOURCE_BYTES:
            raise InvalidParam(
                param,
                f"{param}: the {self.kind} is {len(self.source.encode('utf-8'))} bytes, "
                f"at most {MAX_SOURCE_BYTES} are allowed",
            )
        try:
            grammar = self.grammar()
        except ValueError as exc:  # a schema that is no JSON object
            raise InvalidParam(param, f"{param}: the {self.kind} is not valid: {exc}") from exc
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if failed:
            reason = messages[0].strip() if messages else "rejected by the grammar engine"
            what = "JSON schema" if self.kind == "json_schema" else self.kind
            raise InvalidParam(param, f"{param}: the {what} is not supported: {reason}")

    # --- on the wire ---------------------------------------------------------------

    def to_proto(self, out: pb.GrammarSpec) -> None:
        out.kind, out.source, out.start = self.kind, self.source, self.start

    @classmethod
    def from_proto(cls, spec: pb.GrammarSpec) -> Constraint:
        """Read a message.

        Raises:
            InvalidParam: the kind is none of KINDS.
        """
        if spec.kind not in KINDS:
            raise InvalidParam(
                "grammar", f"unknown grammar kind {spec.kind!r}, expected one of {KINDS}"
            )
        return cls(spec.kind, spec.source, spec.start)  # type: ignore[arg-type]
