"""Prefixes kept from finished sessions, for later sessions to start from (prefix cache).

When a request ends, the coordinator may ask every stage to keep the session's
caches under a prefix id instead of dropping them (chat clients resend the whole
conversation every turn; agents resend the same long system prompt). A later
session opened from that prefix starts with the first `length` of its tokens
cached, on every stage at once, and is prefilled only with the rest.

A session branches from a prefix without copying: its caches are new cache
objects over the prefix's arrays, and MLX's arrays are values, so the first write
to a branch's buffer copies it and the prefix never changes. Several sessions can
branch from one prefix at once.

Prefixes live inside the worker's KV budget (tokens) and under their own cap in
bytes. They always yield to live sessions: the session store evicts the least
recently used prefixes before it refuses a session room. Caches that trim exactly
(KVCache, QuantizedKVCache) let a branch start at any length up to the prefix's. A
sliding window's cache (RotatingKVCache, e.g. gemma3's local layers) does so while
it holds every token; once the window has moved on, the positions it dropped cannot
come back, and the prefix can be started from only at its whole length (`whole_only`,
which the coordinator is told when the prefix is kept). Other kinds keep no prefixes.

Only the compute thread changes the store; `totals()` is a snapshot for Info.
"""

from __future__ import annotations

import copy as copy_module
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from mlx_cluster.contract.errors import PrefixNotFound

KEPT_KINDS = (KVCache, QuantizedKVCache, RotatingKVCache)


@dataclass
class Prefix:
    """One kept prefix: its caches (one per layer of this stage) hold `length` tokens."""

    prefix_id: str
    caches: list[Any]
    length: int
    nbytes: int
    whole_only: bool  # a sliding window moved on: it can be started from at `length` only


@dataclass(frozen=True)
class PrefixTotals:
    prefixes: int
    tokens: int
    nbytes: int
    capacity_bytes: int


def can_keep(caches: list[Any]) -> bool:
    """Whether caches of these kinds can be kept as prefixes."""
    return all(type(c) in KEPT_KINDS for c in caches)


def _holds_all(cache: Any) -> bool:
    """Whether `cache` still holds every token it was fed (a sliding window's until it
    has filled), so that it can be cut back to fewer."""
    return not isinstance(cache, RotatingKVCache) or cache.offset < cache.max_size


def _branch(cache: Any, length: int) -> Any:
    """A new cache of `cache`'s kind holding its first `length` tokens (all it holds, or
    fewer where `_holds_all`), sharing its arrays through new array objects (a write to
    one never shows in the other)."""
    copy = copy_module.copy(cache)
    if isinstance(cache, QuantizedKVCache):
        keys, values = cast(tuple, cache.keys), cast(tuple, cache.values)
        copy.keys = tuple(a[...] for a in keys)
        copy.values = tuple(a[...] for a in values)
    else:
        copy.keys, copy.values = cache.keys[...], cache.values[...]
    if length < cache.offset:
        copy.trim(cache.offset - length)
    return copy


def _nbytes(caches: list[Any]) -> int:
    """Bytes of the caches' whole buffers: what a prefix keeps alive, past its length too."""
    total = 0
    for cache in caches:
        for part in (cache.keys, cache.values):
            total += sum(a.nbytes for a in part) if isinstance(part, tuple) else part.nbytes
    return total


class PrefixStore:
    """Kept prefixes, least recently used first, within `capacity_bytes` (0: keep none)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._prefixes: OrderedDict[str, Prefix] = OrderedDict()
        self._tokens = 0
        self._nbytes = 0
        self._lock = threading.Lock()

    def __contains__(self, prefix_id: str) -> bool:
        return prefix_id in self._prefixes

    @property
    def tokens(self) -> int:
        """Tokens the prefixes hold: what they take of the KV budget."""
        return self._tokens

    def totals(self) -> PrefixTotals:
        with self._lock:
            return PrefixTotals(
                len(self._prefixes), self._tokens, self._nbytes, self.capacity_bytes
            )

    def keep(self, prefix_id: str, caches: list[Any], length: int) -> bool:
        """Keep `caches` (a finished session's, holding at least `length` tokens) as
        prefix `prefix_id` of `length` tokens, evicting the least recently used prefixes
        to make room. False (nothing kept) if they cannot be branched or would not fit
        the cap alone."""
        if not can_keep(caches) or length <= 0:
            return False
        if any(length < c.offset and not _holds_all(c) for c in caches):
            return False  # a sliding window moved past what would be kept
        nbytes = _nbytes(caches)
        if nbytes > self.capacity_bytes:
            return False
        self.drop(prefix_id)
        while self._nbytes + nbytes > self.capacity_bytes:
            self._evict_one()
        kept = [_branch(c, length) for c in caches]
        whole_only = not all(_holds_all(c) for c in kept)
        prefix = Prefix(prefix_id, kept, length, nbytes, whole_only)
        with self._lock:
            self._prefixes[prefix_id] = prefix
            self._tokens += length
            self._nbytes += nbytes
        return True

    def branch(self, prefix_id: str, length: int) -> list[Any]:
        """New caches holding the first `length` tokens of prefix `prefix_id`.

        Raises:
            PrefixNotFound: no such prefix here (never kept, evicted, or this worker
                restarted), or it is shorter than `length`.
        """
        prefix = self._prefixes.get(prefix_id)
        if prefix is None:
            raise PrefixNotFound(
                f"prefix {prefix_id!r} is not kept on this worker (never kept, evicted, "
                "or the worker restarted)"
            )
        if length > prefix.length:
            raise PrefixNotFound(f"prefix {prefix_id!r} holds {prefix.length} tokens, not {length}")
        if prefix.whole_only and length != prefix.length:
            raise PrefixNotFound(
                f"prefix {prefix_id!r} can be started from only at its {prefix.length} tokens: "
                f"a sliding window has moved past the first {length}"
            )
        self._prefixes.move_to_end(prefix_id)  # the most recently used
        return [_branch(c, length) for c in prefix.caches]

    def whole_only(self, prefix_ids: list[str]) -> list[str]:
        """Those of `prefix_ids` kept here that can be started from only whole."""
        with self._lock:
            return [p for p in prefix_ids if p in self._prefixes and self._prefixes[p].whole_only]

    def drop(self, prefix_id: str) -> bool:
        with self._lock:
            prefix = self._prefixes.pop(prefix_id, None)
            if prefix is None:
                return False
            self._tokens -= prefix.length
            self._nbytes -= prefix.nbytes
        return True

    def evict_for(self, tokens: int) -> None:
        """Evict least recently used prefixes until they hold at most `tokens` (live
        sessions need the rest of the budget)."""
        while self._prefixes and self._tokens > tokens:
            self._evict_one()

    def _evict_one(self) -> None:
        oldest = next(iter(self._prefixes))
        self.drop(oldest)
