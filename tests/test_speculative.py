"""Speculative decoding through the pipeline keeps the golden rule.

Drafts from prompt lookup are verified in one traversal; the tokens (and logprobs)
equal those of decoding without drafts, and single-process mlx-lm's, for several
architectures and splits, alone and beside other rows. Each test checks that
drafts were both accepted and rejected, so rollback on every stage is exercised:
a rejected draft must leave no trace in any stage's cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from mlx_cluster.contract.sampling import SampledToken, SamplingParams
from mlx_cluster.contract.speculation import (
    DraftLength,
    DraftStats,
    PromptLookup,
    Speculation,
    StepCosts,
    split_rows,
)
from mlx_cluster.worker import ring
from mlx_cluster.worker.lookahead import LookAhead
from tests.conftest import TINY_LAYERS, make_engine
from tests.test_golden import assert_same, reference
from tests.test_worker_edges import ids, split, step

# A prompt that repeats itself, so that prompt lookup drafts from the start.
PROMPT = [11, 52, 7, 99, 23, 64, 5, 180, 42, 8] * 3 + [11, 52, 7]
NEW_TOKENS = 48
LOOKUP = Speculation("prompt_lookup", 4)


async def run(engine, prompt, params, speculation=None) -> tuple[list[SampledToken], DraftStats]:
    stats = DraftStats()
    full = dataclasses.replace(params, full_logprobs=True, speculative=speculation)
    tokens = [s async for s in engine.generate_tokens(prompt, full, stats=stats)]
    return tokens, stats


def assert_drafts_tested(stats: DraftStats) -> None:
    """Some drafts were kept and some were not: both paths ran."""
    assert 0 < stats.accepted < stats.drafted, stats


# --- drafting --------------------------------------------------------------------------


def test_prompt_lookup_drafts_what_followed_the_latest_longest_match():
    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 6, 1, 2, 3])
    assert lookup.drafts(2) == [4, 5]  # the 3-gram "1 2 3" wins over the later "2 3"
    assert lookup.drafts(0) == []
    lookup = PromptLookup([2, 3, 6, 9, 2, 3, 7, 5, 2, 3])
    assert lookup.drafts(2) == [7, 5]  # the latest "2 3"
    lookup = PromptLookup([1, 2, 3, 4, 1, 2, 3])
    assert lookup.drafts(10) == [4, 1, 2, 3]  # up to the end of what is known
    lookup.extend([8])
    assert lookup.drafts(3) == []  # 8 never occurred before
    assert PromptLookup([]).drafts(4) == [] and PromptLookup([7]).drafts(4) == []


def test_the_draft_length_weighs_acceptance_against_what_longer_steps_cost():
    gpu, cpu = StepCosts(), StepCosts()
    length = DraftLength(4)
    assert length.next(gpu, 1) == 4  # nothing known: try the most
    for positions in range(1, 6):
        gpu.add(1, positions, 0.5)  # a shape's first step (building kernels): not counted
        cpu.add(1, positions, 0.5)
        for _ in range(3):
            gpu.add(1, positions, 0.010 + 0.0005 * positions)  # a few cost what one does
            cpu.add(1, positions, 0.009 * positions + 0.001)  # each costs almost a step
    gpu.add(1, 5, 0.3)  # one slow step (a plan built again) does not move the median
    for _ in range(4):
        length.update(4, 4)  # copying: every draft kept
    assert (length.next(gpu, 1), length.next(cpu, 1)) == (4, 4)
    for _ in range(30):
        length.update(4, 0)  # nothing copied any more: every draft rejected
    assert length.acceptance < 0.1
    tries = [length.next(cpu, 1) for _ in range(DraftLength.RETRY_AFTER)]
    assert tries == [0] * (DraftLength.RETRY_AFTER - 1) + [1]  # now and then, one try
    half = DraftLength(4)
    for _ in range(30):
        half.update(4, 1)  # half the drafts kept
    assert 0.4 < half.acceptance < 0.6
    assert half.next(gpu, 1) >= 2 and half.next(cpu, 1) == 0  # pays on a GPU only
    assert gpu.ratio(2, 3) == 1.0  # never measured for 2 rows: worth a try


def test_a_steps_tokens_split_back_into_rows():
    assert split_rows("abcdef", [1, 3, 2]) == [["a"], ["b", "c", "d"], ["e", "f"]]
    with pytest.raises(ValueError, match="do not split"):
        split_rows("abc", [1, 1])


def test_speculation_settings_are_checked():
    with pytest.raises(ValueError, match=r"speculative\.method"):
        Speculation("medusa", 4)
    with pytest.raises(ValueError, match=r"speculative\.num_draft_tokens"):
        Speculation("prompt_lookup", 0)


# --- one worker's verification -----------------------------------------------------------


def test_a_verified_step_keeps_the_drafts_it_would_have_sampled_and_forgets_the_rest(
    model_factory,
):
    """Drafts that are the greedy continuation are all kept, with one more token; a wrong
    draft ends the step at the token sampled in its place; the cache keeps only what the
    kept tokens fed, and the next tokens are a fresh run's."""
    model = model_factory("qwen3")
    (runtime,) = split(model, [TINY_LAYERS])
    plain = [t for t, _ in reference(model, PROMPT, SamplingParams(max_tokens=12))]
    runtime.open_session("s", 0, sampling=SamplingParams())
    step([runtime], "s", 0, PROMPT[:-1], sample=False)
    offset = len(PROMPT) - 1
    sessions = runtime.require_loaded().sessions
    # all right: [last prompt token, t0, t1, t2] -> t0, t1, t2 and t3
    (kept,) = runtime.verify_sample(["s"], None, [offset], token_ids=ids([PROMPT[-1], *plain[:3]]))
    assert [s.token for s in kept] == plain[:4]
    assert sessions.get("s").offset == offset + 4
    offset += 4
    # wrong at the second draft: [t3, t4, wrong, t6] -> t4, then t5 in the wrong one's place
    wrong = (plain[5] + 1) % 64
    (kept,) = runtime.verify_sample(
        ["s"], None, [offset], token_ids=ids([plain[3], plain[4], wrong, plain[6]])
    )
    assert [s.token for s in kept] == plain[4:6]
    assert sessions.get("s").offset == offset + 2
    offset, token = offset + 2, plain[5]
    rest = []
    for _ in range(12 - 6):
        (sampled,) = runtime.forward_sample(["s"], None, [offset], token_ids=ids([token]))
        rest.append(sampled.token)
        offset, token = offset + 1, sampled.token
    assert rest == plain[6:]


