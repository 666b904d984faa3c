"""The prefix cache: requests start from what earlier ones left cached, and nothing changes.

Workers keep an ended session's caches as a prefix (worker/prefixes.py); the
coordinator files its tokens (coordinator/engine/prefixes.py) and starts a later
request whose prompt shares its beginning from there, on every stage at once.
The golden rule holds: the tokens and logprobs are mlx-lm's for the whole prompt
(float32 test models: the prefix's cached positions were computed in other steps,
so the numbers agree to rounding).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal

import httpx
import mlx.core as mx
import openai
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.utils import load_model

from mlx_cluster.contract.errors import PrefixNotFound
from mlx_cluster.contract.rpc import MIB
from mlx_cluster.contract.sampling import SampledToken, SamplingParams
from mlx_cluster.coordinator.engine.prefixes import (
    BLOCK,
    KeptPrefix,
    PrefixIndex,
    PromptReuse,
)
from mlx_cluster.worker.prefixes import PrefixStore
from mlx_cluster.worker.sessions import SessionStore
from tests import test_failover
from tests.conftest import make_engine
from tests.test_failover import spec
from tests.test_golden import assert_same, reference

worker_processes = test_failover.worker_processes
start_cluster = test_failover.start_cluster

SYSTEM = [(7 * i) % 170 + 5 for i in range(150)]  # a long shared beginning
NEW_TOKENS = 12
PARAMS = SamplingParams(max_tokens=NEW_TOKENS)


async def run(engine, prompt, params=PARAMS) -> tuple[list[SampledToken], int]:
    """The tokens (with full logprobs) and how many prompt tokens a kept prefix gave."""
    reuse = PromptReuse()
    full = dataclasses.replace(params, full_logprobs=True)
    tokens = [s async for s in engine.generate_tokens(prompt, full, reuse=reuse)]
    return tokens, reuse.cached_tokens


def filled(length: int, value: float = 1.0) -> KVCache:
    cache = KVCache()
    cache.update_and_fetch(mx.full((1, 2, length, 4), value), mx.full((1, 2, length, 4), value))
    return cache


# --- one worker's store ------------------------------------------------------------------


def test_a_branch_starts_from_the_prefix_and_never_changes_it():
    store = PrefixStore(capacity_bytes=10 * MIB)
    assert store.keep("p", [filled(10)], 10)
    (branch,) = store.branch("p", 6)
    assert branch.offset == 6
    branch.update_and_fetch(mx.full((1, 2, 1, 4), 7.0), mx.full((1, 2, 1, 4), 7.0))
    (again,) = store.branch("p", 10)
    assert again.keys[0, 0, :10, 0].tolist() == [1.0] * 10  # the write went to the branch only
    assert branch.offset == 7 and branch.keys[0, 0, 5:7, 0].tolist() == [1.0, 7.0]
    with pytest.raises(PrefixNotFound, match="holds 10 tokens"):
        store.branch("p", 11)
    with pytest.raises(PrefixNotFound, match="not kept"):
        store.branch("q", 1)


def windowed(length: int, window: int = 8) -> RotatingKVCache:
    """A sliding window's cache fed `length` positions, position i holding i."""
    cache = RotatingKVCache(max_size=window)
    for i in range(length):
        cache.update_and_fetch(mx.full((1, 2, 1, 4), float(i)), mx.full((1, 2, 1, 4), float(i)))
    return cache


