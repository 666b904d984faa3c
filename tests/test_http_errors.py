"""Every error case: its status, OpenAI's error shape, and a server that keeps serving."""

from __future__ import annotations

import httpx
import pytest

from mlx_cluster.contract.config import LimitsConfig

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


def assert_error(reply: httpx.Response, status: int, *fragments: str, param: str | None = None):
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert "Traceback" not in error["message"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


async def assert_serves(http: httpx.AsyncClient) -> None:
    reply = await http.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in {"stop", "length"}


@pytest.fixture
async def http(serve_cluster):
    settings = LimitsConfig(max_prompt_bytes=2000, max_tokens_ceiling=64, default_max_tokens=16)
    url, _ = await serve_cluster(settings=settings)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        yield client


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({**CHAT, "temperature": 3}, "temperature", "less than or equal to 2"),
        ({**CHAT, "top_p": 0}, "top_p", "greater than 0"),
        ({**CHAT, "n": 2}, "n", "only n=1 is supported, got 2"),
        ({**CHAT, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({**CHAT, "stop": [""]}, "stop", "non-empty"),
        ({**CHAT, "logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({"max_tokens": 4}, "messages", "Field required"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "robot"),
        ({**CHAT, "stream": "maybe"}, "stream", "boolean"),
    ],
)
async def test_invalid_fields_are_400_naming_the_field(http, body, param, fragment):
    reply = await http.post("/v1/chat/completions", json=body)
    assert_error(reply, 400, fragment, param=param)
    await assert_serves(http)


async def test_malformed_json_is_400(http):
    reply = await http.post(
        "/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert_error(reply, 400, "not valid JSON")
    await assert_serves(http)


async def test_prompt_over_the_byte_limit_is_413_with_both_numbers(http):
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 2500}]}
    reply = await http.post("/v1/chat/completions", json=body)
    assert_error(reply, 413, "2500 bytes", "2000 bytes", param="prompt")
    await assert_serves(http)


async def test_max_tokens_over_the_ceiling_is_400(http):
    reply = await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 65})
    assert_error(reply, 400, "65", "64", param="max_tokens")
    await assert_serves(http)


async def test_bad_token_ids_and_many_prompts_are_400(http):
    reply = await http.post("/v1/completions", json={"prompt": [1, 99999], "max_tokens": 2})
    assert_error(reply, 400, "99999", param="prompt")
    reply = await http.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2})
    assert_error(reply, 400, "exactly one prompt", param="prompt")
    await assert_serves(http)


@pytest.mark.parametrize("stream", [False, True])
async def test_ids_past_the_vocabulary_are_400_naming_the_field(http, stream):
    """The Python API's checks, answered before a stream starts (the tiny model has 384)."""
    past = "token id 384 is out of range for a vocabulary of 384"
    cases = [
        ("/v1/completions", {"prompt": [1, 384]}, "prompt", past),
        ("/v1/chat/completions", {**CHAT, "top_k": 384}, "top_k", "vocabulary size 384, got 384"),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"384": 1}}, "logit_bias", past),
    ]
    for path, body, param, fragment in cases:
        reply = await http.post(path, json={"max_tokens": 2, **body, "stream": stream})
        assert_error(reply, 400, fragment, param=param)
    await assert_serves(http)


async def test_unknown_route_is_404_in_shape(http):
    assert_error(await http.get("/v2/nothing"), 404, "Not Found")
    await assert_serves(http)


async def test_prompt_over_the_context_window_is_400_with_both_numbers(
    serve_cluster, model_factory
):
    model = model_factory("llama", config_overrides={"max_position_embeddings": 32})
    url, _ = await serve_cluster(model=model)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        long_prompt = "the river runs past the hills and the road " * 10
        reply = await http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 2})
        error = assert_error(reply, 400, "limit is 31 tokens", "context window 32", param="prompt")
        assert error["code"] == "context_length_exceeded"
        reply = await http.post("/v1/completions", json={"prompt": "the river", "max_tokens": 500})
        assert reply.status_code == 200 and reply.json()["usage"]["total_tokens"] <= 32


async def test_capacity_is_429_with_retry_after(serve_cluster):
    url, _ = await serve_cluster(kv_budget_tokens=40)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        reply = await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 60})
        error = assert_error(reply, 429, "capacity", "tokens needed")
        assert reply.headers["retry-after"] == "1" and error["type"] == "rate_limit_error"
        streamed = await http.post(
            "/v1/chat/completions", json={**CHAT, "max_tokens": 60, "stream": True}
        )
        assert_error(streamed, 429, "capacity")
        await assert_serves(http)


async def test_timeout_is_504_and_frees_sessions(serve_cluster):
    url, cluster = await serve_cluster(settings=LimitsConfig(request_timeout_s=0.3))
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        body = {"prompt": "the river", "max_tokens": 4000, "temperature": 0}
        assert_error(await http.post("/generate", json=body), 504, "timed out")
        async with http.stream("POST", "/generate", json={**body, "stream": True}) as stream:
            events = [line async for line in stream.aiter_lines() if line.startswith("data: ")]
        assert stream.status_code == 200 and '"code": "timeout"' in events[-2]
        assert events[-1] == "data: [DONE]"
        infos = [await s.client.info() for s in cluster.stages]
        assert [i.sessions_open for i in infos] == [0, 0]
        reply = await http.post("/generate", json={**body, "max_tokens": 2})
        assert reply.status_code == 200


async def test_worker_down_is_503_and_health_degraded(serve_cluster, start_workers):
    url, cluster = await serve_cluster()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await assert_serves(http)
        await start_workers.servers[cluster.stages[1].client.address].stop(grace=None)
        reply = await http.post("/v1/chat/completions", json=CHAT)
        assert_error(reply, 503, "worker")
        health = await http.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "degraded"
        assert [w["status"] for w in body["workers"]] == ["ok", "unavailable"]
        assert (await http.get("/")).status_code == 200  # the coordinator itself keeps serving
