"""Constrained decoding: the grammar's mask travels with the session and changes nothing else.

The golden rule with a constraint: the pipeline's tokens and logprobs are those of
single-process mlx-lm's generate_step with the same grammar processor added to its
logits processors, on the same weights; through 2 and 3 workers, with drafts
verified under the mask, with a session started from a kept prefix, and after a
worker dies and the history is replayed into a new worker's matcher.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

from mlx_cluster.contract.errors import InvalidParam
from mlx_cluster.contract.grammar import Constraint
from mlx_cluster.contract.sampling import SampledToken, SamplingParams
from mlx_cluster.contract.speculation import DraftStats, Speculation
from mlx_cluster.models.tokenizer import load_model_tokenizer
from mlx_cluster.worker.constraint import GrammarProcessor, Grammars
from tests import test_failover
from tests.conftest import make_engine
from tests.test_failover import spec
from tests.test_golden import assert_same

worker_processes, start_cluster = test_failover.worker_processes, test_failover.start_cluster

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
EXAMPLE = '{"name": "the model", "age": 42, "tags": ["a", "b"], "ok": true}'
MAX_TOKENS = 160


def constrained(**fields) -> SamplingParams:
    return SamplingParams(
        max_tokens=MAX_TOKENS, constraint=Constraint.json_schema(SCHEMA), **fields
    )


def prompt_of(model_dir: Path, text: str = "Answer in JSON: " + EXAMPLE) -> list[int]:
    return list(load_model_tokenizer(model_dir).encode(text))


def processor(model_dir: Path, params: SamplingParams, prompt_length: int) -> GrammarProcessor:
    """The processor the last stage builds for a session of this prompt."""
    _, config = load_model(model_dir, lazy=True)
    assert params.constraint is not None
    return Grammars(str(model_dir), config["vocab_size"]).processor(
        params.constraint.starting_at(prompt_length)
    )


def reference(
    model_dir: Path, prompt: list[int], params: SamplingParams
) -> list[tuple[int, mx.array]]:
    """Single-process mlx-lm (greedy) with the grammar processor after its own processors,
    up to end-of-sequence."""
    model, _ = load_model(model_dir)
    eos = load_model_tokenizer(model_dir).eos_token_ids
    steps = generate_step(
        mx.array(prompt),
        model,
        max_tokens=params.max_tokens,
        sampler=params.sampler(),
        logits_processors=[*params.logits_processors(), processor(model_dir, params, len(prompt))],
    )
    out = []
    for token, logprobs in steps:
        out.append((token, logprobs))
        if token in eos:
            break
    return out


async def run(engine, model_dir, prompt, params, speculation=None):
    """The engine's tokens (with whole logprob vectors) up to end-of-sequence, and its drafts."""
    stats = DraftStats()
    full = dataclasses.replace(params, full_logprobs=True, speculative=speculation)
    eos = sorted(load_model_tokenizer(model_dir).eos_token_ids)
    steps = engine.generate_tokens(prompt, full, stop_tokens=eos, stats=stats)
    return [s async for s in steps], stats


def assert_valid(model_dir: Path, steps: list[SampledToken] | list[tuple[int, mx.array]]) -> None:
    """The tokens end with end-of-sequence and spell JSON that validates against SCHEMA."""
    tokenizer = load_model_tokenizer(model_dir)
    tokens = [s.token if isinstance(s, SampledToken) else s[0] for s in steps]
    assert tokens[-1] in tokenizer.eos_token_ids, "the grammar completed: only EOS was left"
    jsonschema.validate(json.loads(tokenizer.decode(tokens[:-1])), SCHEMA)


# --- the constraint --------------------------------------------------------------------


def test_a_constraint_travels_in_the_sampling_spec_with_where_the_prompt_ends():
    params = constrained(temperature=0.5, seed=3).for_prompt(17)
    assert params.constraint == Constraint(
        "json_schema", json.dumps(SCHEMA, separators=(",", ":")), 17
    )
    assert SamplingParams.from_spec(params.to_spec()) == dataclasses.replace(params, max_tokens=256)
    assert SamplingParams().for_prompt(17) == SamplingParams()
    assert params.sees_every_token and not SamplingParams().sees_every_token


@pytest.mark.parametrize(
    "constraint, named",
    [
        (
            Constraint.json_schema({"type": "array", "uniqueItems": True}),
            'Unimplemented keys: ["uniqueItems"]',
        ),
        (Constraint.json_schema({"type": "object", "if": {}, "then": {}}), '["if", "then"]'),
        (Constraint.json_schema({"type": "strin"}), "Invalid type: strin"),
        (Constraint.lark("start: foo"), 'unknown name: "foo"'),
        (Constraint.regex("[a-z"), "unclosed character class"),
    ],
)
def test_what_the_engine_cannot_enforce_is_refused_by_name(constraint, named):
    with pytest.raises(InvalidParam) as refused:
        constraint.check("response_format")
    assert refused.value.param == "response_format"
    assert named in str(refused.value) and str(refused.value).startswith("response_format: the ")


