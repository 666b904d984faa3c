"""A model's sizes, per layer, read from config.json and safetensors headers only.

Nothing here loads a weight or imports MLX: the planner must size a model that may
not fit on the machine running it. A safetensors file starts with a little-endian
u64 header length and a JSON header giving each tensor's dtype, shape and byte
offsets, which is all we need.

Tensors outside the decoder layers are the model's edges: the token embedding
(the first worker's) and the final norm and LM head (the last worker's; a tied
model's head is the embedding matrix, so the last worker holds it too).

KV bytes per token follow the caches mlx-lm builds (approximations noted inline):
- attention with `num_key_value_heads` heads of `head_dim`: 2 * heads * head_dim;
- deepseek_v2: mlx-lm caches full per-head keys (qk_nope + qk_rope) and values
  (v_head_dim) for all `num_attention_heads`;
- other multi-head latent attention (deepseek_v3 and kin, any config with
  `kv_lora_rank`): the latent, kv_lora_rank + qk_rope_head_dim, as one head;
- layer types other than full or sliding attention (linear attention, SSM) keep a
  fixed-size state and are counted as 0 bytes per token;
- sliding-window layers (`layer_types`, or gemma3's `sliding_window_pattern`) hold
  at most `sliding_window` tokens (mlx-lm's rotating cache briefly holds a chunk more).
All times the activation dtype's bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from mlx_cluster.contract.plan import ModelFacts
from mlx_cluster.models.shards import INDEX_FILE, LAYER_KEY

# Towers of multimodal checkpoints that mlx-lm's text models drop when loading.
_NOT_TEXT = ("vision", "audio", "multi_modal")
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
DEFAULT_CONTEXT = 4096  # for configs that name no context length (as the coordinator does)


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of one safetensors file: name -> {dtype, shape, data_offsets}.

    Raises:
        ValueError: if the file is too short or its header is not a safetensors header.
    """
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: {len(prefix)} bytes, too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER:
            raise ValueError(f"{path}: header length {length} is over {_MAX_HEADER} bytes")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: the safetensors header is not JSON: {exc}") from exc
    header.pop("__metadata__", None)
    return header


def weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        # A host holding part of a model id has only some shards: read what is here.
        present = [path / n for n in sorted(set(weight_map.values())) if (path / n).is_file()]
        if not present:
            raise FileNotFoundError(f"none of the shards listed in {index} is present")
        return present
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    return files


def _text_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no model at {path}: config.json is missing")
    config: dict[str, Any] = json.loads(config_file.read_text())
    # Multimodal configs nest the language model's fields; those win.
    return {**config, **config.get("text_config", {})}


# --- weights ---------------------------------------------------------------------------


def _tensor_table(path: Path) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for file in weight_files(path):
        table.update(read_safetensors_header(file))
    return table


def edge_part(name: str) -> str:
    """Which part of the model's ends a tensor outside the decoder layers belongs to."""
    if "embed_tokens" in name:
        return "embedding"  # the token embedding matrix (and a quantized one's scales, biases)
    if "lm_head" in name:
        return "lm_head"
    if "norm" in name:
        return "norm"  # outside the layers: the final norm
    return "other"


def _bytes_per_part(
    table: dict[str, dict[str, Any]], num_layers: int
) -> tuple[list[int], dict[str, int]]:
    """(bytes of each layer, bytes of each `edge_part`) over the tensors a text model loads."""
    layers = [0] * num_layers
    parts = dict.fromkeys(("embedding", "lm_head", "norm", "other"), 0)
    for name, info in table.items():
        if any(part in name for part in _NOT_TEXT):
            continue
        start, end = info["data_offsets"]
        match = LAYER_KEY.search(name)
        if match is None:
            parts[edge_part(name)] += end - start
        elif int(match.group(1)) < num_layers:  # mlx-lm drops extra (MTP) layers
            layers[int(match.group(1))] += end - start
    return layers, parts


def _edge_bytes(parts: dict[str, int], tied: bool) -> tuple[int, int, int]:
    """(embedding, head, shared) bytes, as in ModelFacts, from the bytes of each part.

    A tied head is the embedding matrix. A worker loading either end keeps every
    tensor outside the layers that belongs to neither (none in the supported
    architectures), so both ends count those.
    """
    matrix, other = parts["embedding"], parts["other"]
    head = parts["norm"] + (matrix if tied else parts["lm_head"])
    return matrix + other, head + other, (matrix if tied else 0) + other


def _is_tied(path: Path, table: dict[str, dict[str, Any]], config: dict[str, Any]) -> bool:
    """Whether the LM head is the embedding matrix, as mlx-lm decides when loading.

    mlx-lm ties on the config's flag, or (gemma3) when the weights have no lm_head;
    the index names every tensor, also those in shards not on this host.
    """
    if config.get("tie_word_embeddings"):
        return True
    index = path / INDEX_FILE
    names = json.loads(index.read_text())["weight_map"] if index.is_file() else table
    return not any("lm_head" in name for name in names)


