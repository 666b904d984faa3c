"""Models of real shapes with random weights, built once into a cache directory.

Timing depends on a model's shapes, not on its weights, so the benchmark runs
random-weight models with the shapes of real ones and needs no network. Each
(shape, dtype, bits) is built by `models.random_model.build_random_model` into
its own directory, written under a temporary name and renamed into place, so a
directory that exists is complete.
"""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_cluster.models.random_model import build_random_model

DEFAULT_CACHE_DIR = Path("~/.cache/mlx-cluster/bench")
MAX_SHARD_BYTES = 4 * 2**30  # safetensors shards of at most 4 GiB, as mlx-lm writes them
SEED = 0
LLAMA3_ROPE_SCALING = {  # Llama-3.2's long-context RoPE, as in its config.json
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


@dataclass(frozen=True)
class ModelShape:
    """The shape of one Llama-architecture model (Hugging Face config field names)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tied: bool  # tie_word_embeddings
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. rope_scaling

    def config_overrides(self) -> dict[str, Any]:
        """The config fields build_random_model's small defaults do not set this way."""
        return {
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.hidden_size // self.num_heads,
            "intermediate_size": self.intermediate_size,
            "tie_word_embeddings": self.tied,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            **self.extra,
        }


SHAPES: dict[str, ModelShape] = {
    "llama-1b": ModelShape(  # Llama-3.2-1B
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tied=True,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        extra={"rope_scaling": LLAMA3_ROPE_SCALING},
    ),
    "llama-8b": ModelShape(  # Meta-Llama-3-8B
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tied=False,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
    "demo-135m": ModelShape(  # SmolLM2-135M, the shape of the project's demo model
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tied=True,
        rope_theta=100000.0,
        max_position_embeddings=8192,
    ),
    "small": ModelShape(  # 6 layers, 256 wide: fast enough on a CPU that fixed costs show
        hidden_size=256,
        num_layers=6,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=768,
        vocab_size=8192,
        tied=True,
        rope_theta=10000.0,
        max_position_embeddings=8192,
    ),
    "tiny": ModelShape(  # a few MB, for smoke tests
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        vocab_size=1024,
        tied=True,
        rope_theta=10000.0,
        max_position_embeddings=8192,
    ),
}


def model_name(shape: str, dtype: str, bits: int | None) -> str:
    """Directory name of one built variant, e.g. "llama-1b-bfloat16-q4"."""
    return f"{shape}-{dtype}" + (f"-q{bits}" if bits else "")


def ensure_model(shape: str, dtype: str, bits: int | None, cache_dir: Path) -> Path:
    """The model directory for (shape, dtype, bits) under `cache_dir`, built if missing.

    Building a large model takes minutes: build_random_model generates every
    weight in float32 before casting, so it needs about 3x the model's
    dtype size in memory (48 GB for llama-8b in bfloat16).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; expected one of {sorted(SHAPES)}")
    target = cache_dir.expanduser() / model_name(shape, dtype, bits)
    if (target / "config.json").is_file():
        return target
    spec = SHAPES[shape]
    staging = target.with_name(target.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    build_random_model(
        staging,
        "llama",
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        vocab_size=spec.vocab_size,
        dtype=dtype,
        seed=SEED,
        config_overrides=spec.config_overrides(),
        quantize_bits=bits,
        max_shard_bytes=MAX_SHARD_BYTES,
    )
    staging.rename(target)
    gc.collect()
    mx.clear_cache()  # the build's buffers must not stay allocated while others measure
    return target


def parameter_count(model_dir: Path) -> int | None:
    """Parameters of a model, from its safetensors index; None where the index has no count
    (the imported demo model's)."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    count = index.get("metadata", {}).get("total_parameters")
    return None if count is None else int(count)


def ensure_successor_model(shape: str, dtype: str, cache_dir: Path) -> Path:
    """A model of `shape` that, greedy, follows token t with t + 1, built if missing.

    Made from the random model of that shape: every layer's attention output and MLP
    output projections are zeroed, so the residual stream stays the token's embedding,
    and row j of the LM head is the embedding of token j - 1. Random embeddings are
    nearly orthogonal, so the largest logit after token t is t + 1's. Every layer still
    computes what a real model's does: zeros cost the device what any weights cost. With
    a prompt that holds runs of consecutive ids, prompt lookup's drafts are then right
    as far as the run they copy (`speculative_workloads.successor_prompts`).
    """
    source = ensure_model(shape, dtype, None, cache_dir)
    target = source.with_name(source.name + "-successor")
    if (target / "config.json").is_file():
        return target
    staging = target.with_name(target.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("*.safetensors"))
    shards = sorted(source.glob("*.safetensors"))
    embedding = next(
        w["model.embed_tokens.weight"]
        for w in map(mx.load, map(str, shards))
        if "model.embed_tokens.weight" in w
    )
    head = mx.roll(embedding, 1, axis=0)  # row j: token j - 1's embedding
    for shard in shards:
        weights = mx.load(str(shard))
        for name, value in weights.items():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                weights[name] = mx.zeros_like(value)
            elif name.endswith("norm.weight"):
                weights[name] = mx.ones_like(value)
        if "lm_head.weight" in weights or "model.embed_tokens.weight" in weights:
            weights["lm_head.weight"] = head  # its own head, even where the shape ties it
            head_shard = shard.name
        mx.save_safetensors(str(staging / shard.name), weights, metadata={"format": "mlx"})
        del weights
    for name, edit in (
        ("config.json", lambda c: c | {"tie_word_embeddings": False}),
        (
            "model.safetensors.index.json",
            lambda i: i | {"weight_map": i["weight_map"] | {"lm_head.weight": head_shard}},
        ),
    ):
        (staging / name).write_text(
            json.dumps(edit(json.loads((staging / name).read_text())), indent=4)
        )
    staging.rename(target)
    gc.collect()
    mx.clear_cache()
    return target
