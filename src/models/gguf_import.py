"""Convert a llama.cpp GGUF file into a model directory that `mlx_lm.load` reads.

MLX reads GGUF itself (`mx.load`): F32, F16 and BF16 tensors come back as float arrays
(BF16 as float16), and Q4_0, Q4_1 and Q8_0 tensors already in MLX's affine layout: a uint32
`weight` packing 4 or 8 bits a value, with float16 `scales` and `biases`, one per 32 values.
This module only renames tensors to Hugging Face names, undoes llama.cpp's rotary row order
in q/k, and writes `config.json` and a `tokenizer.json` built from the file's metadata.
Converting and writing draw a bar of tensors (contract.progress).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx_lm.utils import make_shards, save_config

from mlx_cluster.contract.progress import bars
from mlx_cluster.models.gguf_tokenizer import build_tokenizer, write_tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
GROUP_SIZE = 32  # MLX unpacks every GGUF block type it reads into groups of 32 values

# ggml tensor type ids and names; MLX reads the first six (see the module docstring).
_READABLE_TYPES = {0: "F32", 1: "F16", 30: "BF16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
_OTHER_TYPES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K"}
_OTHER_TYPES |= {14: "Q6_K", 15: "Q8_K", 20: "IQ4_NL", 23: "IQ4_XS", 28: "F64"}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def import_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    progress: Callable[[str], None] | None = None,
    dtype: str | None = None,
    dequantize: bool = False,
) -> Path:
    """Convert a Llama-family GGUF file into an MLX model directory.

    Args:
        gguf_path: The `.gguf` file (tensors F32, F16, BF16, Q4_0, Q4_1 or Q8_0).
        out_dir: Directory to create; it must not exist. It appears only once complete.
        progress: Called with a short message as each stage starts.
        dtype: Float type of every float tensor, quantization scales and biases included:
            "bfloat16", "float16" or "float32". None keeps the file's float16 scales (norms
            follow them) or, in an unquantized file, each tensor's own type.
        dequantize: Expand quantized tensors into plain `dtype` weights.

    Returns:
        out_dir, which `mlx_lm.load` then reads without network access.
    """
    report = progress or (lambda _message: None)
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"Output directory {out_dir} already exists")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"Unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    _check_tensor_types(gguf_path)
    report(f"Reading {gguf_path.name}")
    loaded = mx.load(str(gguf_path), return_metadata=True)
    raw_weights, raw_metadata = cast(tuple[dict[str, mx.array], dict[str, Any]], loaded)
    metadata = {key: _plain(value) for key, value in raw_metadata.items()}
    config = model_config(metadata, raw_weights)
    with bars() as shown:
        converting = shown.add("converting tensors", len(raw_weights), "tensors")
        weights = convert_weights(raw_weights, config, converting.advance)
    float_dtype = DTYPES[dtype] if dtype is not None else _quantization_float_dtype(weights)
    if float_dtype is not None:
        weights = cast_floats(weights, float_dtype)
    if dequantize:
        weights = dequantize_weights(weights)
    if (quantization := quantization_config(weights)) is not None:
        config["quantization"] = quantization
    report("Building the tokenizer")
    tokenizer, tokenizer_config = build_tokenizer(metadata)
    report(f"Writing {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    staging.chmod(0o755)  # mkdtemp makes it private to this user
    try:
        with bars() as shown:
            writing = shown.add("writing tensors", len(weights), "tensors")
            _write_weights(staging, weights, writing.advance)
        save_config(config, staging / "config.json")
        write_tokenizer(staging, tokenizer, tokenizer_config)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


# --- file and metadata reading -------------------------------------------------------------


def _check_tensor_types(path: Path) -> None:
    """Name the first tensor MLX cannot read, before `mx.load` fails without naming it."""
    for name, type_id in _tensor_types(path):
        if type_id not in _READABLE_TYPES:
            type_name = _OTHER_TYPES.get(type_id, f"id {type_id}")
            raise ValueError(
                f"{path.name}: tensor {name!r} has ggml type {type_name}; "
                f"supported types are {sorted(_READABLE_TYPES.values())}"
            )


def _tensor_types(path: Path) -> list[tuple[str, int]]:
    """(name, ggml type id) of each tensor, from the GGUF header (format version 2 or 3)."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with path.open("rb") as f:

        def read(fmt: str) -> Any:
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def skip_value(value_type: int) -> None:
            if value_type == 8:  # string
                f.seek(read("Q"), 1)
            elif value_type == 9:  # array
                item_type, count = read("I"), read("Q")
                if item_type in sizes:
                    f.seek(sizes[item_type] * count, 1)
                else:
                    for _ in range(count):
                        skip_value(item_type)
            else:
                f.seek(sizes[value_type], 1)

        magic, version = f.read(4), read("I")
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path} is not a GGUF v2+ file (magic {magic!r}, version {version})")
        n_tensors, n_kv = read("Q"), read("Q")
        for _ in range(n_kv):
            f.seek(read("Q"), 1)
            skip_value(read("I"))
        types = []
        for _ in range(n_tensors):
            name = f.read(read("Q")).decode("utf-8")
            f.seek(8 * read("I"), 1)
            types.append((name, read("I")))
            f.seek(8, 1)  # data offset
        return types


