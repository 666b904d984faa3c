"""Continuous batching is exact: each request's tokens in a batch are its tokens alone.

Requests decode in the engine's lanes (micro-batches (one Forward of [B, 1, D] per
step, batch caches on the workers)); these tests check the tokens and logprobs
against single-process mlx-lm, with requests joining mid-way, leaving early,
of different lengths and with different sampling, and that the workers did
run real batches and hold nothing afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_cluster.contract.errors import KVCapacityExceeded
from mlx_cluster.contract.sampling import SampledToken, SamplingParams
from mlx_cluster.coordinator.engine.core import Engine
from mlx_cluster.models.random_model import build_random_model
from mlx_cluster.models.slicing import load_edges
from mlx_cluster.worker.capabilities import detect
from mlx_cluster.worker.runtime import WorkerRuntime, WorkerSettings
from tests.conftest import make_engine
from tests.test_golden import assert_same, reference

PROMPTS = [
    [11, 52, 7, 99, 23, 64, 5, 180, 42, 8, 77, 3],
    [200, 13, 13, 47, 150],
    [5, 6],
    [(i * 37) % 300 + 1 for i in range(40)],
    [99],
    [31, 41, 59, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33],
]


async def run(
    engine: Engine,
    prompt: list[int],
    params: SamplingParams,
    start_after: asyncio.Event | None = None,
    stop_after: int | None = None,
) -> list[SampledToken]:
    """One request through the engine; it may wait for an event and may stop early."""
    if start_after is not None:
        await start_after.wait()
    got: list[SampledToken] = []
    full = dataclasses.replace(params, full_logprobs=True)
    async with contextlib.aclosing(engine.generate_tokens(prompt, full)) as steps:
        async for step in steps:
            got.append(step)
            if stop_after is not None and len(got) == stop_after:
                break
    return got


class Progress:
    """Set an event once a request has produced `after` tokens (a request joins mid-way)."""

    def __init__(self, after: int) -> None:
        self.after, self.event = after, asyncio.Event()


async def run_signalling(engine: Engine, prompt, params, progress: Progress):
    got = []
    full = dataclasses.replace(params, full_logprobs=True)
    async with contextlib.aclosing(engine.generate_tokens(prompt, full)) as steps:
        async for step in steps:
            got.append(step)
            if len(got) == progress.after:
                progress.event.set()
    return got


async def assert_workers_empty(engine: Engine) -> None:
    for stage in engine.chain.stages.stages:
        info = await stage.client.info()
        assert (info.sessions_open, info.kv_used_tokens) == (0, 0)


@pytest.mark.parametrize(
    "model_type, split",
    [("llama", [3, 5]), ("gemma3_text", [1, 5, 2]), ("qwen3_moe", [4, 4]), ("deepseek_v2", [5, 3])],
)
async def test_batched_requests_match_mlx_lm_alone(model_factory, start_workers, model_type, split):
    """Six requests of different lengths at once, two of them joining after others started."""
    model = model_factory(model_type)
    lengths = [40, 25, 33, 12, 40, 18]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    want = [reference(model, p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    engine = await make_engine(model, await start_workers(len(split)), split, max_batch=8)
    progress = Progress(after=6)
    try:
        got = await asyncio.gather(
            run_signalling(engine, PROMPTS[0], params[0], progress),
            *(run(engine, p, sp) for p, sp in zip(PROMPTS[1:4], params[1:4], strict=True)),
            *(
                run(engine, p, sp, start_after=progress.event)
                for p, sp in zip(PROMPTS[4:], params[4:], strict=True)
            ),
        )
    finally:
        await engine.close()
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
    profile = engine.profile()
    assert profile.largest >= 2, "requests should have decoded in batches"
    assert profile.rows > profile.steps
    await assert_workers_empty(engine)


async def test_mixed_sampling_in_one_batch_equals_each_alone(model_factory, start_workers):
    """Seeded temperature, top-k, repetition penalty and greedy side by side."""
    model = model_factory("qwen3")
    params = [
        SamplingParams(max_tokens=30, temperature=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=24, repetition_penalty=1.4, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=1.2, top_k=20, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=20, ignore_eos=True, logit_bias={17: 4.0}),
    ]
    engine = await make_engine(model, await start_workers(2), [4, 4], micro_batches=1, max_batch=8)
    alone = [await run(engine, p, sp) for p, sp in zip(PROMPTS, params, strict=False)]
    assert engine.profile().largest == 1
    try:
        together = await asyncio.gather(
            *(run(engine, p, sp) for p, sp in zip(PROMPTS, params, strict=False))
        )
    finally:
        await engine.close()
    for t, a in zip(together, alone, strict=True):
        assert [s.token for s in t] == [s.token for s in a]
        for step, (x, y) in enumerate(zip(t, a, strict=True)):
            assert x.logprobs is not None and y.logprobs is not None
            assert mx.allclose(x.logprobs, y.logprobs, atol=1e-4, rtol=1e-4), f"step {step}"
    assert engine.profile().largest == 4
    await assert_workers_empty(engine)


async def test_requests_leaving_early_free_their_place(model_factory, start_workers):
    """A request that stops after a few tokens leaves; the others go on unchanged."""
    model = model_factory("llama")
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    want = [reference(model, p, params) for p in PROMPTS[:4]]
    # The fourth waits for a place.
    engine = await make_engine(model, await start_workers(2), [4, 4], max_batch=3)
    try:
        got = await asyncio.gather(
            run(engine, PROMPTS[0], params, stop_after=3),
            run(engine, PROMPTS[1], params, stop_after=9),
            *(run(engine, p, params) for p in PROMPTS[2:4]),
        )
    finally:
        await engine.close()
    assert_same(got[0], want[0][:3])
    assert_same(got[1], want[1][:9])
    assert_same(got[2], want[2])
    assert_same(got[3], want[3])
    assert engine.decoding == 0
    await assert_workers_empty(engine)


async def test_a_cancelled_request_leaves_the_batch(model_factory, start_workers):
    model = model_factory("llama")
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    want = reference(model, PROMPTS[1], SamplingParams(max_tokens=30, ignore_eos=True))
    engine = await make_engine(model, await start_workers(2), [4, 4], micro_batches=1)
    try:
        doomed = asyncio.create_task(run(engine, PROMPTS[0], params))
        other = asyncio.create_task(
            run(engine, PROMPTS[1], SamplingParams(max_tokens=30, ignore_eos=True))
        )
        while engine.profile().steps < 5:
            await asyncio.sleep(0.01)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert_same(await other, want)
    finally:
        await engine.close()
    await assert_workers_empty(engine)


# --- the worker's side: batch caches that follow the membership ---------------------------


@pytest.fixture(scope="module")
def gemma_runtime_pair(tmp_path_factory) -> tuple[Path, WorkerRuntime, WorkerRuntime]:
    """The same slice twice: decode steps batched, and every session alone."""
    path = build_random_model(tmp_path_factory.mktemp("gemma"), "gemma3_text", num_layers=4)
    runtimes = []
    for batch in (True, False):
        runtime = WorkerRuntime(WorkerSettings(name="w", batch_decode=batch), detect())
        runtime.load(str(path), 0, 4, 0, 0)
        runtimes.append(runtime)
    return path, runtimes[0], runtimes[1]


def test_batches_follow_joins_leaves_reorders_ends_and_truncation(gemma_runtime_pair):
    """Steps over changing sets of sessions give what each session alone gives.

    gemma3_text mixes sliding-window (rotating) and global caches; the windows
    are passed by the longer prompts, so the batch rotating caches wrap around.
    """
    path, batched, alone = gemma_runtime_pair
    edges = load_edges(path)
    prompts = {"a": 70, "b": 9, "c": 2, "d": 33, "e": 3}
    offsets = dict.fromkeys(prompts, 0)
    for runtime in (batched, alone):
        for sid, n in prompts.items():
            runtime.sessions.open(sid, 0)
            tokens = mx.arange(n, dtype=mx.uint32)[None] % 250
            runtime.forward([sid], edges.embed(tokens), [0], True)
    offsets.update(prompts)
    plan = [
        ("step", ["a", "b", "c"]),
        ("step", ["a", "b", "c"]),
        ("step", ["c", "a"]),  # b leaves, order changes
        ("step", ["b", "d", "a", "c", "e"]),  # b comes back, d and e join
        ("end", ["c"]),
        ("step", ["a", "b", "d", "e"]),
        ("truncate", ["e"]),  # (e is still inside its sliding window: it can be cut)
        ("step", ["d", "b", "e"]),
        ("step", ["b"]),  # alone again: out of the batch
        ("step", ["a", "b", "d"]),
    ]
    for step, (action, ids) in enumerate(plan):
        if action == "end":
            for runtime in (batched, alone):
                assert runtime.sessions.end(ids) == 1
            continue
        if action == "truncate":
            for runtime in (batched, alone):
                runtime.sessions.truncate(ids[0], offsets[ids[0]] - 2)
            offsets[ids[0]] -= 2
            continue
        tokens = mx.array([[(step * 7 + i) % 250] for i in range(len(ids))], dtype=mx.uint32)
        hidden = edges.embed(tokens)
        got = batched.forward(ids, hidden, [offsets[i] for i in ids], True)
        want = alone.forward(ids, hidden, [offsets[i] for i in ids], True)
        assert mx.allclose(got, want, atol=1e-4, rtol=1e-4), f"step {step} {ids}"
        for sid in ids:
            offsets[sid] += 1
    store = batched.sessions
    grouped = {s.session_id for s in store._sessions.values() if s.group is not None}
    assert grouped == {"a", "b", "d"}, "the last step's sessions share one batch"
    assert store.used == alone.sessions.used


def test_a_batched_step_past_the_kv_budget_is_refused_whole(tmp_path):
    """Sessions that each fit may not fit together: the step fails and nothing advances."""
    path = build_random_model(tmp_path, "llama", num_layers=2)
    edges = load_edges(path)
    runtime = WorkerRuntime(WorkerSettings(name="w"), detect())
    runtime.load(str(path), 0, 2, 10, 0)  # 10 cached tokens in all
    for sid, n in (("a", 5), ("b", 4)):
        runtime.sessions.open(sid, 0)
        runtime.forward([sid], edges.embed(mx.arange(1, n + 1, dtype=mx.uint32)[None]), [0], True)
    step = edges.embed(mx.array([[7], [8]], dtype=mx.uint32))
    with pytest.raises(KVCapacityExceeded, match="11 tokens needed, 10 of 10 free"):
        runtime.forward(["a", "b"], step, [5, 4], True)
    assert runtime.sessions.used == 9
    runtime.forward(["a"], step[:1], [5], True)  # alone it fits, and the offsets held
    assert runtime.sessions.used == 10
