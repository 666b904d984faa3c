"""Load only part of a model: a worker's layer slice and ends, or the coordinator's ends.

mlx-lm's `load_model(lazy=True)` maps every tensor without reading it. We keep
the modules this process needs, drop the rest before anything is evaluated, and
only then evaluate, so dropped weights are never read into memory (the idea of
mlx-lm's own pipeline loading).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from mlx_cluster.contract.layers import LayerRange
from mlx_cluster.models.architecture import (
    Architecture,
    UnsupportedArchitecture,
    architecture_of,
    embed,
    head,
    inner_model,
    run_layers,
)
from mlx_cluster.models.shards import check_weights_present, shard_view
from mlx_cluster.models.short_steps import PADDED_WIDTHS, ShortStepAttention

log = logging.getLogger(__name__)

# A warm-up's prefixes (`LayerSlice.warm_up`): a short chat, a long one, an agent's.
WARM_PREFIXES = (256, 2048, 8192)


def _parameter_bytes(module: nn.Module) -> int:
    params = cast(list[tuple[str, mx.array]], tree_flatten(module.parameters()))
    return sum(v.nbytes for _, v in params)


def _activation_dtype(layer: nn.Module) -> mx.Dtype:
    # Norm weights stay in the activation dtype even in quantized models.
    params = dict(tree_flatten(layer.parameters()))
    for name, value in params.items():
        if "norm" in name and mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    for value in params.values():
        if mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    raise UnsupportedArchitecture("decoder layer has no floating-point parameters")


def _lazy_load(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path}: config.json is missing")
    return load_model(path, lazy=True, strict=False)


@dataclass
class LayerSlice:
    """Decoder layers [start, end) of one model, weights in memory, ready to run."""

    path: Path
    start: int
    end: int
    num_layers: int
    hidden_size: int
    dtype: mx.Dtype
    layers: list[nn.Module]
    cache_templates: list[Any] = field(repr=False)
    weight_bytes: int = 0
    eval_every: int = 0  # start computing every this many layers (see run_layers); 0 = at the end
    short_steps: ShortStepAttention = "fused"  # how steps of a few positions attend

    def make_caches(self) -> list[Any]:
        """Fresh, empty caches for this slice, of the kinds mlx-lm builds for these layers."""
        return [copy.deepcopy(c) for c in self.cache_templates]

    def __call__(self, hidden: mx.array, caches: list[Any], verifying: bool = False) -> mx.array:
        """`verifying`: a step that verifies drafts. On `padded` workers it attends over
        whole buffers instead, as before: a verification's shapes come back step after
        step, so cuDNN's plans for them are kept (benchmarks/RESULTS.md, sessions 7, 9)."""
        how = self.short_steps
        if verifying and how == "padded":
            how = "whole_buffer"
        return run_layers(self.layers, hidden, caches, self.eval_every, how)

    def warm_up(self) -> None:
        """On a GPU, with `padded` short steps, `rehearse` before serving: CUDA loads a
        kernel when first used, and a turn's first short step cost 115-140 ms a stage in
        a fresh worker (benchmarks/RESULTS.md, session 9)."""
        if self.short_steps == "padded" and mx.default_device() == mx.gpu:
            started = time.perf_counter()
            self.rehearse()
            mx.clear_cache()  # the rehearsal's buffers go back to the device, not MLX's pool
            log.info("short steps rehearsed in %.2f s", time.perf_counter() - started)

    def rehearse(self, prefixes: Sequence[int] = WARM_PREFIXES, chunk: int = 512) -> None:
        """Run a step of each padded width after prefixes of a few lengths (prefilled in
        chunks of `chunk`), as a chat's turns would, on caches of its own."""
        for prefix in prefixes:
            caches = self.make_caches()
            for done in range(0, prefix, chunk):
                size = min(chunk, prefix - done)
                mx.eval(self(mx.zeros((1, size, self.hidden_size), self.dtype), caches))
            for width in PADDED_WIDTHS:  # the caches grow by each: no cut needed
                mx.eval(self(mx.zeros((1, width, self.hidden_size), self.dtype), caches))


