"""The layer planner: proportional splits, memory fitting, KV sizing, and its errors."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_cluster import coordinator_cmd, plan_cmd
from mlx_cluster.contract.config import ClusterConfig
from mlx_cluster.contract.layers import LayerRange, split_proportional
from mlx_cluster.contract.plan import (
    GB,
    ClusterPlan,
    ModelFacts,
    PlanError,
    WorkerCapacity,
    manual_ranges,
    plan_for_config,
    plan_layers,
)
from mlx_cluster.contract.plan_report import render_plan


def uniform(
    layers: int,
    layer_gb: float = 1.0,
    kv_per_token: int = 0,
    context: int = 4096,
    embedding_gb: float = 0.0,
    head_gb: float = 0.0,
    shared_gb: float = 0.0,
):
    return ModelFacts(
        num_layers=layers,
        layer_weight_bytes=[int(layer_gb * GB)] * layers,
        embedding_bytes=int(embedding_gb * GB),
        head_bytes=int(head_gb * GB),
        kv_bytes_per_token_per_layer=[kv_per_token] * layers,
        max_context=context,
        shared_edge_bytes=int(shared_gb * GB),
    )


def workers(memory_gb: list[float], compute: list[float] | None = None) -> list[WorkerCapacity]:
    compute = compute or memory_gb
    return [
        WorkerCapacity(f"w{i}", int(m * GB), c)
        for i, (m, c) in enumerate(zip(memory_gb, compute, strict=True))
    ]


def counts(plan: ClusterPlan) -> list[int]:
    return [w.layers.count for w in plan.workers]


def plan(facts: ModelFacts, caps: list[WorkerCapacity], **kwargs: object) -> ClusterPlan:
    kwargs.setdefault("context_tokens", 1024)
    kwargs.setdefault("reserve_bytes", 0)
    return plan_layers(facts, caps, **kwargs)  # type: ignore[arg-type]


# --- proportional splits -----------------------------------------------------------------


def test_split_proportional_uses_largest_remainders():
    assert split_proportional(10, [1, 1, 1]) == [4, 3, 3]  # ties go to the earlier
    assert split_proportional(7, [0.5, 0.3, 0.2]) == [4, 2, 1]  # 3.5, 2.1, 1.4
    assert split_proportional(12, [18, 1, 1]) == [11, 1, 0]
    assert sum(split_proportional(1000, [3.3, 1.7, 0.01])) == 1000


def test_split_proportional_rejects_zero_weights():
    with pytest.raises(ValueError, match=r"not all zero, got \[0, 0\]"):
        split_proportional(4, [0, 0])


def test_equal_workers_get_equal_layers():
    assert counts(plan(uniform(12), workers([64, 64, 64]))) == [4, 4, 4]


def test_memory_two_one_one_gives_layers_two_one_one():
    # compute defaults to memory when a config gives none (see capacities_from_config)
    assert counts(plan(uniform(16), workers([32, 16, 16]))) == [8, 4, 4]


def test_extreme_imbalance():
    assert counts(plan(uniform(20), workers([90, 90, 90], [18, 1, 1]))) == [18, 1, 1]
    # 12 layers would round to [11, 1, 0]: every worker keeps at least one layer
    assert counts(plan(uniform(12), workers([90, 90, 90], [18, 1, 1]))) == [10, 1, 1]


def test_memory_overrides_compute_when_the_proportional_split_does_not_fit():
    # equal compute asks for [4, 4, 4]; the small workers hold 3 layers of 1 GB each
    caps = workers([6, 3.5, 3.5], [1, 1, 1])
    assert counts(plan(uniform(12), caps)) == [6, 3, 3]


def test_reserve_and_kv_count_against_memory():
    facts = uniform(4, layer_gb=1.0, kv_per_token=250_000)  # 1024 tokens: 0.256 GB a layer
    caps = workers([2.6, 2.6], [1, 1])
    assert counts(plan(facts, caps)) == [2, 2]  # 2 + 0.512 GB fits 2.6
    with pytest.raises(PlanError):
        plan(facts, caps, reserve_bytes=GB // 10)  # 2.612 GB does not


# --- errors --------------------------------------------------------------------------------


def test_model_that_fits_nowhere_lists_every_worker():
    facts = uniform(8, layer_gb=1.5, kv_per_token=100_000, embedding_gb=0.5, head_gb=0.5)
    with pytest.raises(PlanError) as info:
        plan(facts, workers([6, 4]), context_tokens=8192, reserve_bytes=GB)
    message = str(info.value)
    # context capped at the model's 4096; KV 8 layers * 0.1 MB * 4096 tokens
    assert (
        "model needs 12.0 GB of layer weights + 1.0 GB of edges (embedding, head) + "
        "3.3 GB KV for 4096 tokens" in message
    )
    assert "(+ 1.0 GB reserve per worker); the 2 workers have 10.0 GB usable in all" in message
    # the 3:2 split: 5 * 1.5 + 5 * 0.4096 + 0.5 + 1 and 3 * 1.5 + 3 * 0.4096 + 0.5 + 1
    assert "w0: layers [0, 5) + embedding 0.5 GB need 11.0 GB, 6.0 GB usable" in message
    assert "w1: layers [5, 8) + head 0.5 GB need 7.2 GB, 4.0 GB usable" in message


def test_a_layer_larger_than_any_worker():
    facts = ModelFacts(3, [GB, 9 * GB, GB], 0, 0, [0, 0, 0], 2048)
    with pytest.raises(PlanError, match="w1: layers"):
        plan(facts, workers([8, 8, 8]))


def test_fewer_layers_than_workers():
    with pytest.raises(PlanError, match="model has 2 layers, fewer than the 3 workers"):
        plan(uniform(2), workers([8, 8, 8]))


def test_manual_ranges_are_kept_when_they_fit():
    manual = manual_ranges([(0, 1), (1, 8)], 8)
    assert counts(plan(uniform(8), workers([8, 8]), manual=manual)) == [1, 7]


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([(0, 4), (3, 8)], "overlap at layer 4"),
        ([(0, 4), (5, 8)], "gap at layer 4"),
        ([(0, 4), (4, 7)], "end at 7, model has 8 layers"),
    ],
)
def test_manual_ranges_that_overlap_or_leave_a_gap(pairs, message):
    with pytest.raises(PlanError, match=message):
        plan(uniform(8), workers([8, 8]), manual=manual_ranges(pairs, 8))


def test_manual_range_past_the_model():
    with pytest.raises(PlanError, match=r"\[4, 9\) is not inside the model's 8 layers"):
        manual_ranges([(0, 4), (4, 9)], 8)


def test_manual_ranges_that_do_not_fit():
    manual = manual_ranges([(0, 6), (6, 8)], 8)
    with pytest.raises(PlanError, match=r"w0: layers \[0, 6\) need 6.0 GB, 4.0 GB usable"):
        plan(uniform(8), workers([4, 8]), manual=manual)


# --- KV sizing -------------------------------------------------------------------------------


def test_kv_tokens_from_what_is_left():
    facts = uniform(4, layer_gb=1.0, kv_per_token=1_000_000)
    result = plan(facts, workers([5, 5]), context_tokens=100, reserve_bytes=GB, kv_fraction=0.5)
    # 5 - 2 weights - 1 reserve = 2 GB free; half of it for KV; 2 MB a token
    assert [w.kv_tokens for w in result.workers] == [500, 500]
    assert result.context_tokens == 100
    assert result.workers[0].memory_fraction == pytest.approx(4 / 5)


def test_kv_budget_never_below_the_planned_context():
    facts = uniform(4, layer_gb=1.0, kv_per_token=1_000_000)
    result = plan(facts, workers([5, 5]), context_tokens=800, reserve_bytes=GB, kv_fraction=0.1)
    assert [w.kv_tokens for w in result.workers] == [800, 800]
    assert result.workers[0].memory_bytes_used == int(2 * GB + 1.6 * GB + GB)


def test_kv_budget_bytes_and_memory_fraction():
    facts = uniform(2, layer_gb=1.0, kv_per_token=1_000_000)
    result = plan(facts, workers([10, 10]), context_tokens=100, kv_budget_bytes=GB)
    assert [w.kv_tokens for w in result.workers] == [1000, 1000]  # 1 GB at 1 MB a token
    assert result.workers[0].memory_fraction == pytest.approx(0.2)


def test_context_is_capped_by_the_model():
    result = plan(uniform(2, kv_per_token=10, context=2048), workers([8, 8]), context_tokens=10**6)
    assert result.context_tokens == 2048


def test_sliding_window_layers_are_charged_their_window():
    # 4 layers of 1 GB; each full layer holds 1 MB a token, sliding ones at most 128 tokens
    windows = [128, None, 128, None]
    facts = ModelFacts(4, [GB] * 4, 0, 0, [1_000_000] * 4, 4096, kv_window=windows)
    caps = workers([3.2, 3.2], [1, 1])
    # per worker: 2 GB + 1 global layer * 1024 tokens + 128 tokens = 3.15 GB
    result = plan(facts, caps, context_tokens=1024)
    assert counts(result) == [2, 2]
    with pytest.raises(PlanError):
        plan(uniform(4, kv_per_token=1_000_000), caps, context_tokens=1024)  # 4.05 GB each


def test_plan_for_config_maps_kv_and_manual_layers():
    config = ClusterConfig.model_validate(
        {
            "model": "m",
            "workers": [
                {"address": "a:1", "layers": [0, 3]},
                {"address": "b:1", "layers": [3, 4]},
            ],
            "kv": {"max_session_tokens": 4096, "max_sequence_length": 100, "memory_gb": 0.001},
            "reserve_gb": 0.5,
        }
    )
    facts = uniform(4, kv_per_token=1000)
    result = plan_for_config(facts, config, workers([8, 8]))
    assert counts(result) == [3, 1]
    assert result.context_tokens == 100
    assert [w.kv_tokens for w in result.workers] == [333, 1000]  # 1 MB over 3 layers, 1
    assert result.workers[1].memory_bytes_used == GB + GB // 1000 + GB // 2


def test_an_explicit_kv_budget_is_every_workers_and_must_hold_one_session():
    spec = {"model": "m", "workers": ["a:1", "b:1"], "kv": {"max_session_tokens": 512}}
    facts = uniform(4, kv_per_token=1000)
    spec["kv"]["budget_tokens"] = 2048  # type: ignore[index]
    result = plan_for_config(facts, ClusterConfig.model_validate(spec), workers([8, 8]))
    assert [w.kv_tokens for w in result.workers] == [2048, 2048]
    assert result.context_tokens == 512
    spec["kv"]["budget_tokens"] = 300  # type: ignore[index]
    with pytest.raises(PlanError, match=r"kv.budget_tokens \(300\) cannot hold one session of 512"):
        plan_for_config(facts, ClusterConfig.model_validate(spec), workers([8, 8]))


# --- the edges: the embedding on the first worker, the final norm and head on the last ----------


def test_the_first_and_last_workers_hold_the_edges():
    facts = uniform(6, kv_per_token=1_000_000, embedding_gb=0.5, head_gb=0.25)
    result = plan(facts, workers([10, 10, 10]), context_tokens=100, kv_fraction=0.5)
    assert counts(result) == [2, 2, 2]  # memory does not bind: compute decides
    assert [w.edge_weight_bytes for w in result.workers] == [GB // 2, 0, GB // 4]
    assert [(w.holds_embedding, w.holds_head) for w in result.workers] == [
        (True, False),
        (False, False),
        (False, True),
    ]
    # the edges come out of the KV share: (10 - 2 - edges) / 2 GB at 2 MB a token
    assert [w.kv_tokens for w in result.workers] == [1875, 2000, 1937]
    assert result.workers[0].memory_bytes_used == 2 * GB + GB // 2 + int(3.75 * GB)


def test_edges_move_layers_off_the_first_worker_when_memory_binds():
    caps = workers([4, 8], [1, 1])  # equal compute asks for [4, 4]
    assert counts(plan(uniform(8), caps)) == [4, 4]
    assert counts(plan(uniform(8, embedding_gb=1), caps)) == [3, 5]
    assert counts(plan(uniform(8, head_gb=1), workers([8, 4], [1, 1]))) == [5, 3]


def test_a_split_that_fits_only_without_the_edges_names_them():
    caps = workers([4, 4])
    assert counts(plan(uniform(8), caps)) == [4, 4]
    with pytest.raises(PlanError) as info:
        plan(uniform(8, embedding_gb=0.5, head_gb=0.5), caps)
    message = str(info.value)
    assert "w0: layers [0, 4) + embedding 0.5 GB need 4.5 GB, 4.0 GB usable" in message
    assert "w1: layers [4, 8) + head 0.5 GB need 4.5 GB, 4.0 GB usable" in message
    manual = manual_ranges([(0, 4), (4, 8)], 8)
    with pytest.raises(PlanError, match=r"w0: layers \[0, 4\) \+ embedding 0.5 GB need 4.5 GB"):
        plan(uniform(8, embedding_gb=0.5), caps, manual=manual)


def test_tied_and_untied_heads():
    # the head: a 1 GB matrix and a 1 MB final norm; a tied one is the embedding matrix
    untied = uniform(6, embedding_gb=1, head_gb=1.001)
    tied = uniform(6, embedding_gb=1, head_gb=1.001, shared_gb=1)
    head = untied.head_bytes
    for facts in (untied, tied):  # two workers: each end's worker has its own copy
        result = plan(facts, workers([8, 8]))
        assert [w.edge_weight_bytes for w in result.workers] == [GB, head]
    # one worker holds both ends: a tied matrix once
    assert untied.edge_bytes(first=True, last=True) == GB + head
    (alone,) = plan(tied, workers([8])).workers
    assert (alone.holds_embedding, alone.holds_head) == (True, True)
    assert alone.edge_weight_bytes == head
    assert counts(plan(tied, workers([7.5]))) == [6]  # 6 GB of layers + 1.001 GB
    with pytest.raises(PlanError, match=r"\[0, 6\) \+ embedding and head 2.0 GB need 8.0 GB, 7.5"):
        plan(untied, workers([7.5]))


def test_a_draft_model_weighs_on_the_first_worker():
    facts = dataclasses.replace(uniform(8, embedding_gb=0.5), draft_bytes=2 * GB)
    result = plan(facts, workers([5, 8]))
    assert [w.edge_weight_bytes for w in result.workers] == [int(2.5 * GB), 0]
    assert counts(result) == [2, 6]  # 2.5 GB of edges leave room for 2 layers of 1 GB
    assert counts(plan(uniform(8, embedding_gb=0.5), workers([5, 8]))) == [3, 5]


def test_shared_edge_bytes_must_be_in_both_ends():
    with pytest.raises(ValueError, match="shared_edge_bytes 2 must be >= 0 and part of both"):
        ModelFacts(1, [1], 1, 3, [0], 8, shared_edge_bytes=2)


# --- property: every layer exactly once --------------------------------------------------------


def _fits(facts: ModelFacts, caps: list[WorkerCapacity], bounds: tuple[int, ...]) -> bool:
    last = len(caps) - 1
    for k, (cap, (a, b)) in enumerate(zip(caps, itertools.pairwise(bounds), strict=True)):
        need = sum(facts.layer_weight_bytes[a:b]) + sum(facts.kv_bytes_per_token_per_layer[a:b])
        need += (facts.embedding_bytes if k == 0 else 0) + (facts.head_bytes if k == last else 0)
        need -= facts.shared_edge_bytes if k == 0 == last else 0
        if need > cap.memory_bytes:
            return False
    return True


def _any_split_fits(facts: ModelFacts, caps: list[WorkerCapacity]) -> bool:
    n, m = facts.num_layers, len(caps)
    for cuts in itertools.combinations(range(1, n), m - 1):
        if _fits(facts, caps, (0, *cuts, n)):
            return True
    return False


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(1, 100), min_size=1, max_size=10),
    st.lists(st.tuples(st.integers(0, 600), st.floats(0.1, 20)), min_size=1, max_size=4),
    st.integers(0, 5),
    st.tuples(st.integers(0, 60), st.integers(0, 60), st.booleans()),
)
def test_every_layer_is_assigned_exactly_once(layer_sizes, caps_spec, kv, edges):
    n = len(layer_sizes)
    embedding, norm_and_head, tied = edges  # a tied head is the embedding matrix and a norm
    head = embedding + norm_and_head if tied else norm_and_head
    shared = embedding if tied else 0
    # context 1: KV is kv bytes a layer
    facts = ModelFacts(n, layer_sizes, embedding, head, [kv] * n, 1, shared_edge_bytes=shared)
    caps = [WorkerCapacity(f"w{i}", m, c) for i, (m, c) in enumerate(caps_spec)]
    try:
        result = plan(facts, caps, context_tokens=1)
    except PlanError:
        assert n < len(caps) or not _any_split_fits(facts, caps)  # nothing fits, truly
        return
    ranges = [w.layers for w in result.workers]
    assert [r.start for r in ranges] == [0, *(r.end for r in ranges[:-1])]
    assert ranges[-1].end == n and all(r.count >= 1 for r in ranges)
    assert result.workers[0].edge_weight_bytes >= embedding
    assert result.workers[-1].edge_weight_bytes >= head - shared
    for cap, w in zip(caps, result.workers, strict=True):
        assert w.memory_bytes_used <= cap.memory_bytes
        assert w.kv_tokens >= result.context_tokens == 1
    ideal = [max(c, 1) for c in split_proportional(n, [c for _, c in caps_spec])]
    if sum(ideal) == n and _fits(facts, caps, (0, *itertools.accumulate(ideal))):
        assert counts(result) == ideal  # the proportional split is kept when it fits


# --- output and the plan command ----------------------------------------------------------------


def test_render_plan_table_and_json():
    facts = uniform(4, kv_per_token=1000, embedding_gb=0.094, head_gb=1.5)
    result = plan(facts, workers([8, 4]))
    table = render_plan(result)
    lines = table.splitlines()
    assert lines[0] == "worker  layers  weights GB  edges              KV tokens  memory use"
    assert lines[1].startswith("w0      [0, 3)  3.00        + embedding 94 MB")
    assert lines[2].startswith("w1      [3, 4)  1.00        + head 1.50 GB")
    assert lines[3] == "context: 1024 tokens; the coordinator holds no weights"
    data = json.loads(render_plan(result, json=True))
    assert data["workers"][1]["layers"] == [3, 4]
    assert data["workers"][1]["edge_weight_bytes"] == 1.5 * GB
    assert [(w["holds_embedding"], w["holds_head"]) for w in data["workers"]] == [
        (True, False),
        (False, True),
    ]
    assert data["context_tokens"] == 1024
    alone = render_plan(plan(facts, workers([8])))
    assert "+ embedding and head 1.59 GB" in alone


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    plan_cmd.add_parsers(sub)
    return plan_cmd.run(parser.parse_args(argv))


def test_plan_command_on_a_real_model(model_factory: Callable[..., Path], tmp_path, capsys):
    model = model_factory("llama")
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"model: {model}\nworkers:\n"
        "  - {address: 'a:1', memory_gb: 2}\n  - {address: 'b:1', memory_gb: 1}\n"
        "reserve_gb: 0.5\n"
    )
    assert _run(["plan", "--config", str(config), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [w["layers"] for w in data["workers"]] == [[0, 5], [5, 8]]  # 2:1 memory
    assert data["context_tokens"] == 2048  # the model's max_position_embeddings
    # tied: the first worker holds the embedding matrix, the last a copy and the final norm
    edges = [w["edge_weight_bytes"] for w in data["workers"]]
    assert 0 < edges[0] < edges[1]
    assert _run(["plan", "--config", str(config), "--set", "kv.max_session_tokens=512"]) == 0
    out = capsys.readouterr().out
    assert "context: 512 tokens" in out and "+ embedding " in out and "+ head " in out


def test_plan_command_needs_memory_for_every_worker(model_factory, tmp_path, capsys):
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"model: {model_factory('llama')}\n"
        "workers:\n  - {address: 'a:1', memory_gb: 2}\n  - {address: 'b:1', name: mini}\n"
    )
    assert _run(["plan", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "workers[1] (mini) has no memory_gb" in err


def test_plan_command_names_a_model_it_cannot_find(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLX_CLUSTER_HOME", str(tmp_path))  # an empty model cache
    config = tmp_path / "cluster.yaml"
    config.write_text("model: org/some-model\nworkers: ['a:1']\n")
    assert _run(["plan", "--config", str(config)]) == 2  # HF_HUB_OFFLINE=1 in tests
    err = capsys.readouterr().err
    assert "'org/some-model' is not in the Hugging Face cache, and HF_HUB_OFFLINE is set" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["plan", "config show", "coordinator"])
def test_malformed_set_is_a_clean_error(command, tmp_path, capsys):
    config = tmp_path / "cluster.yaml"
    config.write_text("model: m\nworkers: ['a:1']\n")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    plan_cmd.add_parsers(sub)
    coordinator_cmd.add_parser(sub)
    args = parser.parse_args([*command.split(), "--config", str(config), "--set", "foo"])
    runner = coordinator_cmd.run if command == "coordinator" else plan_cmd.run
    assert runner(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mlx-cluster {args.command}: --set expects KEY=VALUE, got 'foo'")
    assert "Traceback" not in err


def test_config_show_prints_sources(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .env here
    config = tmp_path / "cluster.yaml"
    config.write_text("model: m\nworkers: ['a:1']\n")
    monkeypatch.setenv("MLX_CLUSTER_KV__SESSION_TTL_S", "60")
    assert _run(["config", "show", "--config", str(config), "--set", "reserve_gb=3"]) == 0
    out = capsys.readouterr().out
    assert f"model: m  # file:{config}" in out
    assert "session_ttl_s: 60.0  # env:MLX_CLUSTER_KV__SESSION_TTL_S" in out
    assert "reserve_gb: 3.0  # cli" in out
    assert "max_session_tokens: 8192  # default" in out


def test_layer_range_type_is_the_contract_one():
    assert manual_ranges([(0, 2)], 2) == [LayerRange(0, 2, 2)]
