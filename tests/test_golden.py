"""The golden rule: the pipeline gives single-process mlx-lm's tokens and logits.

Tiny random models of several architectures, greedy generation through 1, 2
and 3 workers with uneven splits, compared token by token and logprob by
logprob with mlx-lm's own generate_step on the same weights.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

from mlx_cluster.contract.sampling import SampledToken, SamplingParams
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.coordinator.engine.events import HopEvent
from mlx_cluster.local import local_workers
from tests.conftest import make_engine

PROMPT = [11, 52, 7, 99, 23, 64, 5, 180, 42, 8, 77, 3]
NEW_TOKENS = 40
SPLITS = [[8], [3, 5], [1, 5, 2]]


def reference(
    model_dir: Path, prompt: list[int], params: SamplingParams
) -> list[tuple[int, mx.array]]:
    """Single-process mlx-lm on the whole model."""
    model, _ = load_model(model_dir)
    steps = generate_step(
        mx.array(prompt),
        model,
        max_tokens=params.max_tokens,
        sampler=params.sampler(),
        logits_processors=params.logits_processors(),
    )
    return [(token, logprobs) for token, logprobs in steps]


async def pipeline_run(engine, prompt: list[int], params: SamplingParams) -> list[SampledToken]:
    """The engine's tokens, each with the whole logprob vector the last stage computed."""
    full = dataclasses.replace(params, full_logprobs=True)
    return [step async for step in engine.generate_tokens(prompt, full)]


Steps = list[SampledToken] | list[tuple[int, mx.array]]


def _pairs(steps: Steps) -> list[tuple[int, mx.array | None]]:
    return [(s.token, s.logprobs) if isinstance(s, SampledToken) else s for s in steps]


def assert_same(got: Steps, want: Steps) -> None:
    """The same tokens, and allclose logprob vectors, step by step."""
    got_pairs, want_pairs = _pairs(got), _pairs(want)
    assert [t for t, _ in got_pairs] == [t for t, _ in want_pairs]
    for step, ((_, a), (_, b)) in enumerate(zip(got_pairs, want_pairs, strict=True)):
        assert a is not None and b is not None, "the request must ask for full_logprobs"
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-5), f"logprobs differ at step {step}"
    for step, s in enumerate(got):  # the token's own logprob, as reported with it
        if isinstance(s, SampledToken) and s.logprobs is not None:
            assert abs(s.logprob - s.logprobs[s.token].item()) < 1e-5, f"at step {step}"


@pytest.mark.parametrize(
    "model_type",
    ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "qwen3_moe", "deepseek_v2"],
)
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "-".join(map(str, s)))
async def test_pipeline_matches_mlx_lm(model_factory, start_workers, model_type, split):
    model = model_factory(model_type)
    params = SamplingParams(max_tokens=NEW_TOKENS)
    want = reference(model, PROMPT, params)
    assert len({t for t, _ in want}) > 3, "the random model should not repeat one token"
    engine = await make_engine(model, await start_workers(len(split)), split)
    assert_same(await pipeline_run(engine, PROMPT, params), want)


@pytest.mark.parametrize("model_type, bits", [("llama", 4), ("qwen3", 8), ("qwen3_moe", 4)])
async def test_quantized_slices_match(model_factory, start_workers, model_type, bits):
    """Each slice keeps the model's quantization and the result is unchanged."""
    model = model_factory(model_type, quantize_bits=bits)
    params = SamplingParams(max_tokens=NEW_TOKENS)
    want = reference(model, PROMPT, params)
    engine = await make_engine(model, await start_workers(3), [1, 5, 2])
    assert_same(await pipeline_run(engine, PROMPT, params), want)


async def test_bfloat16_model_matches(model_factory, start_workers):
    model = model_factory("llama", dtype="bfloat16")
    params = SamplingParams(max_tokens=NEW_TOKENS)
    want = reference(model, PROMPT, params)
    engine = await make_engine(model, await start_workers(2), [5, 3])
    assert_same(await pipeline_run(engine, PROMPT, params), want)


