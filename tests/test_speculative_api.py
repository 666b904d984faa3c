"""Speculative decoding's API, config and reporting: the `speculative` request field, the
`speculative` config section, and the draft counts in `performance` and /metrics.

Whether drafts are accepted, and the tokens they give, are the engine's tests
(test_lookahead.py, test_golden.py); here only the plumbing around them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_cluster.contract.config import ConfigError, SpeculativeConfig
from mlx_cluster.contract.config_loader import load_config
from mlx_cluster.contract.speculation import MAX_DRAFT_TOKENS, Speculation
from mlx_cluster.coordinator.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
)

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
VALID_BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": {"prompt": "the river", "max_tokens": 4, "temperature": 0},
    "/generate": {"prompt": "the river", "max_tokens": 4},
}
# (the `speculative` value, the field the 400 names, a fragment of its message)
BAD_SPECULATIVE: list[tuple[Any, str, str]] = [
    ({"method": "medusa"}, "speculative.method", "'none', 'prompt_lookup' or 'draft'"),
    ({"method": "draft"}, "speculative.method", "needs a draft model"),  # none configured
    ({"num_draft_tokens": 0}, "speculative.num_draft_tokens", "greater than or equal to 1"),
    (
        {"num_draft_tokens": MAX_DRAFT_TOKENS + 1},
        "speculative.num_draft_tokens",
        f"less than or equal to {MAX_DRAFT_TOKENS}",
    ),
    ({"num_draft_tokens": "4"}, "speculative.num_draft_tokens", "valid integer"),
    ({"method": "none", "drafts": 4}, "speculative.drafts", "Extra inputs"),
    ("prompt_lookup", "speculative", "valid dictionary"),
    ([4], "speculative", "valid dictionary"),
]
PERFORMANCE_COUNTS = ("draft_tokens", "accepted_draft_tokens", "decode_steps")


@pytest.fixture
async def http(serve_cluster):
    url, _ = await serve_cluster()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        yield client


async def assert_serves(http: httpx.AsyncClient) -> None:
    reply = await http.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in {"stop", "length"}


def streamed(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON events of a server-sent event stream."""
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


