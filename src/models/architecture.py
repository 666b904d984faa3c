"""Where each mlx-lm architecture keeps its embedding, layers, final norm and head.

mlx-lm's model classes run all three parts in one `__call__`. A pipeline runs
them on different hosts, so this module names the parts of each supported
architecture and reproduces, operation for operation, what the model's own
`__call__` does between them: the same ops in the same order give the same
numbers as single-process mlx-lm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import BatchRotatingKVCache, RotatingKVCache

from mlx_cluster.models.short_steps import PaddedStep, ShortStepAttention, route_attention


class UnsupportedArchitecture(ValueError):
    """The model cannot be split by layers; the message says why."""


@dataclass(frozen=True)
class Architecture:
    """How to take one mlx-lm architecture apart.

    Attributes:
        name: the mlx-lm module name (`mlx_lm.models.<name>`).
        embed_scale: multiply embeddings by sqrt(hidden_size) (Gemma does, in bf16).
    """

    name: str
    embed_scale: bool = False


# Architectures whose decoder layers are called as `layer(h, mask, cache)` with
# one causal mask per attention kind, tested by the golden equivalence test.
SUPPORTED: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("llama"),
        Architecture("qwen2"),
        Architecture("qwen3"),
        Architecture("phi3"),
        Architecture("qwen3_moe"),
        Architecture("deepseek_v2"),
        Architecture("gemma3_text", embed_scale=True),
    )
}


def architecture_of(model: nn.Module) -> Architecture:
    """The Architecture for a loaded mlx-lm model.

    Raises:
        UnsupportedArchitecture: naming the architecture and the supported ones.
    """
    name = type(model).__module__.rsplit(".", 1)[-1]
    arch = SUPPORTED.get(name)
    if arch is None:
        raise UnsupportedArchitecture(
            f"architecture {name!r} cannot be split by layers yet: its decoder layers "
            f"are not known to follow layer(h, mask, cache); supported: {sorted(SUPPORTED)}"
        )
    return arch


def inner_model(model: nn.Module) -> nn.Module:
    """The module holding embed_tokens, layers and norm (mlx-lm's `model.model`)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise UnsupportedArchitecture(f"{type(model).__module__}.Model has no .model.layers")
    return inner


# --- the coordinator's ends of the pipeline ------------------------------------


def embed(model: nn.Module, arch: Architecture, tokens: mx.array) -> mx.array:
    """Token ids [B, L] -> hidden states [B, L, D], as the model's __call__ begins."""
    inner = inner_model(model)
    h = inner.embed_tokens(tokens)
    if arch.embed_scale:
        h = h * mx.array(inner.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
    return h


def head(model: nn.Module, hidden: mx.array) -> mx.array:
    """Hidden states after the last layer -> logits: final norm, then LM head.

    Tied embeddings (no `lm_head` module) use `embed_tokens.as_linear`.
    """
    inner = inner_model(model)
    h = inner.norm(hidden)
    if "lm_head" in model:
        return model.lm_head(h)
    return inner.embed_tokens.as_linear(h)


# --- a worker's layers -----------------------------------------------------------


def _window(cache: Any) -> int | None:
    # mlx-lm gives sliding-window layers a RotatingKVCache sized to the window
    # and passes that window when it builds their mask.
    # (also the batch form, BatchRotatingKVCache, of a worker's decode batches).
    return cache.max_size if isinstance(cache, RotatingKVCache | BatchRotatingKVCache) else None


def run_layers(
    layers: Sequence[nn.Module],
    hidden: mx.array,
    caches: Sequence[Any],
    eval_every: int = 0,
    short_steps: ShortStepAttention = "fused",
) -> mx.array:
    """Run hidden states [1, L, D] through consecutive decoder layers, extending their caches.

    Masks are built once per attention kind from the first cache of that kind,
    as the models' own __call__ builds them from `cache[fa_idx]` / `cache[swa_idx]`.

    Args:
        eval_every: if > 0, start computing every `eval_every` layers (`mx.async_eval`)
            while the next layers' graph is built: the device works while Python
            builds, which mlx-lm gets by queueing its next token before reading
            this one and a pipeline stage, whose next input comes over the wire,
            cannot. The same operations run either way; only when they start.
        short_steps: how a step of a few positions attends (models/short_steps.py).
    """
    step = PaddedStep(caches, hidden.shape[1], short_steps)
    if step.composed:  # a short step, not every decode step: routing walks the modules
        route_attention(layers)
    caches = step.views
    masks: dict[int | None, Any] = {}
    h = step.pad(hidden)
    last = len(layers) - 1
    for index, (layer, cache) in enumerate(zip(layers, caches, strict=True)):
        window = _window(cache)
        if window not in masks:
            masks[window] = create_attention_mask(h, cache, window_size=window)
        h = layer(h, masks[window], cache)
        if eval_every > 0 and index % eval_every == eval_every - 1 and index != last:
            mx.async_eval(h)
    return step.finish(h)