def test_the_one_worker_ring_drops_its_step_ahead_before_verifying(model_factory):
    model = model_factory("llama")
    (runtime,) = split(model, [TINY_LAYERS])
    plain = [t for t, _ in reference(model, PROMPT, SamplingParams(max_tokens=8))]
    runtime.open_session("s", 0, sampling=SamplingParams())
    step([runtime], "s", 0, PROMPT[:-1], sample=False)
    lookahead = LookAhead(runtime, stream_id=1)
    offset = len(PROMPT) - 1
    (first,), _ = lookahead.step(["s"], [offset], [PROMPT[-1]], ahead=True)
    assert first.token == plain[0]
    rows, _ = lookahead.verify(["s"], [offset + 1], [[plain[0], plain[1], plain[2]]])
    assert [s.token for s in rows[0]] == plain[1:4] and lookahead.dropped == 1


# --- through the cluster ---------------------------------------------------------------


@pytest.mark.parametrize(
    "model_type, counts",
    [("llama", [8]), ("llama", [3, 5]), ("qwen3", [1, 5, 2]), ("qwen2", [4, 4])],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else v,
)
async def test_greedy_tokens_with_drafts_equal_those_without(
    model_factory, start_workers, model_type, counts
):
    model = model_factory(model_type)
    params = SamplingParams(max_tokens=NEW_TOKENS)
    want = reference(model, PROMPT, params)
    engine = await make_engine(model, await start_workers(len(counts)), counts)
    got, stats = await run(engine, PROMPT, params, LOOKUP)
    assert_same(got, want)
    assert_drafts_tested(stats)
    assert stats.traversals < NEW_TOKENS  # fewer traversals than tokens
    plain, none = await run(engine, PROMPT, params, Speculation())
    assert_same(plain, want)
    assert none.drafted == 0 and none.traversals == NEW_TOKENS


@pytest.mark.parametrize("temperature", [0.001, 0.7])
async def test_a_seeded_sampled_request_gives_the_same_tokens_with_drafts(
    model_factory, start_workers, temperature
):
    """Each position's draw is seeded by the position: drafting changes which traversal
    samples a position, not what it samples. And it is reproducible. (A random model's
    logits are flat: at 0.7 its drafts are all rejected, at 0.001 some are kept.)"""
    model = model_factory("llama")
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=temperature, seed=5, top_k=8)
    engine = await make_engine(model, await start_workers(2), [4, 4])
    plain, _ = await run(engine, PROMPT, params)
    drafted, stats = await run(engine, PROMPT, params, LOOKUP)
    again, _ = await run(engine, PROMPT, params, LOOKUP)
    assert [s.token for s in drafted] == [s.token for s in plain] == [s.token for s in again]
    assert stats.drafted > 0
    if temperature < 0.01:
        assert stats.accepted > 0


