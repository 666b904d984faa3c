"""Tool calling through a real cluster (2 gRPC workers, the HTTP app), with the official
openai, anthropic and ollama clients, on a tiny model trained to call a tool
(tests/trained_models.py): the calls are parsed from text the model really generates,
which is the text single-process mlx-lm generates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate

from tests.trained_models import (
    CALL_ARGUMENTS,
    CALL_TEXT,
    NO_TOOLS_ANSWER,
    QUESTION,
    RESULT_ANSWER,
    TOOL_RESULT,
    WEATHER_TOOL,
    WITH_RESULT,
)

MODEL = "tiny"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 64}
OPENAI_HISTORY = [
    *QUESTION,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps(CALL_ARGUMENTS)},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": TOOL_RESULT},
]


def mlx_lm_reply(
    model: Path, messages: list[dict[str, Any]], **template: Any
) -> tuple[str, list[str]]:
    """Single-process mlx-lm's greedy reply to `messages`: its text, and each of its
    tokens' text (the end of turn left out, as the API leaves it out)."""
    weights, tokenizer = mlx_load(str(model))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template)
    pieces = list(stream_generate(weights, tokenizer, prompt, max_tokens=GREEDY["max_tokens"]))
    ids = [p.token for p in pieces if p.token not in tokenizer.eos_token_ids]
    return "".join(p.text for p in pieces), [tokenizer.decode([t]) for t in ids]


@pytest.fixture
async def tools_api(serve_cluster, tool_model):
    url, _ = await serve_cluster(tool_model)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) as client:
        yield url, client


# --- OpenAI ------------------------------------------------------------------------------


async def test_a_tool_call_is_parsed_from_what_mlx_lm_generates(tools_api, tool_model):
    _, client = tools_api
    text, tokens = mlx_lm_reply(tool_model, QUESTION, tools=[WEATHER_TOOL])
    assert text == CALL_TEXT
    reply = await client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], logprobs=True, **GREEDY
    )
    choice = reply.choices[0]
    assert [t.token for t in choice.logprobs.content] == tokens  # the golden rule
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == CALL_ARGUMENTS


async def test_a_streamed_tool_call_comes_as_tool_call_deltas(tools_api):
    _, client = tools_api
    stream = await client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], stream=True, **GREEDY
    )
    calls, content, reasons = [], "", []
    async for chunk in stream:
        delta = chunk.choices[0].delta
        calls += delta.tool_calls or []
        content += delta.content or ""
        reasons.append(chunk.choices[0].finish_reason)
    (call,) = calls
    assert call.index == 0 and call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == CALL_ARGUMENTS
    assert content == "" and reasons[-1] == "tool_calls" and set(reasons[:-1]) == {None}


async def test_a_tool_result_in_the_history_renders_through_the_template(tools_api, tool_model):
    _, client = tools_api
    reply = await client.chat.completions.create(
        model=MODEL, messages=OPENAI_HISTORY, tools=[WEATHER_TOOL], **GREEDY
    )
    choice = reply.choices[0]
    # The model learnt this answer on the conversation as the template renders it: any
    # other rendering of the call or the result would not give it.
    assert choice.message.content == RESULT_ANSWER and choice.message.tool_calls is None
    assert choice.finish_reason == "stop"


async def test_tool_choice_none_offers_no_tools(tools_api, tool_model):
    _, client = tools_api
    text, _ = mlx_lm_reply(tool_model, QUESTION)
    reply = await client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="none", **GREEDY
    )
    message = reply.choices[0].message
    assert message.content == text == NO_TOOLS_ANSWER and message.tool_calls is None


async def test_models_lists_what_the_model_can_do(tools_api, serve_cluster):
    _, client = tools_api
    (model,) = (await client.models.list()).data
    assert model.model_extra["capabilities"] == {
        "tools": True,
        "reasoning": False,
        "structured_output": True,
    }
    assert model.model_extra["context_length"] > 0
    plain_url, _ = await serve_cluster()
    async with httpx.AsyncClient(base_url=plain_url) as http:
        (plain,) = (await http.get("/v1/models")).json()["data"]
    assert plain["capabilities"] == {"tools": False, "reasoning": False, "structured_output": True}


