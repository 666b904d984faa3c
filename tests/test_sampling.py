"""Requests checked against the model's vocabulary, whoever the caller is.

SamplingParams.check and generate_text's prompt check hold for the Python API
(`Cluster.generate`) as they do for HTTP: a bad id is refused with a clear
InvalidArgument before any worker opens a session, not sent into MLX.
"""

from __future__ import annotations

import logging

import pytest

from mlx_cluster.contract.errors import InvalidArgument, InvalidParam
from mlx_cluster.contract.sampling import SamplingParams, check_token_ids
from mlx_cluster.coordinator.engine.cluster import Cluster

VOCAB = 384  # the tiny random model's vocabulary


# --- SamplingParams alone ---------------------------------------------------------------


def test_ids_at_the_edges_of_the_vocabulary_pass():
    SamplingParams(top_k=VOCAB - 1, logit_bias={0: 1.0, VOCAB - 1: -1.0}).check(VOCAB)
    check_token_ids("prompt", [0, VOCAB - 1], VOCAB)


@pytest.mark.parametrize(
    "kwargs, param, message",
    [
        ({"top_k": VOCAB}, "top_k", "top_k must be less than the vocabulary size 384, got 384"),
        (
            {"logit_bias": {VOCAB: 1.0}},
            "logit_bias",
            "logit_bias: token id 384 is out of range for a vocabulary of 384 (ids 0 to 383)",
        ),
        ({"logit_bias": {-1: 1.0}}, "logit_bias", "token id -1 is out of range"),
    ],
)
def test_check_refuses_ids_past_the_vocabulary(kwargs, param, message):
    params = SamplingParams(**kwargs)  # fine until the vocabulary is known
    with pytest.raises(InvalidParam) as caught:
        params.check(VOCAB)
    assert caught.value.param == param and message in str(caught.value)
    assert isinstance(caught.value, InvalidArgument)


def test_negative_top_k_is_refused_when_built():
    with pytest.raises(InvalidParam, match=r"top_k must be 0 or more, got -1") as caught:
        SamplingParams(top_k=-1)
    assert caught.value.param == "top_k"


def test_many_bad_ids_are_counted_and_the_first_five_shown():
    with pytest.raises(InvalidParam) as caught:
        check_token_ids("prompt", [1, 400, -2, 500, 600, 700, 800, 2], VOCAB)
    assert str(caught.value) == (
        "prompt: 6 token ids (400, -2, 500, 600, 700, ...) are out of range "
        "for a vocabulary of 384 (ids 0 to 383)"
    )


# --- through the Python API ---------------------------------------------------------------


@pytest.fixture
async def cluster(start_workers, tiny_llama):
    clients = await start_workers(2)
    cluster = await Cluster.start(tiny_llama, [c.address for c in clients])
    yield cluster
    await cluster.close()


async def generate(cluster: Cluster, prompt: list[int], **kwargs: object) -> list:
    params = SamplingParams(max_tokens=4, **kwargs)  # type: ignore[arg-type]
    return [chunk async for chunk in cluster.generate(prompt, params)]


def sessions_opened(caplog: pytest.LogCaptureFixture) -> int:
    """Sessions the in-process workers logged as opened (one per worker per request)."""
    return sum(
        "opened" in r.getMessage()
        for r in caplog.records
        if r.name == "mlx_cluster.worker.servicer"
    )


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ([1, 2, VOCAB], {}, "prompt: token id 384 is out of range for a vocabulary of 384"),
        ([1, -1], {}, "prompt: token id -1 is out of range for a vocabulary of 384"),
        ([], {}, "prompt must hold at least one token"),
        ([1, 2], {"logit_bias": {VOCAB: 5.0}}, "logit_bias: token id 384 is out of range"),
        ([1, 2], {"logit_bias": {-3: 5.0}}, "logit_bias: token id -3 is out of range"),
        ([1, 2], {"top_k": VOCAB}, "top_k must be less than the vocabulary size 384, got 384"),
        ([1, 2], {"top_k": -1}, "top_k must be 0 or more, got -1"),
    ],
    ids=[
        "prompt-past",
        "prompt-negative",
        "prompt-empty",
        "bias-past",
        "bias-negative",
        "top_k-past",
        "top_k-negative",
    ],
)
async def test_bad_ids_are_refused_before_any_session(cluster, caplog, prompt, kwargs, message):
    assert cluster.vocab_size == VOCAB
    with caplog.at_level(logging.INFO, logger="mlx_cluster.worker.servicer"):
        with pytest.raises(InvalidArgument) as caught:
            await generate(cluster, prompt, **kwargs)
        assert message in str(caught.value)
        assert sessions_opened(caplog) == 0
        for stage in cluster.stages:
            info = await stage.client.info()
            assert (info.sessions_open, info.kv_used_tokens) == (0, 0)
        # The cluster still serves, and the probe above does see sessions open.
        chunks = await generate(cluster, [1, 2, 3], top_k=VOCAB - 1, logit_bias={VOCAB - 1: 1.0})
        assert chunks[-1].finish_reason in {"stop", "length"}
        assert sessions_opened(caplog) == len(cluster.stages)
