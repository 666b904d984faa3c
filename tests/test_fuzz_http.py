"""Fuzz the HTTP API: schemathesis from the app's own OpenAPI schema, then bad bodies by hand.

A client's mistake is a 4xx in OpenAI's error shape, never a 5xx, and the
server answers a normal request afterwards. The cluster is real (two
in-process workers, uvicorn on port 0); limits keep every generation short.

Inputs the fuzzing once found breaking the contract (a 5xx, a poisoned
sampler, a segfault on an out-of-vocabulary logit_bias) have tests of their
own at the end. The schema-driven test also checks its own coverage: every
route got its share of generated cases, schema-valid ones reached generation
and schema-invalid ones were refused.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from mlx_cluster.contract.config import LimitsConfig

LIMITS = LimitsConfig(
    max_prompt_bytes=4000, max_tokens_ceiling=16, default_max_tokens=4, request_timeout_s=30
)
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
VALID_BODIES = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/generate": {"prompt": "hi", "max_tokens": 2},
}
GETS = ["/", "/v1/models", "/health", "/metrics"]
EXAMPLES_PER_MODE = 40  # per POST route and generation mode


@pytest.fixture
async def api(serve_cluster):
    """The served cluster's URL, an HTTP client to it and the model's vocabulary size."""
    url, cluster = await serve_cluster(settings=LIMITS)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        yield url, http, cluster.vocab_size


def assert_error_shape(status: int, body: Any) -> None:
    """OpenAI's `{"error": {"message", "type", "param", "code"}}`, with no stack trace."""
    assert isinstance(body, dict) and set(body) == {"error"}, (status, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, (status, body)
    assert isinstance(error["message"], str) and "Traceback" not in error["message"]


async def assert_serves(http: httpx.AsyncClient) -> None:
    """A sampled (not greedy) chat completion still works."""
    reply = await http.post("/v1/chat/completions", json={**CHAT, "temperature": 1.0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in {"stop", "length"}


# --- from the OpenAPI schema --------------------------------------------------------


def openai_error_shape(ctx, response, case) -> None:
    """schemathesis check: every 4xx is in OpenAI's error shape."""
    if 400 <= response.status_code < 500:
        assert_error_shape(response.status_code, response.json())


def fuzz_operation(url: str, operation, mode: GenerationMode, examples: int) -> Counter[str]:
    """Send up to `examples` generated cases of one operation; counts their status classes.

    Runs on a thread (blocking HTTP); every case must pass the checks.
    """
    classes: Counter[str] = Counter()  # "2xx", "4xx"
    session = requests.Session()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        response = case.call_and_validate(
            base_url=url,
            session=session,
            checks=[not_a_server_error, response_schema_conformance, openai_error_shape],
            timeout=30,
        )
        classes[f"{response.status_code // 100}xx"] += 1

    run()
    return classes


async def test_schema_generated_requests_never_get_a_5xx(api):
    url, http, _ = api
    raw = (await http.get("/openapi.json")).json()
    schema = schemathesis.openapi.from_dict(raw)
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    posts: dict[tuple[str, GenerationMode], Counter[str]] = {}
    for path in VALID_BODIES:
        for mode in modes:
            operation = schema[path]["POST"]
            # Blocking HTTP on a thread, so that this loop keeps serving the requests.
            posts[path, mode] = await asyncio.to_thread(
                fuzz_operation, url, operation, mode, EXAMPLES_PER_MODE
            )
    gets = {
        path: await asyncio.to_thread(
            fuzz_operation, url, schema[path]["GET"], GenerationMode.POSITIVE, 5
        )
        for path in GETS
    }
    await assert_serves(http)

    # Coverage. Hypothesis runs the examples asked for unless the inputs run out
    # (a GET without parameters has one), so a route with few cases lost its strategy.
    seen = {f"POST {p} ({m.value})": sum(c.values()) for (p, m), c in posts.items()}
    assert all(n >= EXAMPLES_PER_MODE // 2 for n in seen.values()), seen
    assert all(set(c) == {"2xx"} for c in gets.values()), gets
    # Schema-valid bodies reached generation (the limits refuse some, so this is
    # counted over the routes); schema-invalid ones were refused on every route.
    served = sum(posts[p, GenerationMode.POSITIVE]["2xx"] for p in VALID_BODIES)
    assert served >= 10, posts
    for path in VALID_BODIES:
        negative = posts[path, GenerationMode.NEGATIVE]
        assert negative["4xx"] >= negative.total() // 2, (path, negative)


# --- by hand: every field, every JSON type ------------------------------------------

JSON_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**64,
    -(2**63),
    1.5,
    -1e308,
    1e308,
    "",
    "x",
    "\u202e\u0000\uffff😀\u0301",
    [],
    [1],
    ["x"],
    [{}],
    {},
    {"a": 1},
]


def fields(raw_schema: dict, path: str) -> list[str]:
    ref = raw_schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    name = ref["schema"]["$ref"].rsplit("/", 1)[-1]
    return sorted(raw_schema["components"]["schemas"][name]["properties"])


async def post_raw(http: httpx.AsyncClient, path: str, content: bytes | str, **headers: str):
    return await http.post(path, content=content, headers=headers)


def check_reply(reply: httpx.Response, what: str) -> None:
    """A 2xx, or a 4xx in OpenAI's shape; never a 5xx."""
    assert reply.status_code < 500, (what, reply.status_code, reply.text)
    if reply.status_code >= 400:
        assert_error_shape(reply.status_code, reply.json())


async def test_every_field_with_every_json_type(api):
    _, http, _ = api
    raw = (await http.get("/openapi.json")).json()
    for path, valid in VALID_BODIES.items():
        names = fields(raw, path)
        assert set(valid) < set(names), (path, names)  # the schema lists more than the basics
        for field in names:
            for value in JSON_VALUES:
                body = {**valid, field: value}
                reply = await http.post(path, json=body)
                check_reply(reply, f"POST {path}: a field of each JSON type")
    await assert_serves(http)


# Raw bodies: (content type, body). JSON's NaN/Infinity are Python extensions.
RAW_BODIES: list[tuple[str | None, bytes]] = [
    ("application/json", b""),
    ("application/json", b"null"),
    ("application/json", b"[]"),
    ("application/json", b'"hi"'),
    ("application/json", b"\xff\xfe\x00garbage"),
    ("application/json", b'{"messages": ['),
    ("application/json", b'{"max_tokens": 10' + b"0" * 400 + b"}"),
    ("application/json", b'{"temperature": NaN, "prompt": "hi"}'),
    ("application/json", b'{"top_p": Infinity, "prompt": "hi"}'),
    ("application/json", b'{"max_tokens": -Infinity, "prompt": "hi"}'),
    ("application/json", b"[" * 100_000 + b"]" * 100_000),
    ("application/json", b'{"messages": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"),
    ("application/json", b'{"prompt": "hi", "prompt": 5}'),
    ("application/json", json.dumps({"prompt": "x" * 5000, "max_tokens": 2}).encode()),
    ("application/json", json.dumps({"prompt": list(range(3000)), "max_tokens": 2}).encode()),
    ("text/plain", json.dumps(CHAT).encode()),
    ("application/x-www-form-urlencoded", b"messages=hi&max_tokens=2"),
    ("multipart/form-data; boundary=x", b"--x\r\n\r\nhi\r\n--x--"),
    ("application/json; charset=latin-1", '{"prompt": "caf\u00e9"}'.encode("latin-1")),
    (None, json.dumps(CHAT).encode()),
]


async def test_raw_bodies_and_content_types_are_4xx(api):
    _, http, _ = api
    for path in VALID_BODIES:
        for content_type, body in RAW_BODIES:
            headers = {"content-type": content_type} if content_type else {}
            reply = await post_raw(http, path, body, **headers)
            check_reply(reply, f"POST {path}: raw bodies and content types")
    # Routes and methods that do not exist.
    for method, path in [("GET", "/v1/chat/completions"), ("PUT", "/generate"), ("GET", "/nope")]:
        reply = await http.request(method, path)
        check_reply(reply, "unknown routes and methods")
        assert reply.status_code in {404, 405}
    await assert_serves(http)


# --- cases the fuzzing found: once a 500 (or worse), now a 400 naming the field ---------


CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
# (id, route, body, the field named, a fragment of the message)
ONCE_500 = [
    ("top_k-2**64", CHAT_PATH, {**CHAT, "top_k": 2**64}, "top_k", "2147483647"),
    ("bias-key-2**66", CHAT_PATH, {**CHAT, "logit_bias": {"99999999999999999999": 1}},
     "logit_bias", "99999999999999999999"),
    ("bias-key-superscript", CHAT_PATH, {**CHAT, "logit_bias": {"\u00b2": 1}}, "logit_bias",
     "\u00b2"),
    ("chat-surrogate", CHAT_PATH, {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]},
     "messages", "Unicode"),
    ("prompt-surrogate", COMPLETIONS_PATH, {"prompt": "\ud800", "max_tokens": 2}, "prompt",
     "Unicode"),
    ("image-part", CHAT_PATH, {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "messages", "image"),
    ("logprobs-tiny-penalty", COMPLETIONS_PATH,
     {"prompt": "hi", "logprobs": 0, "repetition_penalty": 5e-324}, "repetition_penalty",
     "5e-324"),
]  # fmt: skip


@pytest.mark.parametrize(
    "path, body, param, says", [pytest.param(*case[1:], id=case[0]) for case in ONCE_500]
)
async def test_inputs_that_once_got_a_500_are_a_400_naming_the_field(api, path, body, param, says):
    _, http, _ = api
    content = json.dumps(body).encode()  # ensure_ascii escapes lone surrogates as \ud800
    reply = await post_raw(http, path, content, **{"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    error = reply.json()
    assert_error_shape(400, error)
    assert error["error"]["type"] == "invalid_request_error", error
    assert error["error"]["param"] == param, error
    assert says in error["error"]["message"], error
    await assert_serves(http)


async def test_top_k_past_the_vocabulary_is_400_and_sampling_survives(api):
    _, http, vocab = api
    reply = await http.post("/v1/chat/completions", json={**CHAT, "top_k": vocab})
    assert reply.status_code == 400, reply.text
    await assert_serves(http)


async def test_logit_bias_past_the_vocabulary_is_400(api):
    _, http, vocab = api
    for key in (vocab, 1_000_000_000):
        reply = await http.post("/v1/chat/completions", json={**CHAT, "logit_bias": {key: 1}})
        assert reply.status_code == 400, reply.text
    await assert_serves(http)
