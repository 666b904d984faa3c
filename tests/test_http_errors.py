"""Every error case: its status, OpenAI's error shape, and a server that keeps serving."""

from __future__ import annotations

import httpx
import pytest

from mlx_cluster.contract.config import LimitsConfig
from mlx_cluster.contract.errors import (
    ClusterError,
    KVCapacityExceeded,
    MessageTooLarge,
    SessionNotFound,
    SessionTooLarge,
    WorkerUnavailable,
)
from mlx_cluster.coordinator.api.errors import api_error

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
        ({**CHAT, "n": 9}, "n", "n must be at most 8, got 9"),
        ({**CHAT, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({**CHAT, "stop": [""]}, "stop", "non-empty"),
        ({**CHAT, "logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({"max_tokens": 4}, "messages", "Field required"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [CHAT["messages"][0]] * 1025}, "messages", "1025 messages, at most 1024"),
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
    assert_error(reply, 413, "2504 bytes", "2000 bytes", param="prompt")  # "user" counts too
    await assert_serves(http)


async def test_every_message_byte_counts_against_the_prompt_limit(http):
    """Roles, names and every content part count, not only the text (1988 of 2011 bytes)."""
    parts = [{"type": "text", "text": "x" * 497}] * 4
    body = {**CHAT, "messages": [{"role": "user", "name": "ann", "content": parts}]}
    reply = await http.post("/v1/chat/completions", json=body)
    assert_error(reply, 413, "2011 bytes", "2000 bytes", param="prompt")
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
    """KV full right now: another request holds the budget; room comes back when it ends."""
    kv = {"budget_tokens": 1024, "max_session_tokens": 1024}
    url, cluster = await serve_cluster(settings=LimitsConfig(queue_length=0), kv=kv)
    no_end = {str(cluster.tokenizer.eos_token_id): -100}  # it runs to max_tokens
    holder = {"prompt": "the river", "max_tokens": 1000, "logit_bias": no_end, "stream": True}
    async with (
        httpx.AsyncClient(base_url=url, timeout=60) as http,
        http.stream("POST", "/generate", json=holder) as held,
    ):
        lines = held.aiter_lines()
        assert (await anext(lines)).startswith("data: ")  # generating: its KV is reserved
        for stream in (False, True):
            body = {**CHAT, "max_tokens": 60, "stream": stream}
            reply = await http.post("/v1/chat/completions", json=body)
            error = assert_error(reply, 429, "capacity", "tokens needed", "of 1024 free")
            assert reply.headers["retry-after"] == "1" and error["type"] == "rate_limit_error"
            assert error["code"] == "capacity_exceeded"
        assert [line async for line in lines if line][-1] == "data: [DONE]"  # it ran on
        await assert_serves(http)


async def test_session_larger_than_the_kv_budget_is_400_with_both_numbers(serve_cluster):
    """A request that can never fit (a worker holds less KV than planned) is the client's 400."""
    url, cluster = await serve_cluster()
    stage = cluster.stages[1]  # as if restarted with a smaller budget than the plan's
    r = stage.layers
    await stage.client.load_layers(str(cluster.model), r.start, r.end, 64, head=True)
    needed = len(cluster.encode("hi", chat=True)) + 100
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for stream, n in ((False, 1), (True, 1), (False, 3), (True, 3)):  # n: each choice's
            body = {**CHAT, "max_tokens": 100, "stream": stream, "n": n}
            reply = await http.post("/v1/chat/completions", json=body)
            error = assert_error(reply, 400, f"needs {needed} tokens", "KV budget is 64")
            assert error["code"] == "context_length_exceeded"
            assert error["type"] == "invalid_request_error" and "retry-after" not in reply.headers
        await assert_serves(http)  # a short request still fits


async def test_message_over_the_grpc_limit_is_500_naming_the_setting(serve_cluster):
    """A prefill over the workers' gRPC message limit: a setting to raise, no client error."""
    url, _ = await serve_cluster(max_message_bytes=16384)
    long_prompt = "the river runs past the hills and the road " * 40
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        reply = await http.post("/generate", json={"prompt": long_prompt, "max_tokens": 2})
        error = assert_error(reply, 500, "vs. 16384", "limits.max_message_mb")
        assert error["code"] == "message_too_large" and error["type"] == "server_error"
        await assert_serves(http)  # short prompts stay under the limit


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
        error = assert_error(reply, 503, "worker")
        assert error["code"] == "worker_unavailable" and error["type"] == "server_error"
        health = await http.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "degraded"
        assert [w["status"] for w in body["workers"]] == ["ok", "unavailable"]
        assert (await http.get("/")).status_code == 200  # the coordinator itself keeps serving


WORKER = "worker worker-1: "


@pytest.mark.parametrize(
    "failure, status, kind, code",
    [
        (KVCapacityExceeded(f"{WORKER}KV cache budget full: 90 tokens needed, 10 of 64 free"),
         429, "rate_limit_error", "capacity_exceeded"),
        (SessionTooLarge(f"{WORKER}session 's1' needs 90 tokens, the KV budget is 64"),
         400, "invalid_request_error", "context_length_exceeded"),
        (MessageTooLarge(f"{WORKER}Received message larger than max (9000000 vs. 4194304)"),
         500, "server_error", "message_too_large"),
        (WorkerUnavailable(f"{WORKER}failed to connect"),
         503, "server_error", "worker_unavailable"),
        (SessionNotFound(f"{WORKER}session 's1' not found"),
         503, "server_error", "worker_unavailable"),
        (TimeoutError(), 504, "server_error", "timeout"),
        (ClusterError(f"{WORKER}something broke"), 502, "server_error", "worker_error"),
        (RuntimeError("a bug"), 500, "server_error", "internal_error"),
    ],
)  # fmt: skip
def test_each_failure_has_its_status_and_shape(failure, status, kind, code):
    error = api_error(failure)
    assert (error.status, error.type, error.code) == (status, kind, code)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    assert ("Retry-After" in error.headers) == (status == 429)
    if isinstance(failure, ClusterError):
        assert str(failure) in error.message  # the worker's numbers reach the client


def test_message_too_large_names_the_limit_once():
    bare = api_error(MessageTooLarge(f"{WORKER}Received message larger than max (9 vs. 4)"))
    assert "limits.max_message_mb" in bare.message and "(9 vs. 4)" in bare.message
    advised = MessageTooLarge(f"{WORKER}larger than max (9 vs. 4){MessageTooLarge.advice}")
    assert api_error(advised).message.count("limits.max_message_mb") == 1
