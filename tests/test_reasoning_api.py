"""Reasoning through a real cluster (2 gRPC workers, the HTTP app), with the official
openai, anthropic and ollama clients, on a tiny model trained to think in a `<think>`
block and then answer (tests/trained_models.py): the reasoning is split from text the
model really generates, which is the text single-process mlx-lm generates."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.test_tools_api import mlx_lm_reply
from tests.trained_models import (
    GREETING,
    REASONING,
    THINKING_TEXT,
    THOUGHT_ANSWER,
    UNTHOUGHT_ANSWER,
)

MODEL = "tiny"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 64}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture
async def thinking_api(serve_cluster, thinking_model):
    url, _ = await serve_cluster(thinking_model)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) as client:
        yield url, client


# --- OpenAI ------------------------------------------------------------------------------


async def test_reasoning_goes_to_reasoning_content(thinking_api, thinking_model):
    _, client = thinking_api
    text, tokens = mlx_lm_reply(thinking_model, GREETING)
    assert text == THINKING_TEXT
    reply = await client.chat.completions.create(
        model=MODEL, messages=GREETING, logprobs=True, **GREEDY
    )
    choice = reply.choices[0]
    assert [t.token for t in choice.logprobs.content] == tokens  # the golden rule
    assert choice.message.model_extra["reasoning_content"] == REASONING
    assert choice.message.content == THOUGHT_ANSWER and choice.finish_reason == "stop"


async def test_streamed_reasoning_comes_before_the_answer(thinking_api):
    _, client = thinking_api
    stream = await client.chat.completions.create(
        model=MODEL, messages=GREETING, stream=True, **GREEDY
    )
    kinds, reasoning, content = [], "", ""
    async for chunk in stream:
        delta = chunk.choices[0].delta.model_dump(exclude_none=True)
        reasoning += delta.get("reasoning_content", "")
        content += delta.get("content", "")
        kinds += [k for k in ("reasoning_content", "content") if delta.get(k)]
    assert reasoning == REASONING and content == THOUGHT_ANSWER
    assert kinds == sorted(kinds, key=lambda kind: kind == "content")  # reasoning first


async def test_chat_template_kwargs_turn_thinking_off(thinking_api, thinking_model):
    _, client = thinking_api
    text, _ = mlx_lm_reply(thinking_model, GREETING, enable_thinking=False)
    reply = await client.chat.completions.create(
        model=MODEL, messages=GREETING, extra_body=NO_THINKING, **GREEDY
    )
    message = reply.choices[0].message
    assert message.content == text == UNTHOUGHT_ANSWER
    assert "reasoning_content" not in (message.model_extra or {})


async def test_reasoning_effort_reaches_a_template_that_reads_it(thinking_api):
    _, client = thinking_api
    plain = await client.chat.completions.create(model=MODEL, messages=GREETING, max_tokens=1)
    effort = await client.chat.completions.create(
        model=MODEL, messages=GREETING, max_tokens=1, reasoning_effort="high"
    )
    assert effort.usage.prompt_tokens > plain.usage.prompt_tokens  # it rendered the effort
    (model,) = (await client.models.list()).data
    assert model.model_extra["capabilities"] == {
        "tools": False,
        "reasoning": True,
        "structured_output": True,
    }


# --- Anthropic ---------------------------------------------------------------------------


async def test_anthropic_thinking_blocks_whole_and_streamed(thinking_api):
    url, _ = thinking_api
    request: dict[str, Any] = {
        "model": MODEL, "messages": GREETING, "max_tokens": 64, "extra_body": {"temperature": 0}
    }  # fmt: skip
    async with anthropic.AsyncAnthropic(base_url=url, api_key="-", max_retries=0) as client:
        whole = await client.messages.create(
            **request, thinking={"type": "enabled", "budget_tokens": 1024}
        )
        async with client.messages.stream(**request) as events:
            deltas = [e.delta.type async for e in events if e.type == "content_block_delta"]
            streamed = await events.get_final_message()
        off = await client.messages.create(**request, thinking={"type": "disabled"})
    for message in (whole, streamed):
        thought, said = message.content
        assert thought.type == "thinking" and thought.thinking == REASONING
        assert said.type == "text" and said.text == THOUGHT_ANSWER
        assert message.stop_reason == "end_turn"
    assert set(deltas) == {"thinking_delta", "text_delta"}
    assert deltas == sorted(deltas, key=lambda kind: kind == "text_delta")
    assert [(b.type, b.text) for b in off.content] == [("text", UNTHOUGHT_ANSWER)]


# --- Ollama ------------------------------------------------------------------------------


async def test_ollama_think(thinking_api):
    url, _ = thinking_api
    client = ollama.AsyncClient(host=url)
    greedy = {"temperature": 0, "num_predict": 64}
    thought = await client.chat(MODEL, messages=GREETING, think=True, options=greedy)
    assert thought.message.thinking == REASONING and thought.message.content == THOUGHT_ANSWER
    unthought = await client.chat(MODEL, messages=GREETING, think=False, options=greedy)
    assert unthought.message.content == UNTHOUGHT_ANSWER and not unthought.message.thinking
    thinking, content = "", ""
    async for chunk in await client.chat(MODEL, messages=GREETING, options=greedy, stream=True):
        thinking += chunk.message.thinking or ""
        content += chunk.message.content or ""
    assert (thinking, content) == (REASONING, THOUGHT_ANSWER)
    generated = await client.generate(MODEL, GREETING[0]["content"], think=True, options=greedy)
    assert (generated.thinking, generated.response) == (REASONING, THOUGHT_ANSWER)
    assert (await client.show(MODEL)).capabilities == ["completion", "thinking"]


async def test_think_for_a_model_that_does_not_think_is_a_400(serve_cluster):
    url, _ = await serve_cluster()
    async with httpx.AsyncClient(base_url=url) as http:
        body = {"model": MODEL, "messages": GREETING, "think": True, "stream": False}
        reply = await http.post("/api/chat", json=body)
        assert reply.status_code == 400 and "think" in reply.json()["error"]
        assert "does not think" in reply.json()["error"]
        body = {"model": MODEL, "messages": GREETING, "think": "extreme", "stream": False}
        reply = await http.post("/api/chat", json=body)
        assert reply.status_code == 400 and "think" in reply.json()["error"]
