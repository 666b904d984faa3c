"""Attention for short multi-position steps (speculative verification) on CUDA.

A step of a few positions at a time (a speculative step verifying its drafts, a
draft model catching up) follows the KV cache's length, one new length a step.
On CUDA, MLX runs such a step's attention with cuDNN, whose execution plan it
builds for each new shape of queries, keys and mask and keeps in a cache keyed
by those shapes: a new length is a new plan, tens of milliseconds each, every
step (benchmarks/RESULTS.md, session 7). One-position steps take another kernel
and never pay it.

mlx-lm's KVCache keeps its keys and values in a buffer that grows 256 positions
at a time. A `WholeBufferView` of it hands attention that whole buffer (the
positions not yet written are zeros, those beyond a trim stale values) with a
mask that lets each query see only the positions it would see anyway. The
shapes then change once per 256 positions instead of at every step, and the
masked positions weigh exactly nothing: softmax gives them exp(-inf) = 0. The
cache itself is updated exactly as without the view.

A whole buffer only helps while a step's shapes come back: a chat's next turn is a
step of a new length at a width never seen before, and pays a new plan every time
(40-110 ms a stage on an H200, benchmarks/RESULTS.md, session 9). `padded` steps
avoid plans altogether: a step of 2 to 256 positions that continues a prefix is padded
with zeros up to a power of two (its matrix products then have shapes that come back)
and attends with MLX's composed operations through a `ComposedView` (no plan at any
width). The padding comes after the real positions, so causal attention keeps it from
them; its keys and values are cut from the cache again after the step, and its
outputs dropped (`PaddedStep`). A verification still attends over whole buffers on
`padded` workers (LayerSlice.__call__), as before: its shapes come back step after step
(which of the two costs a verification less on CUDA, RESULTS' runs do not settle).

Only plain `KVCache`s are viewed; other kinds (rotating, quantized, batch,
state-space) are used as they are, and a step is padded only when every cache is a
plain one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import base
from mlx_lm.models.cache import KVCache

ShortStepAttention = Literal["fused", "whole_buffer", "padded"]

# The most positions a step may have to be run over whole buffers on CUDA: a verifying
# step carries at most 1 + 16 drafts (contract/speculation.py MAX_DRAFT_TOKENS), a
# draft model's catch-up rarely more; longer steps are prefill chunks, whose cost
# dwarfs a plan's.
CUDA_MAX_POSITIONS = 32
# The most positions a `padded` step may have: a chat turn's new tokens, a verification,
# a draft model's catch-up. Longer steps are prefill chunks, as the cluster cuts them.
PADDED_MAX_POSITIONS = 256
SMALLEST_PAD = 8  # steps are padded to a power of two of at least this many positions
PADDED_WIDTHS = tuple(SMALLEST_PAD << k for k in range(6))  # 8 ... 256 = PADDED_MAX_POSITIONS


def backend_default() -> ShortStepAttention:
    """How short steps attend by default on this backend: fused (mx.fast) but on CUDA,
    where they are padded (benchmarks/RESULTS.md, session 9)."""
    return "padded" if mx.cuda.is_available() else "fused"


class WholeBufferView:
    """A KVCache seen through its whole buffer for one step of `positions` positions.

    Everything but `update_and_fetch` and `make_mask` is the cache's own.
    """

    def __init__(self, cache: KVCache, positions: int) -> None:
        self._cache = cache
        self._start = cache.offset
        step = KVCache.step
        self._width = -(-(self._start + positions) // step) * step
        self._reserve()

    def _reserve(self) -> None:
        """Grow the buffer to the step's width now, as the cache would grow it, so that
        its own update writes in place and the buffer holds `_width` positions."""
        cache = self._cache
        keys, values = cache.keys, cache.values
        if keys is None or values is None or keys.shape[2] >= self._width:
            return
        kept_k = keys[..., : self._start, :]
        kept_v = values[..., : self._start, :]
        more = self._width - self._start
        shape_k = (*kept_k.shape[:2], more, kept_k.shape[3])
        shape_v = (*kept_v.shape[:2], more, kept_v.shape[3])
        cache.keys = mx.concatenate([kept_k, mx.zeros(shape_k, kept_k.dtype)], axis=2)
        cache.values = mx.concatenate([kept_v, mx.zeros(shape_v, kept_v.dtype)], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self._cache.update_and_fetch(keys, values)
        whole_keys, whole_values = self._cache.keys, self._cache.values
        assert whole_keys is not None and whole_values is not None  # just written
        return whole_keys[..., : self._width, :], whole_values[..., : self._width, :]

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        """Query i (at position start + i) sees buffer positions 0..start + i."""
        if window_size is not None:  # sliding windows use rotating caches, never viewed
            raise ValueError("a whole-buffer view has no sliding window")
        queries = mx.arange(self._start, self._start + n)[:, None]
        return queries >= mx.arange(self._width)[None]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class ComposedView:
    """A KVCache whose step attends with composed operations (`composed_attention`) under
    an explicit causal mask, for any number of positions. Everything but `make_mask` is
    the cache's own; `route_attention` sends attention over it to `composed_attention`."""

    def __init__(self, cache: KVCache) -> None:
        self._cache = cache
        self._start = cache.offset

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        """Query i (at position start + i) sees positions 0..start + i."""
        if window_size is not None:  # sliding windows use rotating caches, never viewed
            raise ValueError("a composed view has no sliding window")
        queries = mx.arange(self._start, self._start + n)[:, None]
        return queries >= mx.arange(self._start + n)[None]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def composed_attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: mx.array
) -> mx.array:
    """Attention as MLX composes it where it has no fused kernel: the scores in the
    inputs' dtype, softmax in float32, grouped-query heads sharing their key head.
    queries [B, H, L, D]; keys and values [B, KV, S, D]; mask [L, S], True where seen."""
    batch, heads, length, _ = queries.shape
    kv_heads = keys.shape[1]
    if heads != kv_heads:
        queries = queries.reshape(batch, kv_heads, heads // kv_heads, length, -1)
        keys, values = keys[:, :, None], values[:, :, None]
    scores = (queries * scale) @ keys.swapaxes(-1, -2)
    scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    out = mx.softmax(scores, axis=-1, precise=True) @ values
    return out.reshape(batch, heads, length, -1)


_MLX_LM_ATTENTION = base.scaled_dot_product_attention
_ROUTED: set[str] = {base.__name__}  # modules whose attention calls go through `_attention`


def _attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None = None,
) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention`, but composed over a `ComposedView`."""
    if isinstance(cache, ComposedView) and sinks is None:
        return composed_attention(queries, keys, values, scale, mask)
    return _MLX_LM_ATTENTION(queries, keys, values, cache, scale, mask, sinks)


def route_attention(layers: Iterable[nn.Module]) -> None:
    """Let these layers' attention see `ComposedView`s: mlx-lm's model modules call the
    `scaled_dot_product_attention` they import from its base module, so each module the
    layers come from gets `_attention` in its place, which calls mlx-lm's own for every
    other cache. Done once per module."""
    for layer in layers:
        for module in layer.modules():
            name = type(module).__module__
            loaded = sys.modules.get(name)
            if name in _ROUTED or loaded is None:
                continue
            if getattr(loaded, "scaled_dot_product_attention", None) is not None:
                loaded.scaled_dot_product_attention = _attention  # type: ignore[attr-defined]
            _ROUTED.add(name)


def short_step_views(
    caches: Sequence[Any], positions: int, how: ShortStepAttention, up_to: int | None = None
) -> list[Any]:
    """The caches for a step of `positions` positions: for 1 < positions <= up_to (by
    default the most `how` takes), the plain KVCaches that hold a prefix seen as `how`
    says; the rest as they are."""
    most = up_to or (PADDED_MAX_POSITIONS if how == "padded" else CUDA_MAX_POSITIONS)
    if how == "fused" or not 1 < positions <= most:
        return list(caches)
    if how == "padded":
        return [ComposedView(c) if _viewable(c) else c for c in caches]
    return [WholeBufferView(c, positions) if _viewable(c) else c for c in caches]


def _viewable(cache: Any) -> bool:
    return type(cache) is KVCache and cache.keys is not None


class PaddedStep:
    """A step of `positions` positions run `padded`: its hidden states padded with zeros
    to a power of two, the caches seen through `ComposedView`s; `finish` cuts the padding
    from the caches and the output. Only when every cache is a plain KVCache holding a
    prefix; otherwise `width` is `positions` and the caches are viewed as
    `short_step_views` says."""

    def __init__(self, caches: Sequence[Any], positions: int, how: ShortStepAttention) -> None:
        self.positions = positions
        self.views = short_step_views(caches, positions, how)
        self.composed = any(isinstance(v, ComposedView) for v in self.views)
        padded = self.composed and all(isinstance(v, ComposedView) for v in self.views)
        self.width = _pad_to(positions) if padded else positions
        self._caches = caches

    def pad(self, hidden: mx.array) -> mx.array:
        extra = self.width - self.positions
        if extra == 0:
            return hidden
        zeros = mx.zeros((hidden.shape[0], extra, hidden.shape[2]), hidden.dtype)
        return mx.concatenate([hidden, zeros], axis=1)

    def finish(self, out: mx.array) -> mx.array:
        extra = self.width - self.positions
        if extra == 0:
            return out
        for cache in self._caches:
            cache.trim(extra)
        return out[:, : self.positions]


def _pad_to(positions: int) -> int:
    return next(width for width in PADDED_WIDTHS if width >= positions)
