"""Workers holding the model's ends: the first embeds token ids, the last samples.

Runtimes driven directly (no gRPC) as a pipeline would drive them, checked
against single-process mlx-lm's generate_step on the same weights: the same
tokens and allclose logprobs, for one worker holding everything and for a split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

from mlx_cluster.contract.errors import InvalidArgument, InvalidParam
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.sampling import SampledToken, SamplingParams
from mlx_cluster.contract.worker_info import WorkerInfo
from mlx_cluster.models.slicing import load_edges
from mlx_cluster.worker.capabilities import detect
from mlx_cluster.worker.runtime import WorkerRuntime, WorkerSettings
from tests.conftest import TINY_LAYERS

PROMPT = [11, 52, 7, 99, 23, 64, 5, 180, 42, 8, 77, 3]
NEW_TOKENS = 16


def ids(tokens: Sequence[int]) -> mx.array:
    return mx.array([list(tokens)], dtype=mx.uint32)


def stage(model: Path, start: int, end: int, **parts: bool) -> WorkerRuntime:
    runtime = WorkerRuntime(WorkerSettings(name="w"), detect())
    runtime.load(str(model), start, end, **parts)
    return runtime


def split(model: Path, counts: Sequence[int]) -> list[WorkerRuntime]:
    """Runtimes holding `counts` layers each, in order, the first with the embedding and
    the last with the head."""
    bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
    last = len(counts) - 1
    return [
        stage(model, bounds[i], bounds[i + 1], embedding=i == 0, head=i == last)
        for i in range(len(counts))
    ]


def step(
    stages: Sequence[WorkerRuntime], sid: str, offset: int, tokens: Sequence[int], sample: bool
) -> SampledToken | None:
    """Feed `tokens` at `offset` through every stage; with `sample`, the next token."""
    token_ids, hidden = ids(tokens), None
    for runtime in stages[:-1]:
        hidden = runtime.forward([sid], hidden, [offset], False, token_ids=token_ids)
    if sample:
        return stages[-1].forward_sample([sid], hidden, [offset], token_ids=token_ids)[0]
    stages[-1].forward([sid], hidden, [offset], True, token_ids=token_ids)
    return None


def generate(
    stages: Sequence[WorkerRuntime],
    history: Sequence[int],
    params: SamplingParams,
    new_tokens: int = NEW_TOKENS,
    chunk: int = 2048,
    sid: str = "s",
) -> list[SampledToken]:
    """Prefill all of `history` but its last token in `chunk`s, then sample token by token."""
    for runtime in stages:
        runtime.open_session(sid, 0, sampling=params)
    head = len(history) - 1
    for start in range(0, head, chunk):
        step(stages, sid, start, history[start : min(start + chunk, head)], sample=False)
    picked, offset, token = [], head, history[-1]
    for _ in range(new_tokens):
        sampled = step(stages, sid, offset, [token], sample=True)
        assert sampled is not None
        picked.append(sampled)
        offset, token = offset + 1, sampled.token
    return picked


def reference(
    model: Path, prompt: list[int], params: SamplingParams, chunk: int = 2048
) -> list[tuple[int, mx.array]]:
    """Single-process mlx-lm on the whole model."""
    whole, _ = load_model(model)
    steps = generate_step(
        mx.array(prompt),
        whole,
        max_tokens=NEW_TOKENS,
        sampler=params.sampler(),
        logits_processors=params.logits_processors(),
        prefill_step_size=chunk,
    )
    return list(steps)


def assert_matches(got: list[SampledToken], want: list[tuple[int, mx.array]]) -> None:
    assert [s.token for s in got] == [t for t, _ in want]
    for n, (sampled, (_, logprobs)) in enumerate(zip(got, want, strict=True)):
        assert sampled.logprobs is not None
        assert mx.allclose(sampled.logprobs, logprobs, atol=1e-5, rtol=1e-5), f"step {n}"


FULL = SamplingParams(full_logprobs=True)


# --- the golden rule ---------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_one_worker_with_every_part_matches_mlx_lm(model_factory, model_type):
    model = model_factory(model_type)
    got = generate(split(model, [TINY_LAYERS]), PROMPT, FULL)
    assert_matches(got, reference(model, PROMPT, FULL))


@pytest.mark.parametrize("model_type, counts", [("llama", [3, 5]), ("qwen3", [1, 5, 2])])
def test_a_split_with_the_ends_on_its_first_and_last_stages_matches_mlx_lm(
    model_factory, model_type, counts
):
    model = model_factory(model_type)
    got = generate(split(model, counts), PROMPT, FULL)
    assert_matches(got, reference(model, PROMPT, FULL))


def test_processors_see_every_token_fed_across_chunks_and_stages(model_factory):
    model = model_factory("qwen3")
    prompt = [(i * 37) % 300 + 1 for i in range(40)]
    params = SamplingParams(
        repetition_penalty=1.3, repetition_context_size=16, logit_bias={17: 2.0}, full_logprobs=True
    )
    got = generate(split(model, [2, 6]), prompt, params, chunk=16)
    assert_matches(got, reference(model, prompt, params, chunk=16))


def test_rows_decoded_as_one_batch_each_match_mlx_lm(model_factory):
    """Two sessions with their own params sample in one step of two rows."""
    model = model_factory("llama")
    (runtime,) = split(model, [TINY_LAYERS])
    prompts = {"a": PROMPT, "b": [200, 13, 13, 47, 150]}
    params = {"a": FULL, "b": SamplingParams(repetition_penalty=1.4, full_logprobs=True)}
    offsets, tokens = {}, {}
    for sid, prompt in prompts.items():
        runtime.open_session(sid, 0, sampling=params[sid])
        step([runtime], sid, 0, prompt[:-1], sample=False)
        offsets[sid], tokens[sid] = len(prompt) - 1, prompt[-1]
    got: dict[str, list[SampledToken]] = {"a": [], "b": []}
    for _ in range(NEW_TOKENS):
        rows = runtime.forward_sample(
            ["a", "b"],
            None,
            [offsets["a"], offsets["b"]],
            token_ids=mx.array([[tokens["a"]], [tokens["b"]]], dtype=mx.uint32),
        )
        for sid, sampled in zip(("a", "b"), rows, strict=True):
            got[sid].append(sampled)
            offsets[sid], tokens[sid] = offsets[sid] + 1, sampled.token
    for sid, prompt in prompts.items():
        assert_matches(got[sid], reference(model, prompt, params[sid]))


# --- sampling state ----------------------------------------------------------------


SEEDED = SamplingParams(temperature=1.0, top_k=50, seed=1234, repetition_penalty=1.2)


def test_a_seeded_session_replayed_on_a_fresh_worker_draws_the_same_tokens(model_factory):
    model = model_factory("llama")
    first = [s.token for s in generate(split(model, [4, 4]), PROMPT, SEEDED)]
    assert len(set(first)) > 3
    keep = 6
    replayed = generate(
        split(model, [TINY_LAYERS]), PROMPT + first[:keep], SEEDED, NEW_TOKENS - keep
    )
    assert [s.token for s in replayed] == first[keep:]


def test_truncating_a_session_cuts_its_processors_history(model_factory):
    model = model_factory("llama")
    stages = split(model, [TINY_LAYERS])
    first = [s.token for s in generate(stages, PROMPT, SEEDED)]
    keep = 5
    length = len(PROMPT) - 1 + keep  # the cache before feeding first[keep - 1]
    stages[0].truncate("s", length)
    offset, token, again = length, first[keep - 1], []
    for _ in range(NEW_TOKENS - keep):
        sampled = step(stages, "s", offset, [token], sample=True)
        assert sampled is not None
        again.append(sampled.token)
        offset, token = offset + 1, sampled.token
    assert again == first[keep:]


def test_top_logprobs_are_sorted_and_begin_with_a_greedy_token(model_factory):
    model = model_factory("llama")
    got = generate(split(model, [TINY_LAYERS]), PROMPT, SamplingParams(top_logprobs=5), 6)
    for sampled in got:
        assert len(sampled.top) == 5 and sampled.logprobs is None
        values = [p for _, p in sampled.top]
        assert values == sorted(values, reverse=True)
        assert sampled.top[0] == (sampled.token, pytest.approx(sampled.logprob))
        assert sampled.logprob <= 0
    without = generate(split(model, [TINY_LAYERS]), PROMPT, SamplingParams(), 1)
    assert without[0].top == () and without[0].token == got[0].token


def test_open_session_checks_sampling_against_the_model_on_the_head_only(model_factory):
    model = model_factory("llama")
    first, last = split(model, [4, 4])
    vocab = load_edges(model).vocab_size
    too_many = SamplingParams(top_k=vocab)
    with pytest.raises(InvalidParam, match="top_k must be less than the vocabulary size"):
        last.open_session("s", 0, sampling=too_many)
    first.open_session("s", 0, sampling=too_many)  # a stage without the head ignores it
    with pytest.raises(InvalidParam, match="logit_bias"):
        last.open_session("t", 0, sampling=SamplingParams(logit_bias={vocab: 1.0}))


# --- errors ------------------------------------------------------------------------


def test_token_ids_need_the_embedding_and_sampling_needs_the_head(model_factory):
    model = model_factory("llama")
    first, last = split(model, [4, 4])
    for runtime in (first, last):
        runtime.open_session("s", 0)
    with pytest.raises(InvalidArgument, match=r"holds layers \[4, 8\) with the head, not the emb"):
        last.forward(["s"], None, [0], True, token_ids=ids([1, 2]))
    with pytest.raises(InvalidArgument, match=r"holds layers \[0, 4\) with the embedding, not the"):
        first.forward_sample(["s"], None, [0], token_ids=ids([1, 2]))
    hidden = first.forward(["s"], None, [0], False, token_ids=ids([1, 2]))
    with pytest.raises(InvalidArgument, match="needs the token_ids"):
        last.forward_sample(["s"], hidden, [0])
    with pytest.raises(InvalidArgument, match="needs hidden states or token_ids"):
        first.forward(["s"], None, [2], True)
    bare = stage(model, 0, 4)
    assert bare.loaded is not None and bare.loaded.edges is None
    bare.open_session("s", 0)
    with pytest.raises(InvalidArgument, match="not the embedding"):
        bare.forward(["s"], None, [0], True, token_ids=ids([1, 2]))


def test_token_ids_of_the_wrong_shape_type_or_range_are_refused(model_factory):
    model = model_factory("llama")
    first, last = split(model, [4, 4])
    vocab = load_edges(model).vocab_size
    for runtime in (first, last):
        runtime.open_session("s", 0)
    hidden = first.forward(["s"], None, [0], False, token_ids=ids([1, 2, 3]))
    cases = [
        (ids([1, 2]), r"token_ids must be \[B, L\] = \(1, 3\), got \(1, 2\)"),
        (mx.array([[1, 2, 3], [4, 5, 6]], dtype=mx.uint32), r"= \(1, 3\), got \(2, 3\)"),
        (mx.array([1, 2, 3], dtype=mx.uint32), r"got \(3,\)"),
        (mx.array([[1, 2, 3]], dtype=mx.int32), "token_ids must be uint32, got mlx.core.int32"),
        (ids([1, vocab, 3]), f"token id {vocab} is out of range for a vocabulary of {vocab}"),
    ]
    for token_ids, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            last.forward_sample(["s"], hidden, [0], token_ids=token_ids)
    with pytest.raises(InvalidArgument, match=f"token id {vocab + 5} is out of range"):
        first.forward(["s"], None, [3], False, token_ids=ids([vocab + 5]))
    assert last.forward_sample(["s"], hidden, [0], token_ids=ids([1, 2, 3]))[0].token < vocab


def test_a_session_with_processors_needs_token_ids_at_every_step(model_factory):
    model = model_factory("llama")
    first, last = split(model, [4, 4])
    for runtime in (first, last):
        runtime.open_session("s", 0, sampling=SamplingParams(repetition_penalty=1.2))
    hidden = first.forward(["s"], None, [0], False, token_ids=ids([1, 2]))
    with pytest.raises(InvalidArgument, match="each of its steps needs token_ids"):
        last.forward(["s"], hidden, [0], True)


# --- the wire ----------------------------------------------------------------------


def test_sampling_params_survive_the_spec():
    params = SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.3,
        repetition_context_size=32,
        presence_penalty=-0.5,
        frequency_penalty=1.5,
        seed=2**40 + 3,
        logit_bias={5: -1.5, 17: 2.25},
        top_logprobs=7,
        full_logprobs=True,
    )
    wire = pb.SamplingSpec.FromString(params.to_spec().SerializeToString())
    assert SamplingParams.from_spec(wire) == params
    greedy = SamplingParams.from_spec(SamplingParams().to_spec())
    assert greedy == SamplingParams() and greedy.seed is None
    assert SamplingParams.from_spec(pb.OpenSessionRequest().sampling) == SamplingParams()
    coordinator_only = SamplingParams(max_tokens=9, stop=("x",), ignore_eos=True)
    assert SamplingParams.from_spec(coordinator_only.to_spec()) == SamplingParams()
    # Seeds past uint64 go as their value modulo 2**64, which seeds alike (see reseed).
    assert SamplingParams.from_spec(SamplingParams(seed=-5).to_spec()).seed == 2**64 - 5


def test_sampled_tokens_survive_the_wire():
    full = mx.array([-0.5, -1.25, -3.0], dtype=mx.float32)
    for sampled in (
        SampledToken(3, -0.5, ((3, -0.5), (1, -1.25)), full),
        SampledToken(7, -2.0, (), None),
    ):
        message = pb.Sampled()
        sampled.to_proto(message)
        back = SampledToken.from_proto(pb.Sampled.FromString(message.SerializeToString()))
        assert (back.token, back.logprob, back.top) == (sampled.token, sampled.logprob, sampled.top)
        if sampled.logprobs is None:
            assert back.logprobs is None
        else:
            assert back.logprobs is not None and mx.array_equal(back.logprobs, sampled.logprobs)


# --- loading -----------------------------------------------------------------------


def parameter_names(edges) -> set[str]:
    return {name for name, _ in tree_flatten(edges.model.parameters())}


def test_edges_load_only_the_parts_asked_for(model_factory):
    model = model_factory("qwen3")  # untied: its head has its own matrix
    both = load_edges(model)
    embedding = load_edges(model, head=False)
    head = load_edges(model, embedding=False)
    assert parameter_names(embedding) == {"model.embed_tokens.weight"}
    assert parameter_names(head) == {"model.norm.weight", "lm_head.weight"}
    assert embedding.weight_bytes + head.weight_bytes == both.weight_bytes
    tokens = ids([3, 5])
    assert mx.array_equal(embedding.embed(tokens), both.embed(tokens))
    hidden = both.embed(tokens)
    assert mx.array_equal(head.head(hidden), both.head(hidden))
    with pytest.raises(ValueError, match=r"LM head of .* not loaded here"):
        embedding.head(hidden)
    with pytest.raises(ValueError, match=r"embedding of .* not loaded here"):
        head.embed(tokens)
    assert (head.vocab_size, head.dtype) == (both.vocab_size, both.dtype)


def test_a_tied_head_keeps_the_embedding_matrix(model_factory):
    model = model_factory("llama")  # tied
    head = load_edges(model, embedding=False)
    assert parameter_names(head) == {"model.embed_tokens.weight", "model.norm.weight"}
    hidden = mx.random.normal((1, 2, head.hidden_size))
    assert mx.array_equal(head.head(hidden), load_edges(model).head(hidden))
    with pytest.raises(ValueError, match=r"embedding of .* not loaded here"):
        head.embed(ids([1]))


def test_info_reports_the_ends_held_and_counts_their_bytes(model_factory):
    model = model_factory("qwen3")
    runtime = WorkerRuntime(WorkerSettings(name="w"), detect())
    bare = runtime.load(str(model), 0, TINY_LAYERS)
    assert (bare.info.embedding, bare.info.head) == (False, False)
    layers = bare.info.weight_bytes
    first = runtime.load(str(model), 0, TINY_LAYERS, embedding=True)
    assert first.reloaded and (first.info.embedding, first.info.head) == (True, False)
    embedding_bytes = load_edges(model, head=False).weight_bytes
    assert first.info.weight_bytes == layers + embedding_bytes
    whole = runtime.load(str(model), 0, TINY_LAYERS, embedding=True, head=True)
    assert (whole.info.embedding, whole.info.head) == (True, True)
    assert whole.info.weight_bytes == layers + load_edges(model).weight_bytes
    again = runtime.load(str(model), 0, TINY_LAYERS, embedding=True, head=True)
    assert not again.reloaded and again.info.weight_bytes == whole.info.weight_bytes
    assert WorkerInfo.from_proto(again.info.to_proto()) == again.info
    assert runtime.load(str(model), 0, TINY_LAYERS).reloaded  # the ends go again
    assert runtime.loaded is not None and runtime.loaded.edges is None