def test_ignore_eos_with_a_constraint_is_refused():
    with pytest.raises(InvalidParam, match="ignore_eos must be off with a constraint"):
        constrained(ignore_eos=True)


def test_the_mask_depends_on_the_history_only_whatever_was_rolled_back(tiny_llama):
    """Drafts consumed then rejected, a step back, a replay: the matcher follows the history."""
    prompt = prompt_of(tiny_llama)
    want = [t for t, _ in reference(tiny_llama, prompt, constrained())]
    assert len(want) > 8
    vocab = load_model(tiny_llama, lazy=True)[1]["vocab_size"]
    zeros = mx.zeros((1, vocab))

    def mask(proc: GrammarProcessor, generated: list[int]) -> list[bool]:
        out = proc(mx.array(prompt + generated), zeros)
        return (out[0] == 0).tolist()

    walked = processor(tiny_llama, constrained(), len(prompt))
    for k in range(len(want)):
        mask(walked, want[:k])
    refused = mask(walked, want[:3]).index(False)
    eos = load_model_tokenizer(tiny_llama).eos_token_ids
    eos_only = [t in eos for t in range(vocab)]
    assert mask(walked, [*want[:3], refused]) == eos_only, "past a refused token: EOS only"
    for k in (5, 1, len(want) - 1, 0, 7):  # back and forth over the history
        fresh = processor(tiny_llama, constrained(), len(prompt))
        assert mask(walked, want[:k]) == mask(fresh, want[:k]), k


# --- through the pipeline --------------------------------------------------------------


@pytest.mark.parametrize(
    "split", [[8], [3, 5], [1, 5, 2]], ids=["1-worker", "2-workers", "3-workers"]
)
async def test_constrained_tokens_are_mlx_lms_with_the_same_mask(tiny_llama, start_workers, split):
    prompt = prompt_of(tiny_llama)
    want = reference(tiny_llama, prompt, constrained())
    assert_valid(tiny_llama, want)
    engine = await make_engine(tiny_llama, await start_workers(len(split)), split)
    got, _ = await run(engine, tiny_llama, prompt, constrained())
    assert_same(got, want)


async def test_drafts_are_verified_under_the_mask(tiny_llama, start_workers):
    """Prompt lookup drafts from the prompt's JSON: drafts the grammar refuses are rejected,
    and the matcher rolls back with the session."""
    prompt = prompt_of(tiny_llama, EXAMPLE * 3)
    want = reference(tiny_llama, prompt, constrained())
    engine = await make_engine(tiny_llama, await start_workers(2), [4, 4])
    got, stats = await run(
        engine, tiny_llama, prompt, constrained(), Speculation("prompt_lookup", 4)
    )
    assert_same(got, want)
    assert 0 < stats.accepted < stats.drafted, stats


async def test_a_session_from_a_kept_prefix_and_seeded_choices_follow_the_grammar(
    tiny_llama, start_workers
):
    """The second request starts from the first one's kept prefix (its history goes to the
    last stage's matcher); seeded sampled requests repeat, each valid."""
    prompt = prompt_of(tiny_llama)
    engine = await make_engine(
        tiny_llama, await start_workers(2), [4, 4], prefix_cache_bytes=1 << 26
    )
    want = reference(tiny_llama, prompt, constrained())
    for _ in range(2):
        got, _ = await run(engine, tiny_llama, prompt, constrained())
        assert_same(got, want)
        await engine.chain.ends_done()
    seeded = [
        await run(engine, tiny_llama, prompt, constrained(temperature=0.9, seed=s))
        for s in (1, 2, 1)
    ]
    for steps, _ in seeded:
        assert_valid(tiny_llama, steps)
    tokens = [[s.token for s in steps] for steps, _ in seeded]
    assert tokens[0] == tokens[2] != tokens[1]


@pytest.mark.slow
async def test_a_worker_killed_mid_json_is_replaced_and_the_history_replayed_into_the_matcher(
    tiny_llama, worker_processes, start_cluster
):
    prompt = prompt_of(tiny_llama)
    want = [t for t, _ in reference(tiny_llama, prompt, constrained())]
    (_, a0), (w1, a1), (_, a_spare) = worker_processes("w0", "w1", "spare")
    cluster = await start_cluster(spec(tiny_llama, [("w0", a0), ("w1", a1)], [("spare", a_spare)]))
    tokens: list[int] = []
    async for chunk in cluster.generate(prompt, constrained()):
        if chunk.token is not None:
            tokens.append(chunk.token)
        if len(tokens) == 4 and w1.poll() is None:
            os.kill(w1.pid, signal.SIGKILL)
            w1.wait(timeout=10)
    assert tokens == want[:-1]  # the text's tokens; the end-of-sequence ends it
    assert cluster.engine.chain.replays >= 1
