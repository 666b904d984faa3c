"""The HTTP API through real HTTP: the official openai client, and raw requests.

A real coordinator (Cluster + FastAPI under uvicorn on port 0) over real gRPC
workers on loopback, serving a tiny random model.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from mlx_lm import generate as mlx_generate
from mlx_lm import load as mlx_load

MESSAGES = [{"role": "user", "content": "Tell me about the river and the hills."}]


@pytest.fixture
async def api(serve_cluster):
    url, cluster = await serve_cluster()
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    yield url, cluster, client
    await client.close()


async def chat_text(client, messages=MESSAGES, max_tokens=24, **kwargs) -> str:
    reply = await client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=max_tokens, **kwargs
    )
    return reply.choices[0].message.content


async def test_chat_matches_single_process_mlx_lm(api, tiny_llama):
    _, cluster, client = api
    reply = await client.chat.completions.create(
        model="anything", messages=MESSAGES, temperature=0, max_tokens=24
    )
    model, tokenizer = mlx_load(str(tiny_llama))
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    want = mlx_generate(model, tokenizer, prompt=prompt, max_tokens=24)
    choice = reply.choices[0]
    assert choice.message.content == want and choice.message.role == "assistant"
    assert choice.finish_reason in {"stop", "length"}
    assert reply.model == cluster.model_id and reply.id.startswith("chatcmpl-")
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens <= 24 and reply.created > 0
    assert reply.model_extra["performance"]["ttft_ms"] > 0


async def test_streamed_chat_concatenates_to_the_same_text(api):
    _, _, client = api
    whole = await chat_text(client)
    stream = await client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


async def test_seeded_sampling_streams_the_same_text(api):
    _, _, client = api
    kwargs = dict(model="t", messages=MESSAGES, temperature=0.9, top_p=0.9, seed=7, max_tokens=20)
    first = (await client.chat.completions.create(**kwargs)).choices[0].message.content
    again = (await client.chat.completions.create(**kwargs)).choices[0].message.content
    stream = await client.chat.completions.create(stream=True, **kwargs)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert first == again == streamed


async def test_stop_strings_cut_the_text_in_both_modes(api):
    _, _, client = api
    whole = await chat_text(client)
    stop = whole[5:8]
    assert stop and stop in whole
    cut = await chat_text(client, stop=[stop])
    stream = await client.chat.completions.create(
        model="t", messages=MESSAGES, temperature=0, max_tokens=24, stop=stop, stream=True
    )
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert cut == streamed == whole[: whole.index(stop)]


async def test_chat_logprobs(api):
    _, _, client = api
    reply = await client.chat.completions.create(
        model="t", messages=MESSAGES, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy


async def test_text_completions_and_models(api):
    _, cluster, client = api
    reply = await client.completions.create(
        model="t", prompt="The river", temperature=0, max_tokens=16, logprobs=2
    )
    choice = reply.choices[0]
    assert choice.text and choice.finish_reason in {"stop", "length"}
    assert len(choice.logprobs.tokens) == reply.usage.completion_tokens
    stream = await client.completions.create(
        model="t", prompt="The river", temperature=0, max_tokens=16, stream=True
    )
    assert "".join([c.choices[0].text async for c in stream]) == choice.text
    models = await client.models.list()
    assert [m.id for m in models.data] == [cluster.model_id]
    assert models.data[0].owned_by == "mlx-cluster"
    assert models.data[0].model_extra["context_length"] == cluster.context_length


async def test_generate_endpoint_plain_and_streamed(api):
    url, _, _ = api
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        body = {"prompt": "The hills", "max_tokens": 16}
        reply = (await http.post("/generate", json=body)).json()
        assert set(reply) == {"text", "finish_reason", "usage", "performance"}
        perf = reply["performance"]
        assert set(perf) == {
            "ttft_ms",
            "tokens_per_second",
            "prefill_tokens_per_second",
            "total_ms",
            "cached_prompt_tokens",
            "draft_tokens",
            "accepted_draft_tokens",
            "decode_steps",
            "tokens_per_step",
        }
        assert perf["total_ms"] >= perf["ttft_ms"] > 0
        made = reply["usage"]["completion_tokens"]  # an end-of-sequence token is not counted
        assert perf["draft_tokens"] == 0 and perf["decode_steps"] in (made, made + 1)
        pieces = []
        async with http.stream("POST", "/generate", json={**body, "stream": True}) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    pieces.append(httpx.Response(200, content=line[6:]).json())
        assert "".join(p["text"] for p in pieces) == reply["text"]
        assert pieces[-1]["finish_reason"] == reply["finish_reason"]
        assert "performance" in pieces[-1]


async def test_root_and_health(api):
    url, cluster, _ = api
    async with httpx.AsyncClient(base_url=url) as http:
        root = (await http.get("/")).json()
        assert "POST /v1/chat/completions" in root["endpoints"]
        health = await http.get("/health")
    body = health.json()
    assert health.status_code == 200 and body["status"] == "ok"
    assert body["model"] == cluster.model_id
    assert [w["layers"] for w in body["workers"]] == [[0, 4], [4, 8]]
    for worker, stage in zip(body["workers"], cluster.stages, strict=True):
        assert worker["address"] == stage.client.address and worker["status"] == "ok"
        assert worker["kv_tokens"]["capacity"] > 0 and worker["sessions_open"] == 0
        assert worker["memory"]["weight_bytes"] > 0 and worker["device"]["kind"] in {"cpu", "gpu"}
        assert worker["last_round_trip_ms"] is not None


async def test_sixteen_concurrent_chats_match_their_solo_text(api):
    _, cluster, client = api
    conversations = [
        [{"role": "user", "content": f"Question number {i}: what about the {w}?"}]
        for i, w in enumerate(["river", "hill", "sun", "road"] * 4)
    ]
    alone = [await chat_text(client, messages=m, max_tokens=12) for m in conversations]
    together = await asyncio.gather(
        *(chat_text(client, messages=m, max_tokens=12) for m in conversations)
    )
    assert list(together) == alone
    for stage in cluster.stages:
        assert (await stage.client.info()).sessions_open == 0


async def test_client_disconnect_mid_stream_frees_every_session(api):
    url, cluster, _ = api
    # The end of sequence is barred, so that the generation is still going when checked.
    eos = {str(t): -100 for t in cluster.tokenizer.eos_token_ids}
    body = {"prompt": "The river", "max_tokens": 2000, "stream": True, "logit_bias": eos}
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        http.stream("POST", "/generate", json=body) as stream,
    ):
        seen = 0
        async for line in stream.aiter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break
        infos = [await s.client.info() for s in cluster.stages]
        assert [i.sessions_open for i in infos] == [1, 1], infos
    for _ in range(200):  # the server notices the disconnect within a few steps
        infos = [await s.client.info() for s in cluster.stages]
        if all(i.sessions_open == 0 for i in infos):
            break
        await asyncio.sleep(0.05)
    assert [i.sessions_open for i in infos] == [0, 0]
    assert [i.kv_used_tokens for i in infos] == [0, 0]


async def test_cors_is_configurable(serve_cluster):
    url, _ = await serve_cluster(cors_origins=["http://app.example"])
    preflight = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with httpx.AsyncClient(base_url=url) as http:
        allowed = await http.options("/v1/chat/completions", headers=preflight)
        other = await http.get("/", headers={"Origin": "http://elsewhere.example"})
    assert allowed.headers["access-control-allow-origin"] == "http://app.example"
    assert "access-control-allow-origin" not in other.headers