async def test_rows_that_draft_and_rows_that_do_not_share_a_lane(model_factory, start_workers):
    """Two requests in one lane: one drafts, one does not (its positions are padded and
    verified too); each gets the tokens it gets alone."""
    model = model_factory("qwen3")
    params = SamplingParams(max_tokens=NEW_TOKENS)
    other = [200, 13, 13, 47, 150, 9, 31, 77]
    engine = await make_engine(model, await start_workers(2), [3, 5], micro_batches=1)
    (a, stats), (b, _) = await asyncio.gather(
        run(engine, PROMPT, params, LOOKUP), run(engine, other, params)
    )
    assert_same(a, reference(model, PROMPT, params))
    assert_same(b, reference(model, other, params))
    assert stats.accepted > 0


async def test_logits_processors_see_the_kept_tokens_only(model_factory, start_workers):
    """A repetition penalty looks back over the tokens fed: rejected drafts must not
    count."""
    model = model_factory("llama")
    params = SamplingParams(max_tokens=NEW_TOKENS, repetition_penalty=1.3)
    engine = await make_engine(model, await start_workers(2), [5, 3])
    got, stats = await run(engine, PROMPT, params, LOOKUP)
    assert_same(got, reference(model, PROMPT, params))
    assert stats.drafted > 0


async def test_an_openai_client_asks_for_drafts_and_gets_the_same_text(serve_cluster):
    """The extension field through the real app and the official client: the same text
    as without drafts, and the drafts reported in `performance`."""
    from openai import AsyncOpenAI

    url, _ = await serve_cluster(workers=2)
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
    prompt = "one two three four one two three four one two three"

    async def complete(extra: dict[str, object]):
        return await client.completions.create(
            model="m", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, extra_body=extra
        )

    plain = await complete({})
    drafted = await complete({"speculative": {"method": "prompt_lookup", "num_draft_tokens": 6}})
    assert drafted.choices[0].text == plain.choices[0].text
    performance = drafted.model_extra["performance"]
    assert performance["draft_tokens"] > 0
    assert performance["decode_steps"] <= plain.model_extra["performance"]["decode_steps"]
    assert plain.model_extra["performance"]["draft_tokens"] == 0


# --- a draft model -----------------------------------------------------------------------


@pytest.mark.parametrize("drafter", ["itself", "its 4-bit copy"])
async def test_drafts_from_a_draft_model_give_the_tokens_of_decoding_without_them(
    model_factory, start_workers, drafter
):
    """The first worker drafts with a whole model of the same vocabulary: the model itself
    (its drafts are the tokens it will sample) or its 4-bit copy (some drafts rejected, so
    its cache is cut back again and again). The tokens are mlx-lm's either way."""
    model = model_factory("llama")
    draft = model if drafter == "itself" else model_factory("llama", quantize_bits=4)
    params = SamplingParams(max_tokens=NEW_TOKENS)
    engine = await make_engine(model, await start_workers(2), [3, 5], draft_model=draft)
    got, stats = await run(engine, PROMPT, params, Speculation("draft", 4, str(draft)))
    assert_same(got, reference(model, PROMPT, params))
    assert stats.accepted > 0 and stats.traversals < NEW_TOKENS
    if drafter == "itself":
        assert stats.accepted >= stats.drafted * 0.9, stats
    else:
        assert_drafts_tested(stats)


async def test_a_draft_model_with_another_vocabulary_is_refused_at_load(
    model_factory, start_workers
):
    model = model_factory("llama")
    other = model_factory("llama", num_layers=2, vocab_size=512)
    with pytest.raises(Exception, match="vocabulary of 512 tokens"):
        await make_engine(model, await start_workers(2), [4, 4], draft_model=other)


async def test_a_request_for_a_draft_model_the_cluster_lacks_is_refused():
    with pytest.raises(ValueError, match="needs a draft model"):
        Speculation("draft", 4)


async def test_a_long_contexts_lookup_is_indexed_off_the_event_loop_with_the_same_tokens(
    model_factory, start_workers, monkeypatch
):
    """Rows whose context passes THREAD_CONTEXT tokens are built in a thread (a 100k-token
    context takes ~0.15 s to index); here every row is, and nothing changes."""
    monkeypatch.setattr(ring, "THREAD_CONTEXT", 0)
    built = []
    from_proto = ring.Row.from_proto.__func__  # type: ignore[attr-defined]

    def recorded(cls, row):  # type: ignore[no-untyped-def]
        built.append(threading.current_thread() is not threading.main_thread())
        return from_proto(cls, row)

    monkeypatch.setattr(ring.Row, "from_proto", classmethod(recorded))
    model = model_factory("llama")
    params = SamplingParams(max_tokens=NEW_TOKENS)
    engine = await make_engine(model, await start_workers(2), [4, 4])
    got, stats = await run(engine, PROMPT, params, LOOKUP)
    assert_same(got, reference(model, PROMPT, params))
    assert_drafts_tested(stats)
    assert built and all(built)  # every row was indexed in a worker thread