BAD_TOOL_REQUESTS = [
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "not among the tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot both"),
    ({"tool_choice": "sometimes"}, "tool_choice", "invalid value"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls", "forced call"),
    ({"tools": [{**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "strict": True}}]},
     "tools.0.function.strict", "not supported yet"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "invalid value"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]},
     "tools.0.function.name", "required"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name",
     "pattern"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters", "object"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools", "unique"),
    ({"tools": "get_weather"}, "tools", "invalid value"),
    ({"messages": [*OPENAI_HISTORY[:1], {**OPENAI_HISTORY[1], "tool_calls": [{"id": "c", "type":
      "function", "function": {"name": "get_weather", "arguments": "{city"}}]}]},
     "messages.1.tool_calls.0.function.arguments", "JSON object"),
    ({"messages": [{**QUESTION[0], "tool_calls": OPENAI_HISTORY[1]["tool_calls"]}]},
     "messages.0", "only assistant messages"),
    ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs.enable_thinking",
     "no variable"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}},
     "chat_template_kwargs.add_generation_prompt", "set by the request"),
    ({"chat_template_kwargs": [1]}, "chat_template_kwargs", "invalid value"),
    ({"reasoning_effort": "high"}, "reasoning_effort", "reasoning effort"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort", "invalid value"),
]  # fmt: skip


async def test_a_required_call_is_made_where_the_model_would_answer_in_text(tools_api):
    """With the tool's result in the history the model answers in words; "required" makes
    it call instead, and the call parses, names an offered tool and fits its schema."""
    _, client = tools_api
    free = await client.chat.completions.create(
        model=MODEL, messages=WITH_RESULT, tools=[WEATHER_TOOL], **GREEDY
    )
    assert free.choices[0].message.content == RESULT_ANSWER
    for seed in range(3):
        forced = await client.chat.completions.create(
            model=MODEL,
            messages=WITH_RESULT,
            tools=[WEATHER_TOOL],
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=64,
        )
        choice = forced.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        (call,) = choice.message.tool_calls or []
        assert call.function.name == "get_weather"
        jsonschema.validate(
            json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"]
        )


async def test_a_named_call_is_the_call_the_model_makes_unforced(tools_api):
    """Forcing the call the model makes anyway changes no token: the same call, greedy."""
    _, client = tools_api
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = await client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice=named, **GREEDY
    )
    (call,) = reply.choices[0].message.tool_calls or []
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        CALL_ARGUMENTS,
    )
    assert reply.choices[0].finish_reason == "tool_calls"


async def test_malformed_or_unsupported_tool_fields_are_400s_naming_them(tools_api):
    url, _ = tools_api
    async with httpx.AsyncClient(base_url=url) as http:
        for extra, param, says in BAD_TOOL_REQUESTS:
            body = {"model": MODEL, "messages": QUESTION, "tools": [WEATHER_TOOL], **extra}
            reply = await http.post("/v1/chat/completions", json=body)
            assert reply.status_code == 400, (extra, reply.text)
            error = reply.json()["error"]
            assert error["param"] == param, (extra, error)
            assert says in error["message"] and error["type"] == "invalid_request_error"
        fine = {"model": MODEL, "messages": QUESTION, "tools": [WEATHER_TOOL], **GREEDY}
        assert (await http.post("/v1/chat/completions", json=fine)).status_code == 200


async def test_tools_for_a_template_without_tools_are_a_400_saying_so(serve_cluster):
    url, _ = await serve_cluster()  # the tiny random llama: a ChatML template, no tools
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], max_tokens=4
            )
    error = caught.value.body
    assert error["param"] == "tools" and "does not support tools" in error["message"]
    assert "does not render tools" in error["message"]


# --- Anthropic ---------------------------------------------------------------------------

CLAUDE_TOOL = {
    "name": "get_weather",
    "description": WEATHER_TOOL["function"]["description"],
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}
CLAUDE_HISTORY = [
    *QUESTION,
    {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": CALL_ARGUMENTS}
        ],
    },
    {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": TOOL_RESULT}],
    },
]


def claude(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key="-", max_retries=0)


async def test_anthropic_tool_use_whole_and_streamed(tools_api):
    url, _ = tools_api
    request: dict[str, Any] = {
        "model": MODEL, "messages": QUESTION, "tools": [CLAUDE_TOOL], "max_tokens": 64,
        "extra_body": {"temperature": 0},
    }  # fmt: skip
    async with claude(url) as client:
        whole = await client.messages.create(**request)
        async with client.messages.stream(**request) as events:
            kinds = [(e.type, getattr(e, "delta", None)) async for e in events]
            streamed = await events.get_final_message()
    for message in (whole, streamed):
        (block,) = message.content
        assert block.type == "tool_use" and block.id.startswith("toolu_")
        assert block.name == "get_weather" and block.input == CALL_ARGUMENTS
        assert message.stop_reason == "tool_use"
    deltas = [delta.type for kind, delta in kinds if kind == "content_block_delta"]
    assert deltas == ["input_json_delta"]


