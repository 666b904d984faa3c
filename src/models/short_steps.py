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

Only plain `KVCache`s are viewed; other kinds (rotating, quantized, batch,
state-space) are used as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import mlx.core as mx
from mlx_lm.models.cache import KVCache

ShortStepAttention = Literal["fused", "whole_buffer"]

# The most positions a step may have to be run over whole buffers on CUDA: a verifying
# step carries at most 1 + 16 drafts (contract/speculation.py MAX_DRAFT_TOKENS), a
# draft model's catch-up rarely more; longer steps are prefill chunks, whose cost
# dwarfs a plan's.
CUDA_MAX_POSITIONS = 32


def backend_default() -> ShortStepAttention:
    """How short steps attend by default on this backend: fused (mx.fast) but on CUDA."""
    return "whole_buffer" if mx.cuda.is_available() else "fused"


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


def short_step_views(
    caches: Sequence[Any], positions: int, how: ShortStepAttention, up_to: int = CUDA_MAX_POSITIONS
) -> list[Any]:
    """The caches for a step of `positions` positions: for 1 < positions <= up_to, the
    plain KVCaches that hold a prefix seen as `how` says; the rest as they are."""
    if how == "fused" or not 1 < positions <= up_to:
        return list(caches)
    return [
        WholeBufferView(c, positions) if type(c) is KVCache and c.keys is not None else c
        for c in caches
    ]
