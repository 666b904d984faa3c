"""Build mlx-lm model directories with random weights, for tests and benchmarks.

A built directory holds `config.json`, safetensors weights (optionally quantized
and/or split into shards) and, optionally, a small byte-level BPE tokenizer, so
that `mlx_lm.load(out_dir)` works offline. The model is built with mlx-lm's own
classes and saved with its own writers; the same arguments give the same bytes.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, get_total_parameters, quantize_model, save_config, save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

HEAD_DIM = 16  # every architecture gets heads of this width; hidden_size sets their count
EMBED_STD = 0.02  # small next to the layers' outputs, so tied heads do not echo the input
VOCAB_MULTIPLE = 64  # default vocab_size: the tokenizer's size rounded up to this

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
TOKENIZER_VOCAB = 384  # 256 bytes, 3 special tokens, the rest BPE merges

# --- architecture table ---------------------------------------------------------------

# Fields shared by all architectures; hidden-size-dependent ones are added by _make_config.
_COMMON: dict[str, Any] = {
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}

# Per-architecture small configs, in the HF field names that each ModelArgs reads.
_BASE_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": True},
    "mistral": {"rope_theta": 1e6},
    "qwen2": {"rope_theta": 1e6, "tie_word_embeddings": True},
    "qwen3": {"rope_theta": 1e6},
    "phi3": {},
    "gemma3_text": {
        "sliding_window": 8,
        "sliding_window_pattern": 2,  # layers 0, 2 sliding; 1, 3 global
        "query_pre_attn_scalar": HEAD_DIM,
        "rope_local_base_freq": 10000.0,
        "tie_word_embeddings": True,  # mlx-lm ties gemma3 when lm_head.weight is absent
    },
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],  # layer 0 dense, the rest MoE
        "norm_topk_prob": True,
    },
    "deepseek_v2": {
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,  # layer 0 dense, the rest MoE
        "moe_layer_freq": 1,
        "topk_method": "greedy",
        "kv_lora_rank": 32,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": HEAD_DIM,
        "v_head_dim": HEAD_DIM,
        # mlx-lm's MLA always builds a YaRN rope; factor 1 makes it plain rope.
        "rope_scaling": {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 2048},
    },
}


def _make_config(
    model_type: str, num_layers: int, hidden_size: int, vocab_size: int, special_ids: dict[str, int]
) -> dict[str, Any]:
    if hidden_size % (2 * HEAD_DIM) != 0:
        raise ValueError(f"hidden_size must be a multiple of {2 * HEAD_DIM}, got {hidden_size}")
    num_heads = hidden_size // HEAD_DIM
    return {
        **_COMMON,
        "model_type": model_type,
        "num_hidden_layers": num_layers,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads // 2,
        "head_dim": HEAD_DIM,
        "vocab_size": vocab_size,
        "eos_token_id": special_ids[EOS_TOKEN],
        # HF config classes default these to ids outside a small vocabulary (phi3 pad: 32000).
        "pad_token_id": special_ids[PAD_TOKEN],
        "bos_token_id": None,
        **_BASE_CONFIGS.get(model_type, {}),
    }


# --- weights --------------------------------------------------------------------------


def _parameters(model: nn.Module) -> dict[str, mx.array]:
    params: dict[str, mx.array] = {}
    tree_flatten(model.parameters(), destination=params)
    return params


def _random_weights(model: nn.Module) -> dict[str, mx.array]:
    """Normal weights for every matrix (fan-in scaled), norms and biases as mlx inits them."""
    weights = {}
    for name, value in _parameters(model).items():
        if value.ndim < 2 or not mx.issubdtype(value.dtype, mx.floating):
            weights[name] = value
            continue
        std = EMBED_STD if "embed" in name else value.shape[-1] ** -0.5
        weights[name] = mx.random.normal(value.shape) * std
    return weights


def _build_model(config: dict[str, Any], dtype: mx.Dtype, seed: int) -> nn.Module:
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)  # before construction: biases keep mlx's (random) init
    model = model_class(args_class.from_dict(config))
    weights = _random_weights(model)
    # Architectures without a tie flag (gemma3) tie when lm_head.weight is absent.
    tie_flag = "tie_word_embeddings" in inspect.signature(args_class).parameters
    if config.get("tie_word_embeddings") and not tie_flag:
        weights.pop("lm_head.weight", None)
    # Go through sanitize as mlx_lm.load_model does, so both build the same module tree.
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    model.set_dtype(dtype)
    model.eval()
    mx.eval(model.parameters())
    return model


def _quantize(
    model: nn.Module, config: dict[str, Any], bits: int
) -> tuple[nn.Module, dict[str, Any]]:
    if bits not in (4, 8):
        raise ValueError(f"quantize_bits must be 4 or 8, got {bits}")
    group_size = 64 if config["hidden_size"] % 64 == 0 else 32
    with contextlib.redirect_stdout(io.StringIO()):  # it prints bits per weight
        return quantize_model(model, config, group_size=group_size, bits=bits)


def _save_sharded(model: nn.Module, out_dir: Path, max_shard_bytes: int) -> None:
    """Write shards and an index in save_model's layout (its make_shards takes whole GiB)."""
    weights = _parameters(model)
    shards: list[dict[str, mx.array]] = []
    size = 0
    for name, value in weights.items():
        if not shards or size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out_dir / file_name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, file_name))
    index = {
        "metadata": {
            "total_size": sum(v.nbytes for v in weights.values()),
            "total_parameters": get_total_parameters(model),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


# --- tokenizer ------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model reads a sequence of
tokens and predicts the next one. When the model is too large for one machine, its
layers can be split across several hosts: the first host embeds the prompt, each host
runs its share of the layers, and the last host turns the hidden state into logits.

Pipeline parallelism sends activations from one stage to the next. Every stage keeps
its own key and value cache, so that during decoding only one new token travels
through the pipeline at each step. The coordinator samples the next token and starts
the following step, until the model writes an end of text token or reaches the limit.

Tests should be small and fast. A tiny model with random weights has the same shapes
and code paths as a real one, and it gives the same logits on one process as on many,
which is exactly what an equivalence test needs. Numbers such as 0, 1, 2, 42 and 2048
appear in logs; punctuation like commas, colons; and (parentheses) too!
"""


@cache
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; training is deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tokenizer.to_str()


def _tokenizer_info() -> tuple[int, dict[str, int]]:
    """(vocabulary size, special token ids by text) of the built-in tokenizer."""
    content = json.loads(_tokenizer_json())
    special_ids = {t["content"]: t["id"] for t in content["added_tokens"]}
    size = max([*content["model"]["vocab"].values(), *special_ids.values()]) + 1
    return size, special_ids


def _save_tokenizer(out_dir: Path) -> None:
    (out_dir / "tokenizer.json").write_text(_tokenizer_json())
    special = {"bos_token": None, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    special_map = {k: v for k, v in special.items() if v is not None}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


# --- public API -----------------------------------------------------------------------


def _vocabulary(vocab_size: int | None) -> tuple[int, dict[str, int]]:
    """The model's vocabulary size (default: the tokenizer's, rounded up) and special ids."""
    tokenizer_size, special_ids = _tokenizer_info()
    if vocab_size is None:
        vocab_size = math.ceil(tokenizer_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if vocab_size < tokenizer_size:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer_size}"
        )
    return vocab_size, special_ids


def build_random_model(
    out_dir: Path,
    model_type: str = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
    config_overrides: dict[str, Any] | None = None,
    quantize_bits: int | None = None,
    max_shard_bytes: int | None = None,
    tokenizer: bool = True,
) -> Path:
    """Write a random-weight mlx-lm model directory.

    Args:
        out_dir: Directory to write; created if missing.
        model_type: An mlx-lm architecture key. Those in the built-in table (llama, mistral,
            qwen2, qwen3, phi3, gemma3_text, qwen3_moe, deepseek_v2) get a small working
            config; others get llama-like fields and may need `config_overrides`.
        num_layers: Number of transformer layers.
        hidden_size: Residual width, a multiple of 32; heads are 16 wide.
        vocab_size: Model vocabulary; defaults to the tokenizer's size rounded up to 64.
        dtype: "float32", "bfloat16" or "float16".
        seed: Seed for `mx.random`; equal arguments give equal weights.
        config_overrides: Fields merged last into config.json (e.g. tie_word_embeddings).
        quantize_bits: 4 or 8 to quantize like `mlx_lm.convert` (affine, group 64 where
            hidden_size allows, else 32; qwen3_moe's router always uses 64).
        max_shard_bytes: If set, split the weights into shards of at most this many bytes
            (a larger single tensor gets a shard of its own) with an index file.
        tokenizer: Also write the built-in byte-level BPE tokenizer with a ChatML template.

    Returns:
        `out_dir`, ready for `mlx_lm.load` (or `mlx_lm.utils.load_model` without tokenizer).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    vocab_size, special_ids = _vocabulary(vocab_size)
    config = _make_config(model_type, num_layers, hidden_size, vocab_size, special_ids)
    config.update(config_overrides or {})
    model = _build_model(config, DTYPES[dtype], seed)
    if quantize_bits is not None:
        model, config = _quantize(model, config, quantize_bits)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if max_shard_bytes is None:
        save_model(out_dir, model)
    else:
        _save_sharded(model, out_dir, max_shard_bytes)
    save_config(config, out_dir / "config.json")
    if tokenizer:
        _save_tokenizer(out_dir)
    return out_dir