async def test_anthropic_tool_results_render_through_the_template(tools_api):
    url, _ = tools_api
    async with claude(url) as client:
        reply = await client.messages.create(
            model=MODEL, messages=CLAUDE_HISTORY, tools=[CLAUDE_TOOL], max_tokens=64,
            extra_body={"temperature": 0},
        )  # fmt: skip
        (block,) = reply.content
        assert block.type == "text" and block.text == RESULT_ANSWER
        assert reply.stop_reason == "end_turn"
        refused = await client.messages.create(
            model=MODEL, messages=QUESTION, tools=[CLAUDE_TOOL], max_tokens=64,
            tool_choice={"type": "none"}, extra_body={"temperature": 0},
        )  # fmt: skip
        assert [b.text for b in refused.content if b.type == "text"] == [NO_TOOLS_ANSWER]
        forced = await client.messages.create(
            model=MODEL, messages=CLAUDE_HISTORY, tools=[CLAUDE_TOOL], max_tokens=64,
            tool_choice={"type": "any"}, extra_body={"temperature": 0},
        )  # fmt: skip
        (block,) = forced.content  # "any": a call where it would have answered in words
        assert block.type == "tool_use" and block.name == "get_weather"
        jsonschema.validate(block.input, CLAUDE_TOOL["input_schema"])
        assert forced.stop_reason == "tool_use"


BAD_CLAUDE_REQUESTS = [
    ({"tool_choice": {"type": "tool", "name": "get_time"}}, "tool_choice", "not among the tools"),
    ({"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
     "tool_choice.disable_parallel_tool_use", "not supported yet"),
    ({"tools": [{**CLAUDE_TOOL, "strict": True}]}, "tools.0.strict", "not supported yet"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0", ""),
    ({"tools": [{"name": "get_weather"}]}, "tools.0.input_schema", "required"),
    ({"messages": [*CLAUDE_HISTORY[:2], {"role": "user", "content": [{"type": "tool_result"}]}]},
     "messages.2.content.0.tool_use_id", "required"),
    ({"messages": [QUESTION[0], {"role": "assistant", "content": [{"type": "tool_use"}]}]},
     "messages.1.content.0.id", "required"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking", "does not think"),
]  # fmt: skip


async def test_anthropic_tool_errors_name_the_field_in_anthropics_shape(tools_api):
    url, _ = tools_api
    async with httpx.AsyncClient(base_url=url) as http:
        for extra, named, says in BAD_CLAUDE_REQUESTS:
            body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "tools": [CLAUDE_TOOL]}
            reply = await http.post("/v1/messages", json=body | extra)
            assert reply.status_code == 400, (extra, reply.text)
            error = reply.json()
            assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
            assert named in error["error"]["message"] and says in error["error"]["message"]


# --- Ollama ------------------------------------------------------------------------------

OLLAMA_HISTORY = [
    *QUESTION,
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": CALL_ARGUMENTS}}],
    },
    {"role": "tool", "content": TOOL_RESULT, "tool_name": "get_weather"},
]


async def test_ollama_tool_calls_whole_and_streamed(tools_api):
    url, _ = tools_api
    client = ollama.AsyncClient(host=url)
    greedy = {"temperature": 0, "num_predict": 64}
    whole = await client.chat(MODEL, messages=QUESTION, tools=[WEATHER_TOOL], options=greedy)
    calls = []
    async for chunk in await client.chat(
        MODEL, messages=QUESTION, tools=[WEATHER_TOOL], options=greedy, stream=True
    ):
        calls += chunk.message.tool_calls or []
        assert not chunk.message.content
    for call in [*whole.message.tool_calls, *calls]:
        assert call.function.name == "get_weather" and call.function.arguments == CALL_ARGUMENTS
    assert len(whole.message.tool_calls) == len(calls) == 1 and whole.message.content == ""
    answer = await client.chat(MODEL, messages=OLLAMA_HISTORY, tools=[WEATHER_TOOL], options=greedy)
    assert answer.message.content == RESULT_ANSWER and not answer.message.tool_calls
    shown = await client.show(MODEL)
    assert shown.capabilities == ["completion", "tools"]
