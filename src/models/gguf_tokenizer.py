"""Build a Hugging Face `tokenizer.json` from the tokenizer a GGUF file describes.

A GGUF carries no `tokenizer.json`: llama.cpp keeps the vocabulary, merges, token types and
special token ids as metadata. This module rebuilds the equivalent `tokenizers` pipeline
(split rule, BPE, added tokens, bos/eos template) so that mlx-lm tokenizes as llama.cpp does.
It reads only metadata; tensors are gguf_import's business.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# Split rules llama.cpp applies before byte-level BPE, keyed by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx")
_SPLIT_REGEXES = dict.fromkeys(_LLAMA3_NAMES, _LLAMA3_SPLIT) | {"tekken": _TEKKEN_SPLIT}
# llama.cpp takes a pre-token found whole in the vocabulary as is for these (ignore_merges).
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "tekken"}
# GPT-2's split after cutting every digit apart.
_DIGIT_SPLIT = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2_SPLIT = {None, "default", "gpt-2"}
# llama.cpp token types.
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4


def build_tokenizer(metadata: dict[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    """A `tokenizers` tokenizer and its `tokenizer_config.json` from GGUF metadata.

    Supports `tokenizer.ggml.model` "gpt2" (byte-level BPE) and "llama" (sentencepiece BPE).
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = _byte_level_tokenizer(metadata)
    elif kind == "llama":
        tokenizer = _sentencepiece_tokenizer(metadata)
    else:
        raise ValueError(f"Unsupported GGUF tokenizer model {kind!r}; expected 'gpt2' or 'llama'")
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    special = {_TOKEN_CONTROL, _TOKEN_UNKNOWN}
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k in special
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _TOKEN_USER_DEFINED
        ]
    )
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    template = _template_processor(metadata, add_bos, add_eos)
    if kind == "gpt2":
        byte_level = processors.ByteLevel(trim_offsets=False)
        steps = [byte_level] if template is None else [byte_level, template]
        tokenizer.post_processor = processors.Sequence(steps)
    elif template is not None:
        tokenizer.post_processor = template
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": metadata.get(f"{metadata['general.architecture']}.context_length"),
        **_special_tokens(metadata),
    }
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return tokenizer, config


def _byte_level_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    pre = metadata.get("tokenizer.ggml.pre")
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    vocab = {token: index for index, token in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES)
    tokenizer = Tokenizer(bpe)
    if pre in _SPLIT_REGEXES:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_REGEXES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGIT_SPLIT:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _GPT2_SPLIT:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        known = sorted(_SPLIT_REGEXES.keys() | _DIGIT_SPLIT | {"default", "gpt-2"})
        raise ValueError(f"Unsupported GGUF pre-tokenizer {pre!r}; supported: {known}")
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(vocab, metadata["tokenizer.ggml.scores"])
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    prefix_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix_space else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, best-scored merged token first."""
    candidates: list[tuple[float, str, str]] = []
    for token, token_id in vocab.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = sorted(
            (p for p in pairs if p[0] in vocab and p[1] in vocab),
            key=lambda p: (vocab[p[0]], vocab[p[1]]),
        )
        candidates.extend((scores[token_id], left, right) for left, right in pairs)
    candidates.sort(key=lambda c: (c[0], len(c[1]), len(c[2])), reverse=True)
    return [(left, right) for _score, left, right in candidates]


def _special_tokens(metadata: dict[str, Any]) -> dict[str, str]:
    tokens = metadata["tokenizer.ggml.tokens"]
    names = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
    return {
        f"{name}_token": tokens[metadata[f"tokenizer.ggml.{key}_token_id"]]
        for name, key in names.items()
        if f"tokenizer.ggml.{key}_token_id" in metadata
    }


def _template_processor(
    metadata: dict[str, Any], add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing | None:
    """Adds bos/eos around each sequence where the GGUF says llama.cpp does."""
    tokens = metadata["tokenizer.ggml.tokens"]
    ids = {
        key: metadata.get(f"tokenizer.ggml.{key}_token_id")
        for key, on in (("bos", add_bos), ("eos", add_eos))
        if on
    }
    if missing := [key for key, token_id in ids.items() if token_id is None]:
        raise ValueError(f"GGUF asks to add {missing} tokens but gives no id for them")
    if not ids:
        return None
    bos = [tokens[ids["bos"]]] if "bos" in ids else []
    eos = [tokens[ids["eos"]]] if "eos" in ids else []
    single = [*bos, "$A", *eos]
    pair = [*single, *bos, "$B:1", *eos]
    special = [(tokens[token_id], token_id) for token_id in ids.values()]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def write_tokenizer(directory: Path, tokenizer: Tokenizer, config: dict[str, Any]) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {key: value for key, value in config.items() if key.endswith("_token")}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
