"""Random-weight model directories load with mlx-lm and behave like real models."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.utils import load_model, load_tokenizer

from mlx_cluster.models import random_model
from mlx_cluster.models.random_model import build_random_model

ARCHITECTURES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma3_text",
    "qwen3_moe",
    "deepseek_v2",
]
PROMPT = [5, 17, 42, 99, 3, 250]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _logits(model: nn.Module, tokens: list[int] = PROMPT) -> mx.array:
    logits = model(mx.array([tokens]))
    mx.eval(logits)
    return logits


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# --- every architecture ---------------------------------------------------------------


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_reload_gives_in_memory_logits(tmp_path: Path, model_type: str) -> None:
    path = build_random_model(tmp_path / model_type, model_type)
    model, tokenizer = load(str(path))
    config = _config(path)
    in_memory = random_model._build_model(config, mx.float32, seed=0)

    logits = _logits(model)
    assert logits.shape == (1, len(PROMPT), config["vocab_size"])
    assert config["vocab_size"] % 64 == 0
    assert config["vocab_size"] >= tokenizer.vocab_size
    assert mx.array_equal(logits, _logits(in_memory))
    assert mx.all(mx.isfinite(logits)).item()


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_greedy_generation_varies(tmp_path: Path, model_type: str) -> None:
    model, _ = load(str(build_random_model(tmp_path / model_type, model_type)))
    steps = generate_step(mx.array(PROMPT), model, max_tokens=40)
    tokens = [int(token) for token, _ in steps]
    assert len(tokens) == 40
    assert len(set(tokens)) > 4, tokens


def test_seed_determines_weights(tmp_path: Path) -> None:
    first = build_random_model(tmp_path / "a", "qwen2", seed=3)
    again = build_random_model(tmp_path / "b", "qwen2", seed=3)
    other = build_random_model(tmp_path / "c", "qwen2", seed=4)
    weights = [(p / "model.safetensors").read_bytes() for p in (first, again, other)]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]


# --- per-architecture structure -------------------------------------------------------


@pytest.mark.parametrize(("model_type", "tied"), [("llama", True), ("qwen3", False)])
def test_tie_word_embeddings_default_and_override(
    tmp_path: Path, model_type: str, tied: bool
) -> None:
    default, _ = load_model(build_random_model(tmp_path / "d", model_type, tokenizer=False))
    flipped, _ = load_model(
        build_random_model(
            tmp_path / "f",
            model_type,
            tokenizer=False,
            config_overrides={"tie_word_embeddings": not tied},
        )
    )
    assert ("lm_head" not in default) == tied
    assert ("lm_head" not in flipped) == (not tied)


def test_gemma3_has_sliding_and_global_layers_and_tied_head(tmp_path: Path) -> None:
    path = build_random_model(tmp_path / "g", "gemma3_text")
    model, _ = load_model(path)
    kinds = [type(c) for c in model.make_cache()]
    assert kinds == [RotatingKVCache, KVCache, RotatingKVCache, KVCache]
    assert "lm_head.weight" not in mx.load(str(path / "model.safetensors"))
    assert model.tie_word_embeddings


@pytest.mark.parametrize(
    ("model_type", "moe_class"),
    [("qwen3_moe", "Qwen3MoeSparseMoeBlock"), ("deepseek_v2", "DeepseekV2MoE")],
)
def test_moe_models_mix_dense_and_expert_layers(
    tmp_path: Path, model_type: str, moe_class: str
) -> None:
    model, _ = load_model(build_random_model(tmp_path / "m", model_type, tokenizer=False))
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds[0] != moe_class
    assert kinds[1:] == [moe_class] * 3


# --- storage variants -----------------------------------------------------------------


def test_sharded_weights_load_like_single_file(tmp_path: Path) -> None:
    single = build_random_model(tmp_path / "single", "llama")
    sharded = build_random_model(tmp_path / "sharded", "llama", max_shard_bytes=100_000)

    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(shards) > 1
    assert not (sharded / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert mx.array_equal(_logits(load(str(sharded))[0]), _logits(load(str(single))[0]))


@pytest.mark.parametrize(("model_type", "bits"), [("llama", 4), ("qwen3_moe", 8)])
def test_quantized_model_loads_and_runs(tmp_path: Path, model_type: str, bits: int) -> None:
    path = build_random_model(tmp_path / "q", model_type, quantize_bits=bits)
    model, _ = load(str(path))

    quantization = _config(path)["quantization"]
    assert quantization["bits"] == bits
    assert quantization["group_size"] == 64
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    steps = generate_step(mx.array(PROMPT), model, max_tokens=8)
    assert len([token for token, _ in steps]) == 8


def test_bfloat16_weights(tmp_path: Path) -> None:
    model, _ = load(str(build_random_model(tmp_path / "bf16", "qwen3", dtype="bfloat16")))
    assert model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    assert _logits(model).dtype == mx.bfloat16


def test_without_tokenizer_and_with_explicit_vocab(tmp_path: Path) -> None:
    path = build_random_model(tmp_path / "bare", "llama", vocab_size=1000, tokenizer=False)
    model, config = load_model(path)
    assert not (path / "tokenizer.json").exists()
    assert _logits(model).shape == (1, len(PROMPT), 1000)
    assert config["vocab_size"] == 1000


def test_rejects_vocab_smaller_than_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_random_model(tmp_path / "x", vocab_size=64)


# --- tokenizer ------------------------------------------------------------------------


def test_tokenizer_round_trip_and_chat_template(tmp_path: Path) -> None:
    path = build_random_model(tmp_path / "tok", "llama")
    tokenizer = load_tokenizer(path, eos_token_ids=_config(path)["eos_token_id"])

    text = "Hello, world! Pipeline stage 3 of 4: {x: 42}\n\ttabs ~`@#$%^&*_-+=[]|;'\"<>/?\\"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text)  # BPE merges happened

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_ids == {im_end}
    assert tokenizer.encode("<|im_start|>")[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    chat = [{"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer.apply_chat_template(chat, add_generation_prompt=True)) == (
        rendered
    )