# (MLX's CPU gather_mm, which the MoE layers use, takes float32 only.)
@pytest.mark.parametrize("eval_every", [0, 4])
@pytest.mark.parametrize("model_type, dtype", [("gemma3_text", "bfloat16"), ("deepseek_v2", None)])
async def test_computing_every_few_layers_or_at_the_end_changes_nothing(
    model_factory, start_workers, model_type, dtype, eval_every
):
    """Workers that start computing every 4 layers, or only at the end, give the same results.

    (This backend's default, after every layer on CPU and CUDA, runs in every other test.)
    """
    model = model_factory(model_type, dtype=dtype) if dtype else model_factory(model_type)
    params = SamplingParams(max_tokens=NEW_TOKENS)
    want = reference(model, PROMPT, params)
    workers = await start_workers(2, eval_every=eval_every)
    engine = await make_engine(model, workers, [5, 3])
    assert_same(await pipeline_run(engine, PROMPT, params), want)


async def test_logits_processors_and_chunked_prefill_match(model_factory, start_workers):
    """Repetition penalty sees the same token history; prefill runs in several chunks."""
    model = model_factory("qwen3")
    prompt = [(i * 37) % 300 + 1 for i in range(50)]
    params = SamplingParams(max_tokens=32, repetition_penalty=1.3, repetition_context_size=16)
    want = reference(model, prompt, params)
    engine = await make_engine(model, await start_workers(2), [2, 6], prefill_chunk=16)
    assert_same(await pipeline_run(engine, prompt, params), want)


async def test_concurrent_generations_match_alone(model_factory, start_workers):
    model = model_factory("llama")
    engine = await make_engine(model, await start_workers(2), [3, 5])
    params = SamplingParams(max_tokens=NEW_TOKENS)
    other = [200, 13, 13, 47, 150]
    alone_a = await pipeline_run(engine, PROMPT, params)
    alone_b = await pipeline_run(engine, other, params)
    together_a, together_b = await asyncio.gather(
        pipeline_run(engine, PROMPT, params), pipeline_run(engine, other, params)
    )
    assert_same(together_a, alone_a)
    assert_same(together_b, alone_b)
    for stage in engine.chain.stages.stages:
        assert (await stage.client.info()).sessions_open == 0


@pytest.mark.slow
async def test_subprocess_workers_match_mlx_lm(model_factory):
    """Workers as real processes on loopback, driven through Cluster.start."""
    model = model_factory("llama")
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    want = reference(model, PROMPT, params)
    async with local_workers(3) as workers:
        cluster = await Cluster.start(model, [w.address for w in workers], [1, 5, 2])
        try:
            assert_same(await pipeline_run(cluster.engine, PROMPT, params), want)
            infos = [await s.client.info() for s in cluster.stages]
            assert [(i.layer_start, i.layer_end) for i in infos] == [(0, 1), (1, 6), (6, 8)]
        finally:
            await cluster.close()


async def test_prefill_chunks_relayed_along_stages_match(model_factory, start_workers):
    """A long prompt's chunks go along the stages' relay, with mlx-lm's result."""
    model = model_factory("qwen2")
    prompt = [(i * 53) % 300 + 2 for i in range(70)]
    params = SamplingParams(max_tokens=12)
    model_obj, _ = load_model(model)
    want = list(generate_step(mx.array(prompt), model_obj, max_tokens=12, prefill_step_size=8))
    engine = await make_engine(model, await start_workers(3), [2, 3, 3], prefill_chunk=8)
    hops: list[HopEvent] = []
    engine.chain.events.subscribe(
        lambda event: hops.append(event) if isinstance(event, HopEvent) else None
    )
    got = await pipeline_run(engine, prompt, params)
    assert_same(got, want)
    names = [stage.client.name for stage in engine.chain.stages.stages]
    prefill = [h for h in hops if h.tokens > 1]  # 69 tokens in 9 chunks, each on 3 workers
    assert [h.worker for h in prefill] == names * 9
    assert [h.tokens for h in prefill[::3]] == [8] * 8 + [5]
    assert all(h.compute_s > 0 for h in prefill)  # every worker timed its own part
