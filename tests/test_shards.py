"""Hosts open only the shards they need: every other shard is garbage here, and loading works."""

from __future__ import annotations

import shutil

import mlx.core as mx

from mlx_cluster.models.shards import shards_for, weight_map
from mlx_cluster.models.slicing import load_edges, load_layer_slice


def corrupt_all_but(model, keep: set[str], tmp_path):
    """A copy of `model` whose shards outside `keep` are garbage bytes."""
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    spoiled = []
    for shard in copy.glob("*.safetensors"):
        if shard.name not in keep:
            shard.write_bytes(b"\xde\xad" * 1000)
            spoiled.append(shard.name)
    return copy, spoiled


def test_a_worker_reads_only_the_shards_of_its_layers(model_factory, tmp_path):
    model = model_factory("llama", max_shard_bytes=120_000)
    weights = weight_map(model)
    assert weights is not None
    keep = shards_for(weights, layers=range(2, 4))
    copy, spoiled = corrupt_all_but(model, keep, tmp_path)
    assert len(spoiled) >= 2, "the test needs shards the slice does not use"
    part = load_layer_slice(copy, 2, 4)
    whole = load_layer_slice(model, 2, 4)
    x = mx.random.normal((1, 5, 64))
    assert mx.array_equal(part(x, part.make_caches()), whole(x, whole.make_caches()))


def test_the_coordinator_reads_only_the_shards_of_the_edges(model_factory, tmp_path):
    model = model_factory("llama", max_shard_bytes=120_000)
    weights = weight_map(model)
    assert weights is not None
    copy, spoiled = corrupt_all_but(model, shards_for(weights, edges=True), tmp_path)
    assert spoiled
    edges = load_edges(copy)
    tokens = mx.array([[3, 5, 7]])
    assert mx.array_equal(edges.embed(tokens), load_edges(model).embed(tokens))


def test_layer_keys_pick_shards():
    weights = {
        "model.embed_tokens.weight": "a",
        "model.layers.0.mlp.up_proj.weight": "a",
        "model.layers.1.mlp.up_proj.weight": "b",
        "model.layers.12.mlp.up_proj.weight": "c",
        "model.norm.weight": "c",
    }
    assert shards_for(weights, layers=range(1, 2)) == {"b"}
    assert shards_for(weights, layers=range(12, 13)) == {"c"}
    assert shards_for(weights, edges=True) == {"a", "c"}