def _plain(value: Any) -> Any:
    """Metadata from `mx.load` as Python scalars, lists and strings."""
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def model_config(metadata: dict[str, Any], weights: dict[str, mx.array]) -> dict[str, Any]:
    """mlx-lm `config.json` contents for a Llama-family GGUF."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"Unsupported GGUF architecture {arch!r}; expected {SUPPORTED_ARCHITECTURES}"
        )
    if "rope_freqs.weight" in weights:
        raise ValueError("Unsupported GGUF tensor 'rope_freqs.weight' (Llama 3.1 rope scaling)")

    def required(key: str) -> Any:
        if f"{arch}.{key}" not in metadata:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return metadata[f"{arch}.{key}"]

    heads = required("attention.head_count")
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": required("embedding_length"),
        "num_hidden_layers": required("block_count"),
        "intermediate_size": required("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": metadata.get(f"{arch}.attention.head_count_kv", heads),
        "rms_norm_eps": required("attention.layer_norm_rms_epsilon"),
        "rope_theta": metadata.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": metadata.get(f"{arch}.context_length"),
        "vocab_size": weights["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in weights,
    }
    if f"{arch}.attention.key_length" in metadata:
        config["head_dim"] = metadata[f"{arch}.attention.key_length"]
    if (rope_scaling := _rope_scaling(metadata, arch)) is not None:
        config["rope_scaling"] = rope_scaling
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in metadata:
            config[key] = metadata[f"tokenizer.ggml.{key}"]
    return config


def _rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = metadata.get(f"{arch}.rope.scaling.factor", 1.0)
    if kind == "none" or factor in (0.0, 1.0):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise ValueError(f"Unsupported GGUF rope scaling type {kind!r}; expected linear or yarn")


# --- weights -------------------------------------------------------------------------------


def hf_name(gguf_name: str) -> str:
    """The Hugging Face / mlx-lm name of a GGUF tensor, e.g. blk.3.attn_q.scales."""
    module, _, suffix = gguf_name.rpartition(".")
    parts = module.split(".")
    if suffix in ("weight", "scales", "biases"):
        if module in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[module]}.{suffix}"
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
            return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    raise ValueError(f"Unsupported GGUF tensor {gguf_name!r} for a Llama-family model")


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) for mlx-lm's half split.

    llama.cpp's convert does `w.reshape(n_heads, 2, rows // n_heads // 2, *rest)
    .swapaxes(1, 2)`; this is its inverse. Rows are whole output channels, so packed
    quantized weights, scales and biases all take the same reordering.
    """
    rows, rest = w.shape[0], w.shape[1:]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def convert_weights(
    weights: dict[str, mx.array],
    config: dict[str, Any],
    on_tensors: Callable[[int], None] = lambda _count: None,
) -> dict[str, mx.array]:
    """GGUF tensors renamed to mlx-lm names, with q/k rows in Hugging Face order;
    `on_tensors(1)` after each."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    converted = {}
    for gguf_name, w in weights.items():
        name = hf_name(gguf_name)
        projection = name.split(".")[-2]
        if projection in heads:
            w = unpermute_rows(w, heads[projection])
        if w.dtype == mx.float16 and mx.any(mx.isinf(w)).item():
            raise ValueError(f"GGUF tensor {gguf_name!r} overflows float16 as MLX reads it")
        converted[name] = w
        on_tensors(1)
    return converted


def _quantized_modules(weights: dict[str, mx.array]) -> dict[str, dict[str, int]]:
    """{module path: {"group_size", "bits"}} for each quantized tensor."""
    modules = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name.removesuffix(".scales")
            bits = weights[f"{module}.weight"].shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
            modules[module] = {"group_size": GROUP_SIZE, "bits": bits}
    return modules


def quantization_config(weights: dict[str, mx.array]) -> dict[str, Any] | None:
    """mlx-lm's `quantization` entry: the most common setting, plus per-module exceptions."""
    modules = _quantized_modules(weights)
    if not modules:
        return None
    counts = Counter(params["bits"] for params in modules.values())
    default = {"group_size": GROUP_SIZE, "bits": counts.most_common(1)[0][0]}
    exceptions = {module: params for module, params in modules.items() if params != default}
    return default | exceptions


def _quantization_float_dtype(weights: dict[str, mx.array]) -> mx.Dtype | None:
    """The dtype of the quantization scales, which the float tensors then follow."""
    scales = next((w for name, w in weights.items() if name.endswith(".scales")), None)
    return None if scales is None else scales.dtype


def cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Float tensors (scales and biases included) as `dtype`; packed weights unchanged.

    One float type throughout keeps activations from being promoted after each norm.
    """
    return {
        name: w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w
        for name, w in weights.items()
    }


def dequantize_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Quantized tensors expanded into plain weights of their scales' dtype."""
    modules = _quantized_modules(weights)
    plain = {}
    for name, w in weights.items():
        module, _, suffix = name.rpartition(".")
        if module in modules and suffix in ("scales", "biases"):
            continue
        if module in modules:
            scales, biases = weights[f"{module}.scales"], weights[f"{module}.biases"]
            params = modules[module]
            w = mx.dequantize(w, scales, biases, params["group_size"], params["bits"])
        plain[name] = w
    return plain


def _write_weights(
    directory: Path, weights: dict[str, mx.array], on_tensors: Callable[[int], None]
) -> None:
    """Safetensors shards and their index; `on_tensors(n)` after each shard of n tensors."""
    shards = make_shards(weights)
    pattern = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = pattern.format(number, len(shards))
        mx.save_safetensors(str(directory / file_name), shard, metadata={"format": "mlx"})
        on_tensors(len(shard))
        weight_map.update(dict.fromkeys(shard, file_name))
    total_size = sum(w.nbytes for w in weights.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
