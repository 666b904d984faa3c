"""Ollama's API, through the official `ollama` client, against a real cluster.

The routes answer in Ollama's shapes (one body, or newline-delimited chunks),
greedy requests give the text the OpenAI routes give for the same messages, and
what is not supported yet is a 400 in Ollama's error shape naming it.
"""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest

MODEL = "tiny"
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name three rivers."},
]
GREEDY = {"temperature": 0, "num_predict": 12, "seed": 1}


async def test_chat_whole_and_streamed_give_the_openai_routes_text(serve_cluster):
    url, _ = await serve_cluster()
    client = ollama.AsyncClient(host=url)
    whole = await client.chat(model=MODEL, messages=MESSAGES, options=GREEDY, stream=False)
    assert whole.done and whole.done_reason == "length" and whole.message.role == "assistant"
    assert whole.eval_count == 12 and whole.prompt_eval_count > 10
    assert whole.total_duration >= whole.prompt_eval_duration > 0
    parts = [
        part
        async for part in await client.chat(
            model=MODEL, messages=MESSAGES, options=GREEDY, stream=True
        )
    ]
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == 12
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as oa:
        same = await oa.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, seed=1
        )
    assert same.choices[0].message.content == whole.message.content


async def test_generate_applies_the_template_unless_raw(serve_cluster):
    url, _ = await serve_cluster()
    client = ollama.AsyncClient(host=url)
    templated = await client.generate(
        model=MODEL, prompt="Name three rivers.", system="You answer briefly.", options=GREEDY
    )
    chat = await client.chat(model=MODEL, messages=MESSAGES, options=GREEDY)
    assert templated.response == chat.message.content and templated.done
    raw = await client.generate(model=MODEL, prompt="The hills", raw=True, options=GREEDY)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as oa:
        same = await oa.completions.create(
            model=MODEL, prompt="The hills", max_tokens=12, temperature=0, seed=1
        )
    assert raw.response == same.choices[0].text
    chunks = [
        c
        async for c in await client.generate(
            model=MODEL, prompt="The hills", raw=True, options=GREEDY, stream=True
        )
    ]
    assert "".join(c.response for c in chunks) == raw.response and chunks[-1].done
    loaded = await client.generate(model=MODEL)  # an empty prompt: Ollama's "load the model"
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


async def test_tags_show_and_version_describe_the_served_model(serve_cluster):
    url, cluster = await serve_cluster()
    client = ollama.AsyncClient(host=url)
    (model,) = (await client.list()).models
    assert model.model == cluster.model_id
    shown = await client.show(cluster.model_id)
    assert shown.modelinfo["general.context_length"] == cluster.context_length
    assert "completion" in shown.capabilities
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/api/version")).json()["version"]
        got = (await http.get("/api/show", params={"model": cluster.model_id})).json()
        assert got["model_info"] == shown.modelinfo
        assert (await http.get("/api/show")).json() == {"error": "model is required"}


@pytest.mark.parametrize(
    "body, named",
    [
        ({"options": {"mirostat": 2}}, "mirostat"),
        ({"options": {"temperature": 9}}, "options.temperature"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": []}, "messages"),
    ],
)
async def test_what_is_not_supported_is_a_400_in_ollamas_shape(serve_cluster, body, named):
    url, _ = await serve_cluster()
    request = {"model": MODEL, "messages": MESSAGES, "stream": False, **body}
    async with httpx.AsyncClient(base_url=url) as http:
        reply = await http.post("/api/chat", json=request)
        assert reply.status_code == 400
        assert set(reply.json()) == {"error"} and named in reply.json()["error"]
        with pytest.raises(ollama.ResponseError) as caught:
            await ollama.AsyncClient(host=url).chat(
                **{k: v for k, v in request.items() if k != "stream"}
            )
        assert caught.value.status_code == 400
        still = await http.post(
            "/api/chat",
            json={"model": MODEL, "messages": MESSAGES, "stream": False, "options": GREEDY},
        )
        assert still.status_code == 200  # and the server goes on serving