def _fill_missing_layers(path: Path, layers: list[int], edges: int) -> list[int]:
    """Estimate the layers whose shards are not on this host (a model id fetched in part).

    Layers with every shard present give the typical size; without any, the
    index's total size is shared out.
    """
    index = path / INDEX_FILE
    if not index.is_file():
        return layers
    data = json.loads(index.read_text())
    incomplete = {
        int(m.group(1))
        for name, shard in data["weight_map"].items()
        if (m := LAYER_KEY.search(name)) and not (path / shard).is_file()
    }
    incomplete = {i for i in incomplete if i < len(layers)}
    if not incomplete:
        return layers
    complete = sorted(b for i, b in enumerate(layers) if i not in incomplete and b)
    if complete:
        typical = complete[len(complete) // 2]
    else:
        total = data.get("metadata", {}).get("total_size")
        if not total:
            raise ValueError(f"no tensors named like 'layers.N.' in the weights at {path}")
        typical = max(int(total) - edges, 0) // len(layers)
    return [typical if i in incomplete else b for i, b in enumerate(layers)]


def _activation_bytes(table: dict[str, dict[str, Any]], config: dict[str, Any]) -> int:
    """Bytes of one activation value: norm weights keep the activation dtype, even quantized."""
    for name, info in table.items():
        if "norm" in name and info["dtype"] in _FLOAT_BYTES:
            return _FLOAT_BYTES[info["dtype"]]
    dtype = config.get("torch_dtype") or config.get("dtype")
    return _TORCH_DTYPE_BYTES.get(str(dtype), 2)


# --- KV cache --------------------------------------------------------------------------


def _kv_values_per_token(config: dict[str, Any]) -> int:
    """K and V values one token adds to one attention layer (see the module docstring)."""
    heads = int(config["num_attention_heads"])
    if config.get("model_type") == "deepseek_v2":
        key_dim = int(config["qk_nope_head_dim"]) + int(config["qk_rope_head_dim"])
        return heads * (key_dim + int(config["v_head_dim"]))
    if config.get("kv_lora_rank"):
        return int(config["kv_lora_rank"]) + int(config["qk_rope_head_dim"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return 2 * kv_heads * head_dim


def _layer_kinds(config: dict[str, Any], num_layers: int) -> list[str]:
    """Each layer's kind: "full", "sliding" or "state"."""
    if isinstance(config.get("layer_types"), list):
        names = {"full_attention": "full", "sliding_attention": "sliding"}
        return [names.get(t, "state") for t in config["layer_types"][:num_layers]]
    if str(config.get("model_type", "")).startswith("gemma3"):
        pattern = int(config.get("sliding_window_pattern", 6))  # mlx-lm's default
        return ["full" if i % pattern == pattern - 1 else "sliding" for i in range(num_layers)]
    return ["full"] * num_layers


# --- public API ------------------------------------------------------------------------


def model_facts(path: Path, dtype_bytes: int | None = None) -> ModelFacts:
    """Per-layer weight and KV sizes of the model directory at `path`, without loading it.

    Args:
        path: A Hugging Face / mlx-lm model directory (config.json + safetensors).
        dtype_bytes: Bytes of one activation value, if known; default: the dtype of
            the checkpoint's norm weights, else config's torch_dtype, else 2.

    Raises:
        FileNotFoundError: no config.json or no safetensors files.
        ValueError: a malformed header, or no per-layer tensors.
    """
    config = _text_config(path)
    num_layers = int(config["num_hidden_layers"])
    table = _tensor_table(path)
    layer_bytes, parts = _bytes_per_part(table, num_layers)
    layer_bytes = _fill_missing_layers(path, layer_bytes, sum(parts.values()))
    embedding, head, shared = _edge_bytes(parts, _is_tied(path, table, config))
    if not any(layer_bytes):
        raise ValueError(f"no tensors named like 'layers.N.' in the weights at {path}")
    value_bytes = dtype_bytes or _activation_bytes(table, config)
    per_token = _kv_values_per_token(config) * value_bytes
    kinds = _layer_kinds(config, num_layers)
    window = config.get("sliding_window")
    windows: list[int | None] = [
        int(window) if kind == "sliding" and window else None for kind in kinds
    ]
    return ModelFacts(
        num_layers=num_layers,
        layer_weight_bytes=layer_bytes,
        embedding_bytes=embedding,
        head_bytes=head,
        kv_bytes_per_token_per_layer=[0 if k == "state" else per_token for k in kinds],
        max_context=int(config.get("max_position_embeddings") or DEFAULT_CONTEXT),
        kv_window=windows if any(w is not None for w in windows) else None,
        shared_edge_bytes=shared,
    )