def test_a_sliding_windows_prefix_is_cut_back_only_while_it_holds_every_token():
    store = PrefixStore(capacity_bytes=10 * MIB)
    assert store.keep("short", [windowed(6)], 6)  # within the window: any length
    (branch,) = store.branch("short", 4)
    assert branch.offset == 4 and branch.keys[0, 0, :4, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    branch.update_and_fetch(mx.full((1, 2, 1, 4), 9.0), mx.full((1, 2, 1, 4), 9.0))
    assert branch.keys[0, 0, :5, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 9.0]  # after token 3
    assert store.whole_only(["short"]) == []
    assert not store.keep("cut", [windowed(12)], 10)  # the window moved past token 10
    assert store.keep("long", [windowed(12)], 12)
    assert store.whole_only(["short", "long"]) == ["long"]
    (whole,) = store.branch("long", 12)
    window = sorted(whole.keys[0, 0, :, 0].tolist())
    assert whole.offset == 12 and window == list(map(float, range(4, 12)))  # the last 8
    with pytest.raises(PrefixNotFound, match="only at its 12 tokens"):
        store.branch("long", 11)


def test_prefixes_never_exceed_their_bytes_and_the_least_recently_used_go_first():
    one = filled(10).nbytes  # a cache's buffer: 256 positions
    store = PrefixStore(capacity_bytes=2 * one + one // 2)
    for name in "abc":
        assert store.keep(name, [filled(10)], 10)
        store.branch("a", 5)  # "a" stays the most recently used
        assert store.totals().nbytes <= store.capacity_bytes
    assert ("a" in store, "b" in store, "c" in store) == (True, False, True)
    assert not PrefixStore(one // 2).keep("big", [filled(10)], 10)  # larger than the cap
    assert PrefixStore(0).totals().capacity_bytes == 0


def test_kept_prefixes_yield_to_live_sessions():
    """Prefixes hold the budget's spare tokens; a session that needs them evicts them
    instead of being refused."""
    store = SessionStore(100, lambda: [KVCache()], idle_ttl_s=30, prefixes=PrefixStore(10 * MIB))
    session = store.open("s", 0)
    session.caches = [filled(80)]
    store.advance(session, 80)
    _, kept = store.end_keeping([], [("s", "p", 80)])
    assert kept == ["p"] and store.prefixes.tokens == 80 and store.used == 0
    branched = store.open("t", 60, prefix=("p", 80))  # 60 + 80 > 100: the prefix goes...
    assert store.prefixes.tokens == 0 and "p" not in store.prefixes
    assert branched.offset == 80 and branched.caches[0].keys[0, 0, 79, 0].item() == 1.0
    assert store.used == 80  # ...but the session that branched from it keeps its tokens


def test_the_index_finds_the_longest_common_prefix_not_only_an_exact_one():
    index = PrefixIndex()
    first = tuple(range(300))
    index.add(KeptPrefix("a", first, (299, 1)))
    rewritten = [*range(200), 999, *range(201, 300)]  # a template changed one earlier token
    match = index.match(rewritten)
    assert match is not None and (match.prefix.prefix_id, match.length) == ("a", 200)
    assert match.chunks() == [200]
    assert index.match(list(range(50))).length == 49  # all but the last prompt token
    assert index.match([999] * 10) is None
    # the next turn extends the first: it displaces it
    assert index.add(KeptPrefix("b", (*first, 7, 8), (299, 1, 1, 1))) == ["a"]
    assert index.match([*first, 7, 8, 9]).length == 302
    short = PrefixIndex()
    short.add(KeptPrefix("s", tuple(range(BLOCK // 2)), (BLOCK // 2,)))
    assert short.match(list(range(BLOCK))).length == BLOCK // 2  # no whole block in common
    windowed = PrefixIndex()  # a sliding window moved on: only the whole prefix serves
    windowed.add(KeptPrefix("w", first, (300,), whole_only=True))
    assert windowed.match(rewritten) is None
    assert windowed.match([*first, 5]).length == 300


async def test_a_sliding_window_model_reuses_its_whole_prefix_next_turn(
    model_factory, start_workers
):
    """gemma3's local layers keep a window of 8 positions: the next turn starts from the
    whole first turn; a prompt sharing only its beginning is prefilled in full. Tokens as
    mlx-lm's either way."""
    model = model_factory("gemma3_text")
    workers = await start_workers(2)
    engine = await make_engine(model, workers, [3, 5], prefix_cache_bytes=64 * MIB)
    turn1 = [*SYSTEM, 11, 52, 7]
    got1, _ = await run(engine, turn1)
    assert_same(got1, reference(model, turn1, PARAMS))
    await engine.chain.ends_done()
    turn2 = [*turn1, *(s.token for s in got1), 99, 23]
    got2, cached2 = await run(engine, turn2)
    assert cached2 == len(turn1) + NEW_TOKENS - 1
    assert_same(got2, reference(model, turn2, PARAMS))
    await engine.chain.ends_done()
    other = [*SYSTEM, 40, 41]  # shares 150 tokens with both turns: not whole, not reused
    got3, cached3 = await run(engine, other)
    assert cached3 == 0
    assert_same(got3, reference(model, other, PARAMS))


# --- through the cluster -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["fused", "padded"])  # as mlx-lm; as on CUDA
@pytest.mark.parametrize("counts", [[3, 5], [2, 3, 3]], ids=["2-workers", "3-workers"])
async def test_a_conversations_next_turn_prefills_only_what_is_new(
    model_factory, start_workers, counts, how
):
    """The next turn's new tokens are one short step on each worker, which `padded`
    workers pad and attend with composed operations (models/short_steps.py)."""
    model = model_factory("qwen3")
    workers = await start_workers(len(counts), short_step_attention=how)
    engine = await make_engine(model, workers, counts, prefix_cache_bytes=64 * MIB)
    turn1 = [*SYSTEM, 11, 52, 7]
    got1, cached1 = await run(engine, turn1)
    assert cached1 == 0
    assert_same(got1, reference(model, turn1, PARAMS))
    await engine.chain.ends_done()
    turn2 = [*turn1, *(s.token for s in got1), 99, 23]
    got2, cached2 = await run(engine, turn2)
    assert cached2 == len(turn1) + NEW_TOKENS - 1  # the last new token was never fed
    assert_same(got2, reference(model, turn2, PARAMS))
    infos = [await stage.client.info() for stage in engine.chain.stages.stages]
    assert all(info.prefixes >= 1 and info.prefix_bytes > 0 for info in infos)
    assert all(info.prefix_bytes <= info.prefix_capacity_bytes for info in infos)


async def test_requests_share_a_prefix_at_once_and_sampling_is_unchanged(
    model_factory, start_workers
):
    """Two requests branch from one kept prefix at the same time; seeded sampling gives
    the tokens it gives on a cluster that keeps nothing."""
    model = model_factory("llama")
    cached = await make_engine(model, await start_workers(2), [4, 4], prefix_cache_bytes=64 * MIB)
    plain = await make_engine(model, await start_workers(2), [4, 4])
    await run(cached, [*SYSTEM, 1])
    await cached.chain.ends_done()
    seeded = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.8, seed=11, top_k=20)
    prompts = [[*SYSTEM, 40, 41, 42], [*SYSTEM, 60, 61]]
    results = await asyncio.gather(*(run(cached, p, seeded) for p in prompts))
    for prompt, (got, reused) in zip(prompts, results, strict=True):
        assert reused == len(SYSTEM)
        want, _ = await run(plain, prompt, seeded)
        assert [s.token for s in got] == [s.token for s in want]
    greedy = await asyncio.gather(*(run(cached, p) for p in prompts))
    for prompt, (got, reused) in zip(prompts, greedy, strict=True):
        assert reused >= len(SYSTEM)
        assert_same(got, reference(model, prompt, PARAMS))


async def test_a_prefix_gone_from_a_worker_is_forgotten_and_the_prompt_prefilled(
    model_factory, start_workers
):
    """A worker that lost its prefixes (reloaded, as after a restart): the request that
    would start from one prefills its whole prompt, gives the same tokens, and the index
    forgets the prefix."""
    model = model_factory("llama")
    engine = await make_engine(model, await start_workers(2), [3, 5], prefix_cache_bytes=64 * MIB)
    await run(engine, [*SYSTEM, 1])
    await engine.chain.ends_done()
    assert len(engine.chain.prefixes) == 1
    await engine.chain.stages.load_all()  # the same slices again: sessions and prefixes go
    prompt = [*SYSTEM, 2, 3]
    got, reused = await run(engine, prompt)
    assert reused == 0
    assert_same(got, reference(model, prompt, PARAMS))
    await engine.chain.ends_done()
    _, reused = await run(engine, [*SYSTEM, 4])  # the new request's prefix is kept
    assert reused >= len(SYSTEM)


async def test_live_sessions_evict_prefixes_and_the_next_turn_still_answers(
    model_factory, start_workers
):
    """KV budget for one conversation at a time: a new long request evicts the kept
    prefix rather than being refused; the old conversation's next turn then prefills."""
    model = model_factory("llama")
    clients = await start_workers(2, kv_budget_tokens=400)
    engine = await make_engine(model, clients, [4, 4], prefix_cache_bytes=64 * MIB)
    first = [*SYSTEM, 1]
    got, _ = await run(engine, first)
    await engine.chain.ends_done()
    other = [(3 * i) % 170 + 5 for i in range(240)]  # with the kept prefix: past 400
    assert_same((await run(engine, other))[0], reference(model, other, PARAMS))
    infos = [await c.info() for c in clients]
    assert all(i.prefix_tokens + i.kv_used_tokens <= i.kv_capacity_tokens for i in infos)
    follow = [*first, *(s.token for s in got), 9]
    got2, reused = await run(engine, follow)
    assert reused < len(SYSTEM)  # its prefix was evicted for the other request
    assert_same(got2, reference(model, follow, PARAMS))


# --- through the HTTP API, and a worker lost mid-turn ----------------------------------------


async def test_the_api_reports_cached_tokens_metrics_and_each_workers_prefix_bytes(serve_cluster):
    url, _ = await serve_cluster(kv={"prefix_cache_gb": 0.5})
    prompt = "The hills above the harbour " * 20
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        first = await client.completions.create(
            model="m", prompt=prompt, max_tokens=8, temperature=0
        )
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            async with asyncio.timeout(10):
                while not all(
                    s["prefix_cache"]["bytes"] > 0
                    for s in (await http.get("/health")).json()["workers"]
                ):
                    await asyncio.sleep(0.05)
            again = await client.completions.create(
                model="m", prompt=prompt, max_tokens=8, temperature=0
            )
            cached = again.usage.prompt_tokens_details.cached_tokens
            assert cached == again.usage.prompt_tokens - 1  # all but the last prompt token
            assert again.model_extra["performance"]["cached_prompt_tokens"] == cached
            assert again.choices[0].text == first.choices[0].text
            metrics = (await http.get("/metrics")).text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("mlx_cluster_p") and not line.startswith("#")
    }
    assert values["mlx_cluster_prompt_tokens_cached_total"] == cached
    assert values["mlx_cluster_prefix_cache_lookups_total"] == 2
    assert values["mlx_cluster_prefix_cache_hits_total"] == 1


@pytest.mark.slow
async def test_a_worker_killed_during_a_turn_that_started_from_a_prefix_changes_no_token(
    tiny_llama, worker_processes, start_cluster
):
    """The standby holds no prefix: the turn's whole history (the prefix's tokens in the
    steps that cached them, then its own) is replayed on the new chain."""
    model, _ = load_model(tiny_llama)
    (_, a0), (w1, a1), (_, a_spare) = worker_processes("w0", "w1", "spare")
    cluster = await start_cluster(spec(tiny_llama, [("w0", a0), ("w1", a1)], [("spare", a_spare)]))
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    turn1 = [*SYSTEM, 3]
    first = [c.token async for c in cluster.generate(turn1, params) if c.token is not None]
    await cluster.engine.chain.ends_done()
    turn2 = [*turn1, *first, 8, 9]
    want = [t for t, _ in generate_step(mx.array(turn2), model, max_tokens=48)]
    tokens: list[int] = []
    cached = 0
    async for chunk in cluster.generate(turn2, params):
        if chunk.token is not None:
            tokens.append(chunk.token)
        if len(tokens) == 4 and w1.poll() is None:
            os.kill(w1.pid, signal.SIGKILL)
            w1.wait(timeout=10)
        if chunk.performance is not None:
            cached = chunk.performance.cached_prompt_tokens
    assert cached == len(turn1) + len(first) - 1
    assert tokens == want
    assert cluster.engine.chain.replays >= 1