# --- requests -------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(VALID_BODIES))
async def test_bad_speculative_is_400_naming_the_field(http, path):
    for value, param, fragment in BAD_SPECULATIVE:
        reply = await http.post(path, json={**VALID_BODIES[path], "speculative": value})
        assert reply.status_code == 400, (value, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error", error
        assert error["param"] == param, (value, error)
        assert fragment in error["message"], (value, error)
    await assert_serves(http)


@pytest.mark.parametrize("path", list(VALID_BODIES))
async def test_speculative_objects_without_drafting_are_served(http, path):
    for value in (None, {}, {"method": "none"}, {"method": "none", "num_draft_tokens": 8}):
        reply = await http.post(path, json={**VALID_BODIES[path], "speculative": value})
        assert reply.status_code == 200, (value, reply.text)


@pytest.mark.parametrize("request_type", [ChatCompletionRequest, CompletionRequest])
def test_sampling_carries_the_speculative_field(request_type):
    body = {**CHAT, "prompt": "hi"}
    assert request_type.model_validate(body).sampling(4).speculative is None
    wanted = {"method": "prompt_lookup", "num_draft_tokens": 3}
    params = request_type.model_validate({**body, "speculative": wanted}).sampling(4)
    assert params.speculative == Speculation("prompt_lookup", 3)


def test_a_partial_speculative_takes_the_rest_from_the_servers_default():
    server = Speculation("prompt_lookup", 2)
    cases = [
        ({}, server),
        ({"num_draft_tokens": 8}, Speculation("prompt_lookup", 8)),
        ({"method": "none"}, Speculation("none", 2)),
        ({"method": None, "num_draft_tokens": None}, server),
    ]
    for value, wanted in cases:
        request = GenerateRequest.model_validate({"prompt": "hi", "speculative": value})
        assert request.sampling(4, server).speculative == wanted, value
    # Without a server default, the contract's own.
    request = GenerateRequest.model_validate({"prompt": "hi", "speculative": {}})
    assert request.sampling(4).speculative == Speculation()


# --- config ---------------------------------------------------------------------------


MINIMAL = "model: /models/m\nworkers: ['a:50051']\n"


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> SpeculativeConfig:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return load_config(path, env=env or {}, dotenv=None).config.speculative


def test_speculative_section_defaults_to_no_drafting(tmp_path):
    section = load(tmp_path, MINIMAL)
    assert (section.method, section.num_draft_tokens) == ("none", 4)
    assert section.speculation() == Speculation()  # the engine's default, too
    assert not section.speculation().enabled


def test_speculative_section_from_file_and_environment(tmp_path):
    text = MINIMAL + "speculative:\n  method: prompt_lookup\n  num_draft_tokens: 6\n"
    assert load(tmp_path, text).speculation() == Speculation("prompt_lookup", 6)
    env = {"MLX_CLUSTER_SPECULATIVE__NUM_DRAFT_TOKENS": "9"}
    assert load(tmp_path, text, env).speculation() == Speculation("prompt_lookup", 9)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            "{method: medusa}",
            "speculative.method: Input should be 'none', 'prompt_lookup' or 'draft'",
        ),
        ("{method: draft}", "method draft needs draft_model"),
        ("{num_draft_tokens: 0}", "speculative.num_draft_tokens: Input should be greater than"),
        (
            f"{{num_draft_tokens: {MAX_DRAFT_TOKENS + 1}}}",
            f"speculative.num_draft_tokens: Input should be less than or equal to "
            f"{MAX_DRAFT_TOKENS}",
        ),
        ("{num_draft_tokens: lots}", "speculative.num_draft_tokens: Input should be a valid"),
        (
            "{drafts: 4}",
            "speculative.drafts: unknown setting; expected one of: method, num_draft_tokens",
        ),
    ],
)
def test_bad_speculative_section_is_refused_naming_the_field(tmp_path, section, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"{MINIMAL}speculative: {section}\n")
    assert message in str(info.value)


async def test_the_engine_takes_the_configs_default(start_workers, tiny_llama):
    from mlx_cluster.coordinator.engine.cluster import Cluster

    clients = await start_workers(1)
    wanted = {"method": "prompt_lookup", "num_draft_tokens": 3}
    cluster = await Cluster.start(tiny_llama, [clients[0].address], speculative=wanted)
    try:
        assert cluster.engine.speculative == Speculation("prompt_lookup", 3)
    finally:
        await cluster.close()


# --- reporting ------------------------------------------------------------------------


def assert_draft_counts(performance: dict[str, Any]) -> None:
    """The draft counts are ints and tokens_per_step a number (they stay 0 until the
    engine counts drafts and steps)."""
    for key in PERFORMANCE_COUNTS:
        assert isinstance(performance[key], int) and performance[key] >= 0, performance
    assert performance["accepted_draft_tokens"] <= performance["draft_tokens"], performance
    assert isinstance(performance["tokens_per_step"], int | float), performance


async def test_performance_reports_drafts_and_decode_steps(http):
    for path, body in VALID_BODIES.items():
        reply = await http.post(path, json=body)
        assert reply.status_code == 200, reply.text
        assert_draft_counts(reply.json()["performance"])
        async with http.stream("POST", path, json={**body, "stream": True}) as stream:
            events = streamed([line async for line in stream.aiter_lines()])
        assert_draft_counts(events[-1]["performance"])


async def test_metrics_expose_the_draft_and_decode_step_counters(http):
    await assert_serves(http)
    text = (await http.get("/metrics")).text
    for name in (
        "mlx_cluster_draft_tokens_total",
        "mlx_cluster_draft_tokens_accepted_total",
        "mlx_cluster_decode_steps_total",
    ):
        assert f"\n{name} " in text, name
