"""Model facts from config.json and safetensors headers match the loaded model."""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from mlx_cluster.models.inspect import model_facts, read_safetensors_header
from mlx_cluster.models.slicing import load_edges

CASES = [
    ("llama", {}),
    ("gemma3_text", {"dtype": "bfloat16"}),
    ("deepseek_v2", {"num_layers": 3, "quantize_bits": 4}),
    ("qwen3_moe", {"num_layers": 3, "max_shard_bytes": 40_000}),
]


def _loaded_bytes(path: Path) -> tuple[list[int], int]:
    """Per-layer and total parameter bytes of the model as mlx-lm loads it."""
    model, _ = load_model(path, lazy=True)
    per_layer = [
        sum(v.nbytes for _, v in tree_flatten(layer.parameters())) for layer in model.layers
    ]
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return per_layer, total


def _cache_bytes_per_token(path: Path) -> list[int]:
    """Bytes per cached token of each layer's cache, from mlx-lm's own caches."""
    model, _ = load_model(path, lazy=True)
    cache = make_prompt_cache(model)
    model(mx.array([[1, 2, 3]]), cache=cache)
    out = []
    for c in cache:
        keys, values = c.keys, c.values  # [B, heads, tokens, dim]
        out.append(sum(a.shape[1] * a.shape[3] * a.dtype.size for a in (keys, values)))
    return out


@pytest.mark.parametrize(("model_type", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_layer_bytes_match_the_loaded_model(model_factory: Callable[..., Path], model_type, kwargs):
    path = model_factory(model_type, **kwargs)
    facts = model_facts(path)
    per_layer, total = _loaded_bytes(path)
    assert facts.num_layers == len(per_layer)
    assert facts.layer_weight_bytes == per_layer
    assert facts.edge_bytes(first=True, last=True) == total - sum(per_layer)
    assert facts.kv_bytes_per_token_per_layer == _cache_bytes_per_token(path)
    assert facts.max_context == 2048


EDGE_CASES = [
    ("llama", {}),  # tied
    ("qwen3", {}),  # untied
    ("qwen2", {"quantize_bits": 4}),  # tied, the matrix with its scales and biases
    ("deepseek_v2", {"num_layers": 3, "quantize_bits": 4}),  # untied, quantized head
    ("qwen3_moe", {"num_layers": 3, "max_shard_bytes": 40_000}),  # untied, in shards
]


def _header_bytes(path: Path, part: str) -> int:
    """Bytes of the tensors whose names hold `part`, over every weight file."""
    total = 0
    for file in path.glob("*.safetensors"):
        for name, info in read_safetensors_header(file).items():
            if part in name:
                total += info["data_offsets"][1] - info["data_offsets"][0]
    return total


@pytest.mark.parametrize(("model_type", "kwargs"), EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_edges_split_into_embedding_and_head(model_factory, model_type, kwargs):
    path = model_factory(model_type, **kwargs)
    facts = model_facts(path)
    tied = json.loads((path / "config.json").read_text())["tie_word_embeddings"]
    matrix, norm = _header_bytes(path, "embed_tokens"), _header_bytes(path, "model.norm.")
    assert facts.embedding_bytes == matrix
    if tied:
        assert facts.head_bytes == matrix + norm and facts.shared_edge_bytes == matrix
    else:
        assert facts.head_bytes == norm + _header_bytes(path, "lm_head") > norm
        assert facts.shared_edge_bytes == 0
    # what a worker holding each end loads, once each on a worker holding both
    assert facts.embedding_bytes == load_edges(path, head=False).weight_bytes
    assert facts.head_bytes == load_edges(path, embedding=False).weight_bytes
    assert facts.edge_bytes(first=True, last=True) == load_edges(path).weight_bytes


def test_a_head_absent_from_the_weights_is_tied(tiny_llama, tmp_path):
    # gemma3's way: no tie flag, no lm_head tensor
    path = _copy_with_config(
        tiny_llama, tmp_path / "m", lambda c: {**c, "tie_word_embeddings": False}
    )
    assert model_facts(path) == model_facts(tiny_llama)


def test_sharded_model_reads_every_shard(model_factory):
    path = model_factory("qwen3_moe", num_layers=3, max_shard_bytes=40_000)
    assert len(list(path.glob("model-*.safetensors"))) > 1
    whole = model_facts(model_factory("qwen3_moe", num_layers=3))
    assert model_facts(path) == whole


def test_gemma3_sliding_windows(model_factory):
    facts = model_facts(model_factory("gemma3_text", dtype="bfloat16"))
    # sliding_window_pattern 2: layers 0, 2, ... slide over 8 tokens; 1, 3, ... are global
    assert facts.kv_window == [8, None] * 4
    assert facts.kv_bytes_per_token_per_layer[0] == 2 * 2 * 16 * 2  # K+V, 2 heads of 16, bf16


def _copy_with_config(src: Path, dst: Path, edit: Callable[[dict], dict]) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit(config)))
    return dst


def test_layer_types_give_windows_and_state_layers(tiny_llama, tmp_path):
    types = ["sliding_attention", "full_attention", "linear_attention"] * 3
    path = _copy_with_config(
        tiny_llama, tmp_path / "m", lambda c: {**c, "layer_types": types, "sliding_window": 32}
    )
    facts = model_facts(path)
    assert facts.kv_window is not None and facts.kv_window[:3] == [32, None, None]
    assert facts.kv_bytes_per_token_per_layer[:3] == [256, 256, 0]  # K+V, 2 heads of 16, f32


def test_text_config_nesting_and_dtype_override(tiny_llama, tmp_path):
    def nest(config: dict) -> dict:
        return {"model_type": "wrapper", "text_config": config}

    path = _copy_with_config(tiny_llama, tmp_path / "m", nest)
    assert model_facts(path) == model_facts(tiny_llama)
    assert model_facts(path, dtype_bytes=2).kv_bytes_per_token_per_layer[0] == 128


def test_context_falls_back_when_the_config_names_none(tiny_llama, tmp_path):
    def drop(config: dict) -> dict:
        return {k: v for k, v in config.items() if k != "max_position_embeddings"}

    assert model_facts(_copy_with_config(tiny_llama, tmp_path / "m", drop)).max_context == 4096


def test_header_of_a_real_file(tiny_llama):
    header = read_safetensors_header(tiny_llama / "model.safetensors")
    assert "__metadata__" not in header
    assert any(re.search(r"layers\.7\.", name) for name in header)


def test_errors(tmp_path, tiny_llama):
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        model_facts(tmp_path)
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        model_facts(tmp_path)
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ValueError, match="header is not JSON"):
        model_facts(tmp_path)
    bad.write_bytes(b"abc")
    with pytest.raises(ValueError, match="3 bytes, too short"):
        model_facts(tmp_path)
    header = json.dumps({"lm_head.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    bad.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    with pytest.raises(ValueError, match=r"no tensors named like 'layers\.N\.' in the weights at"):
        model_facts(tmp_path)
