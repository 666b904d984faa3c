"""A model directory's tokenizer, as the coordinator and the sampling stage both read it."""

from __future__ import annotations

from pathlib import Path

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_config, load_tokenizer


def load_model_tokenizer(model: Path) -> TokenizerWrapper:
    """mlx-lm's tokenizer of `model`, its end-of-sequence ids from config.json (as
    mlx-lm's own `load` gives them)."""
    config = load_config(model)
    return load_tokenizer(model, eos_token_ids=config.get("eos_token_id"))