def load_layer_slice(
    path: Path, start: int, end: int, before_reading: Callable[[], None] | None = None
) -> LayerSlice:
    """Load decoder layers [start, end) of the mlx-lm model at `path`, and nothing else.

    Args:
        before_reading: called once the slice is checked (range, architecture, weights
            present), before its weights are read: a worker frees its old slice there.

    Raises:
        ValueError: if the range is not inside the model (message has both numbers).
        UnsupportedArchitecture: if the model cannot be split by layers.
        FileNotFoundError: if `path` holds no model.
    """
    with shard_view(path, layers=range(start, end)) as view:
        model, config = _lazy_load(view)
        architecture_of(model)
        inner = inner_model(model)
        total = len(inner.layers)
        LayerRange(start, end, total)  # ValueError with both numbers if outside the model
        check_weights_present(view, range(start, end), edges=False, model=path)
        templates = make_prompt_cache(model)
        layers = list(inner.layers[start:end])
        del model, inner  # everything outside the slice goes before anything is read
        if before_reading is not None:
            before_reading()
        holder = nn.Module()
        holder.layers = layers
        mx.eval(holder.parameters())
    return LayerSlice(
        path=path,
        start=start,
        end=end,
        num_layers=total,
        hidden_size=int(config["hidden_size"]),
        dtype=_activation_dtype(layers[0]),
        layers=layers,
        cache_templates=list(templates[start:end]),
        weight_bytes=_parameter_bytes(holder),
    )


@dataclass
class ModelEdges:
    """A model's ends: the embedding (first stage), the final norm and LM head (last stage).

    `load_edges(path)` loads both; a worker loads the parts of its stage only
    (`holds_embedding`, `holds_head`).
    """

    path: Path
    architecture: Architecture
    model: nn.Module = field(repr=False)
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: mx.Dtype  # of the hidden states the embedding produces
    config: dict[str, Any] = field(repr=False)
    weight_bytes: int = 0
    holds_embedding: bool = True  # the token embedding was loaded
    holds_head: bool = True  # the final norm and LM head were loaded

    def embed(self, tokens: mx.array) -> mx.array:
        """Token ids [B, L] -> hidden states [B, L, D].

        Raises:
            ValueError: the embedding was not loaded.
        """
        if not self.holds_embedding:
            raise ValueError(f"the embedding of {self.path} is not loaded here")
        return embed(self.model, self.architecture, tokens)

    def head(self, hidden: mx.array) -> mx.array:
        """Hidden states [B, L, D] after the last layer -> logits [B, L, vocab].

        Raises:
            ValueError: the final norm and LM head were not loaded.
        """
        if not self.holds_head:
            raise ValueError(f"the final norm and LM head of {self.path} are not loaded here")
        return head(self.model, hidden)


def load_edges(
    path: Path,
    embedding: bool = True,
    head: bool = True,
    before_reading: Callable[[], None] | None = None,
) -> ModelEdges:
    """Load the embedding and/or the final norm and LM head of the model at `path`; no layers.

    The parts not asked for are dropped before anything is read. A tied model's head
    is its embedding matrix, which a head alone then keeps.

    Args:
        before_reading: called once the model is checked, before its weights are read.

    Raises:
        ValueError: neither part asked for, or the weights hold no edges.
        UnsupportedArchitecture: if the model cannot be split by layers.
        FileNotFoundError: if `path` holds no model.
    """
    if not (embedding or head):
        raise ValueError("load_edges needs the embedding, the head or both")
    with shard_view(path, edges=True) as view:
        model, config = _lazy_load(view)
        check_weights_present(view, None, edges=True, model=path)
        arch = architecture_of(model)
        inner = inner_model(model)
        total = len(inner.layers)
        vocab_size = int(config.get("vocab_size") or inner.embed_tokens.weight.shape[0])
        # Shapes and dtypes are known without reading: the probe builds a graph only.
        dtype = embed(model, arch, mx.zeros((1, 1), dtype=mx.uint32)).dtype
        inner.layers = []
        tied = "lm_head" not in model
        if not head:
            del inner["norm"]
            if not tied:
                del model["lm_head"]
        if not embedding and not tied:
            del inner["embed_tokens"]
        if before_reading is not None:
            before_reading()
        mx.eval(model.parameters())
    return ModelEdges(
        path=path,
        architecture=arch,
        model=model,
        num_layers=total,
        hidden_size=int(config["hidden_size"]),
        vocab_size=vocab_size,
        dtype=dtype,
        config=config,
        weight_bytes=_parameter_bytes(model),
        holds_embedding=embedding,
        holds_head=head,
    )


def load_stage(
    path: Path,
    start: int,
    end: int,
    embedding: bool = False,
    head: bool = False,
    before_reading: Callable[[], None] | None = None,
) -> tuple[LayerSlice, ModelEdges | None]:
    """Load a pipeline stage: layers [start, end) and the edges asked for (None if none).

    Both parts are checked before `before_reading` is called and anything is read, so
    a worker keeps the stage it holds until the new one is known to load.

    Raises:
        as load_layer_slice and load_edges.
    """
    if not (embedding or head):
        return load_layer_slice(path, start, end, before_reading), None
    edges: ModelEdges | None = None

    def read_edges() -> None:  # once the layers are checked, before they are read
        nonlocal edges
        edges = load_edges(path, embedding, head, before_reading)

    layer_slice = load_layer_slice(path, start, end, read_edges)
    return layer_slice, edges
