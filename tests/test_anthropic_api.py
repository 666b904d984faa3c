"""Anthropic's Messages API, through the official `anthropic` client, against a real
cluster: messages whole and streamed, stop reasons, usage, and errors in Anthropic's
shape that name what is not supported."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

MODEL = "tiny"
SYSTEM = "You answer briefly."
MESSAGES = [{"role": "user", "content": "Name three rivers."}]
GREEDY = {"temperature": 0}  # current clients no longer send it themselves


def client(url: str, key: str = "unused") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0)


async def openai_text(url: str, max_tokens: int, stop: list[str] | None = None) -> str:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as oa:
        reply = await oa.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": SYSTEM}, *MESSAGES],
            max_tokens=max_tokens,
            temperature=0,
            stop=stop,
        )
    return reply.choices[0].message.content or ""


async def test_a_message_whole_and_streamed_gives_the_chat_routes_text(serve_cluster):
    url, _ = await serve_cluster()
    async with client(url) as claude:
        whole = await claude.messages.create(
            model=MODEL, system=SYSTEM, messages=MESSAGES, max_tokens=12, extra_body=GREEDY
        )
        assert whole.type == "message" and whole.role == "assistant"
        assert whole.stop_reason == "max_tokens" and whole.stop_sequence is None
        assert whole.usage.output_tokens == 12 and whole.usage.input_tokens > 5
        (block,) = whole.content
        assert block.type == "text" and block.text == await openai_text(url, 12)
        async with claude.messages.stream(
            model=MODEL, system=SYSTEM, messages=MESSAGES, max_tokens=12, extra_body=GREEDY
        ) as events:
            pieces = [text async for text in events.text_stream]
            final = await events.get_final_message()
        assert "".join(pieces) == block.text and final.content[0].text == block.text
        assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12


async def test_a_stop_sequence_is_reported_as_the_reason(serve_cluster):
    url, _ = await serve_cluster()
    text = await openai_text(url, 12)
    stop = text[3:5] if len(text) >= 5 else text[-1:]  # a string the answer contains
    async with client(url) as claude:
        stopped = await claude.messages.create(
            model=MODEL,
            system=SYSTEM,
            messages=MESSAGES,
            max_tokens=12,
            extra_body=GREEDY,
            stop_sequences=[stop],
        )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.content[0].text == text[: text.index(stop)]


@pytest.mark.parametrize(
    "extra, named",
    [
        ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tools"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"temperature": 1.5}, "temperature"),
        ({"output_config": {"format": {"type": "json_schema"}}}, "output_config"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages.0.content.0.type",
        ),
    ],
)
async def test_what_is_not_supported_is_a_400_in_anthropics_shape(serve_cluster, extra, named):
    url, _ = await serve_cluster()
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **extra}
    async with httpx.AsyncClient(base_url=url) as http:
        reply = await http.post("/v1/messages", json=body)
        assert reply.status_code == 400
        error = reply.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert named in error["error"]["message"]
        plain = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
        assert (await http.post("/v1/messages", json=plain)).status_code == 200  # still serving
    async with client(url) as claude:
        with pytest.raises(anthropic.BadRequestError):
            fields = {k: v for k, v in body.items() if k in ("model", "messages", "max_tokens")}
            await claude.messages.create(**fields, extra_body=extra)
