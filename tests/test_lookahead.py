"""A worker holding the whole model steps one step ahead, and the golden rule still holds.

LookAhead driven directly on a runtime (no gRPC), as a Decode call drives it:
its tokens and logprobs equal single-process mlx-lm's, steps computed ahead are
taken while the rows stay the same, and a step not taken (a row left, the loop
ended) leaves no trace in the caches: what comes after equals a fresh run.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import mlx.core as mx
import pytest

from mlx_cluster.contract.sampling import SampledToken, SamplingParams
from mlx_cluster.worker.lookahead import LookAhead
from mlx_cluster.worker.runtime import WorkerRuntime
from tests.conftest import TINY_LAYERS
from tests.test_worker_edges import (
    FULL,
    NEW_TOKENS,
    PROMPT,
    assert_matches,
    generate,
    ids,
    reference,
    split,
    step,
)

OTHER_PROMPT = [200, 13, 13, 47, 150, 9, 31]
SEEDED = SamplingParams(temperature=0.8, top_k=40, seed=77, full_logprobs=True)


def expected(model: Path, prompt: list[int], params: SamplingParams) -> list[tuple[int, mx.array]]:
    """mlx-lm's tokens where it samples as the cluster does (greedy); for a seeded session
    (reseeded by position, which mlx-lm's loop does not do), the same worker's tokens
    stepping without looking ahead."""
    if params.temperature == 0:
        return reference(model, prompt, params)
    plain = generate(split(model, [TINY_LAYERS]), prompt, params)
    return [(s.token, cast(mx.array, s.logprobs)) for s in plain]


def whole(model: Path) -> WorkerRuntime:
    (runtime,) = split(model, [TINY_LAYERS])
    return runtime


def prefill(runtime: WorkerRuntime, sid: str, prompt: list[int], params: SamplingParams) -> None:
    runtime.open_session(sid, 0, sampling=params)
    step([runtime], sid, 0, prompt[:-1], sample=False)


def decode(
    lookahead: LookAhead, rows: dict[str, tuple[int, int]], count: int, goes_on: bool = False
) -> dict[str, list[SampledToken]]:
    """`count` steps of these rows (session -> (offset, token), updated) as the decode
    loop runs them: ahead on every step but the last, and on the last too if the rows
    `goes_on` (they will step again)."""
    got: dict[str, list[SampledToken]] = {sid: [] for sid in rows}
    for n in range(count):
        ids = list(rows)
        sampled, _ = lookahead.step(
            ids,
            [rows[s][0] for s in ids],
            [rows[s][1] for s in ids],
            ahead=goes_on or n < count - 1,
        )
        for sid, token in zip(ids, sampled, strict=True):
            got[sid].append(token)
            rows[sid] = (rows[sid][0] + 1, token.token)
    return got


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("params", [FULL, SEEDED], ids=["greedy", "seeded"])
def test_stepping_ahead_gives_mlx_lm_tokens_and_takes_every_step_ahead(
    model_factory, model_type, params
):
    model = model_factory(model_type)
    runtime = whole(model)
    prefill(runtime, "s", PROMPT, params)
    lookahead = LookAhead(runtime, stream_id=1)
    got = decode(lookahead, {"s": (len(PROMPT) - 1, PROMPT[-1])}, NEW_TOKENS)
    assert_matches(got["s"], expected(model, PROMPT, params))
    assert (lookahead.taken, lookahead.dropped) == (NEW_TOKENS - 1, 0)
    assert runtime.require_loaded().sessions.get("s").offset == len(PROMPT) - 1 + NEW_TOKENS


def test_a_row_leaving_drops_the_step_ahead_and_both_rows_go_on_exactly(model_factory):
    """Two rows decode as one batch; one leaves mid-way (the step computed ahead for both
    is dropped: the batch steps back), the other goes on alone, then the first comes back
    for the rest of its tokens. Both equal mlx-lm's."""
    model = model_factory("llama")
    runtime = whole(model)
    prefill(runtime, "a", PROMPT, FULL)
    prefill(runtime, "b", OTHER_PROMPT, SEEDED)
    rows = {"a": (len(PROMPT) - 1, PROMPT[-1]), "b": (len(OTHER_PROMPT) - 1, OTHER_PROMPT[-1])}
    lookahead = LookAhead(runtime, stream_id=1)
    half = NEW_TOKENS // 2
    first = decode(lookahead, rows, half, goes_on=True)
    assert lookahead.taken == half - 1  # the last of them was started ahead too
    alone = decode(lookahead, {"b": rows["b"]}, NEW_TOKENS - half)
    assert lookahead.dropped == 1
    rest = decode(lookahead, {"a": rows["a"]}, NEW_TOKENS - half)
    assert_matches(first["a"] + rest["a"], reference(model, PROMPT, FULL))
    assert_matches(first["b"] + alone["b"], expected(model, OTHER_PROMPT, SEEDED))


def test_a_step_ahead_not_taken_leaves_no_trace(model_factory):
    """The loop ends with a step computed ahead: discarding it puts the cache back where
    the loop left it, and a plain step from there gives what a fresh run gives."""
    model = model_factory("qwen3")
    runtime = whole(model)
    prefill(runtime, "s", PROMPT, FULL)
    lookahead = LookAhead(runtime, stream_id=1)
    rows = {"s": (len(PROMPT) - 1, PROMPT[-1])}
    got = decode(lookahead, rows, 5, goes_on=True)
    sessions = runtime.require_loaded().sessions
    assert sessions.get("s").offset == rows["s"][0] + 1  # one position ahead
    lookahead.discard()
    assert sessions.get("s").offset == rows["s"][0]
    offset, token = rows["s"]
    for _ in range(NEW_TOKENS - 5):
        (sampled,) = runtime.forward_sample(["s"], None, [offset], token_ids=ids([token]))
        got["s"].append(sampled)
        offset, token = offset + 1, sampled.token
    assert_matches(got["s"], reference(model, PROMPT, FULL))


def test_a_cache_that_cannot_step_back_is_never_stepped_ahead(model_factory):
    """gemma3's sliding-window layers keep rotating caches: no step is started ahead,
    and the tokens are still mlx-lm's."""
    model = model_factory("gemma3_text")
    runtime = whole(model)
    prefill(runtime, "s", PROMPT, FULL)
    lookahead = LookAhead(runtime, stream_id=1)
    got = decode(lookahead, {"s": (len(PROMPT) - 1, PROMPT[-1])}, NEW_TOKENS)
    assert (lookahead.taken, lookahead.dropped) == (0, 0)
    assert_matches(got["s"], reference(model, PROMPT, FULL))
