"""Structured output: OpenAI's `response_format` and Ollama's `format`, as Constraints.

`{"type": "json_object"}` asks for any JSON object, `{"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}` for JSON that validates against the
schema, `{"type": "text"}` (or nothing) for free text. Either is enforced token
by token on the last stage (contract/grammar.py); `strict` changes nothing here,
since every schema is enforced exactly or refused. A malformed response_format is
a 400 naming the field; a schema using features the engine cannot enforce is a
400 naming them (`Constraint.check`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlx_cluster.contract.errors import InvalidParam
from mlx_cluster.contract.grammar import Constraint


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # OpenAI's rule: a-z, A-Z, 0-9, underscores and dashes, at most 64 characters
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # every schema is enforced exactly, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(
                f"json_schema is only allowed with type 'json_schema', not {self.type!r}"
            )
        return self

    def constraint(self) -> Constraint | None:
        """What the text must follow; None for free text. Not checked yet (see `checked`)."""
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.json_schema is not None else None
        return Constraint.json_object() if schema is None else Constraint.json_schema(schema)


def checked(constraint: Constraint | None, param: str) -> Constraint | None:
    """`constraint`, once the grammar engine accepts it.

    Raises:
        InvalidParam: naming `param` and what the engine cannot enforce.
    """
    if constraint is not None:
        constraint.check(param)
    return constraint


def ollama_format(value: Any) -> ResponseFormat | None:
    """Ollama's `format` ("json", or a JSON schema object) as a response_format.

    Raises:
        InvalidParam: `format` is neither, or its schema is one the engine refuses.
    """
    if value in (None, ""):
        return None
    if value == "json":
        made = ResponseFormat(type="json_object")
    elif isinstance(value, dict):
        made = ResponseFormat(
            type="json_schema", json_schema=JsonSchemaFormat(name="format", schema=value)
        )
    else:
        raise InvalidParam(
            "format", f'format must be "json" or a JSON schema object, got {str(value)[:80]!r}'
        )
    checked(made.constraint(), "format")
    return made
