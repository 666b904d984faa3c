"""Which token sequences the workers keep cached (prefix cache), found by longest prefix.

When a request ends, every stage keeps its session's caches as a prefix under one
id (worker/prefixes.py); the index remembers that prefix's tokens. A new request
starts from the kept prefix that shares the longest common prefix with its prompt,
on every stage at once, and prefills only the rest. The longest common prefix
counts, not an exact match: a chat template that rewrites an earlier turn still
reuses what comes before the change.

Lookup is by blocks: the tokens are cut into BLOCK-token blocks, each prefix is
filed under a hash of every whole block of its tokens, and a prompt's blocks are
looked up in order while they match; the best candidate is then compared token by
token. Each prefix also keeps the lengths of the chunks that built its caches, so
that a replay after a worker failure rebuilds them with the same steps.

The workers may evict a prefix the index still names; opening from it then fails
(PrefixNotFound) and the request forgets it and prefills everything.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import mlx.core as mx

if TYPE_CHECKING:
    from mlx_cluster.coordinator.engine.client import WorkerClient
    from mlx_cluster.coordinator.engine.request import RequestState

BLOCK = 64  # tokens per block of the lookup
MIN_REUSE = 1  # fewest tokens worth starting from a prefix


@dataclass
class PromptReuse:
    """What one request's prompt reused (filled in once its session is open)."""

    looked_up: bool = False  # the chain keeps prefixes: the prompt was looked up
    cached_tokens: int = 0  # prompt tokens a kept prefix gave


@dataclass(frozen=True)
class KeptPrefix:
    """A prefix every stage keeps under `prefix_id`: its tokens, and the lengths of the
    steps that cached them, in order. `whole_only`: a session may start from it only at
    all its tokens (a stage's sliding window has moved past the first ones)."""

    prefix_id: str
    tokens: tuple[int, ...]
    chunks: tuple[int, ...]
    whole_only: bool = False


@dataclass(frozen=True)
class PrefixMatch:
    """Where a prompt starts: `length` tokens of `prefix` (at most all but the prompt's
    last token, which the first decode step feeds)."""

    prefix: KeptPrefix
    length: int

    def chunks(self) -> list[int]:
        """The lengths of the steps that cached the first `length` tokens."""
        out, total = [], 0
        for size in self.prefix.chunks:
            take = min(size, self.length - total)
            if take <= 0:
                break
            out.append(take)
            total += take
        return out


def _block_keys(tokens: Sequence[int]) -> list[int]:
    """One key per whole block: a hash of every token up to the block's end."""
    keys, key = [], 0
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        key = hash((key, tuple(tokens[start : start + BLOCK])))
        keys.append(key)
    return keys


def _common(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """The length of a's and b's common prefix, given that it is at least `start`."""
    end = min(len(a), len(b))
    return next((i for i in range(start, end) if a[i] != b[i]), end)


class PrefixIndex:
    """The kept prefixes, at most `max_prefixes`, least recently used first."""

    def __init__(self, max_prefixes: int = 256) -> None:
        self.max_prefixes = max_prefixes
        self._prefixes: OrderedDict[str, KeptPrefix] = OrderedDict()
        self._by_block: dict[int, set[str]] = {}  # block key -> prefixes that hold it

    def __len__(self) -> int:
        return len(self._prefixes)

    def new_id(self) -> str:
        return "p-" + uuid.uuid4().hex

    def match(self, prompt: Sequence[int]) -> PrefixMatch | None:
        """The kept prefix that shares most of `prompt`, and how much of it to reuse."""
        usable = len(prompt) - 1  # the last prompt token is fed by the first decode step
        candidates: set[str] = set()
        shared = 0  # tokens every candidate shares with the prompt: its whole blocks
        for key in _block_keys(prompt):
            holders = self._by_block.get(key)
            if not holders:
                break
            candidates, shared = holders, shared + BLOCK
        if not candidates:  # no whole block in common: the shorter prefixes, token by token
            candidates = {p for p, kept in self._prefixes.items() if len(kept.tokens) < BLOCK}
            candidates |= set(itertools.islice(reversed(self._prefixes), 8))
        best: PrefixMatch | None = None
        for prefix_id in candidates:
            kept = self._prefixes[prefix_id]
            length = min(_common(kept.tokens, prompt, shared), usable)
            if kept.whole_only and length < len(kept.tokens):
                continue
            if length >= MIN_REUSE and (best is None or length > best.length):
                best = PrefixMatch(kept, length)
        if best is None or best.prefix.tokens[: best.length] != tuple(prompt[: best.length]):
            return None  # (the second: blocks whose hashes collide, checked once)
        self._prefixes.move_to_end(best.prefix.prefix_id)
        return best

    def add(self, kept: KeptPrefix) -> list[str]:
        """File a kept prefix; returns the ids it displaces: prefixes its tokens extend
        (the same conversation's earlier turn) and the least recently used past the cap."""
        displaced = [
            p
            for p, older in self._prefixes.items()
            if kept.tokens[: len(older.tokens)] == older.tokens
        ]
        for prefix_id in displaced:
            self.forget(prefix_id)
        self._prefixes[kept.prefix_id] = kept
        for key in _block_keys(kept.tokens):
            self._by_block.setdefault(key, set()).add(kept.prefix_id)
        while len(self._prefixes) > self.max_prefixes:
            oldest = next(iter(self._prefixes))
            self.forget(oldest)
            displaced.append(oldest)
        return displaced

    def forget(self, prefix_id: str) -> None:
        kept = self._prefixes.pop(prefix_id, None)
        if kept is None:
            return
        for key in _block_keys(kept.tokens):
            holders = self._by_block.get(key)
            if holders is not None:
                holders.discard(prefix_id)
                if not holders:
                    del self._by_block[key]

    def clear(self) -> None:
        """Forget every prefix (the stages changed)."""
        self._prefixes.clear()
        self._by_block.clear()


async def keep_prefix(
    clients: Sequence[WorkerClient], index: PrefixIndex, request: RequestState
) -> None:
    """End `request`'s session on every stage, kept as one prefix of what its caches hold;
    filed in `index` once every stage kept it, else dropped where it was. Prefixes it
    displaces (the conversation's earlier turn) are dropped everywhere."""
    prefix_id = index.new_id()
    history = request.history
    tokens = tuple(cast(list[int], mx.concatenate(history).tolist()))
    keep = [(request.session_id, prefix_id, request.offset)]
    kept = await asyncio.gather(
        *(c.keep_prefixes(keep, []) for c in clients), return_exceptions=True
    )
    drop = [prefix_id]
    if all(isinstance(k, tuple) and prefix_id in k[0] for k in kept):
        whole_only = any(prefix_id in k[1] for k in kept if isinstance(k, tuple))
        chunks = tuple(c.shape[0] for c in history)
        drop = index.add(KeptPrefix(prefix_id, tokens, chunks, whole_only))
    if drop:
        await asyncio.gather(*(c.keep_prefixes([], drop) for c in clients), return_exceptions=True)
