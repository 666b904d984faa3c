"""Speculative decoding: how a request drafts tokens, and what its drafts earned.

A decode step that carries a row's last token plus k drafted tokens verifies all
k at once on every stage: the last stage samples every position as it would
have without drafts and keeps the drafts up to the first one it did not sample
itself, plus the token it sampled there. So the tokens are those of decoding
without drafts; the drafts only decide how many come from one traversal.

Drafts come from the request's own tokens (`prompt_lookup`: what followed the
latest earlier occurrence of the longest n-gram that ends the tokens so far),
which costs no model and turns copied spans into accepted tokens; or from a small
draft model with the same vocabulary on the first worker (`draft`).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

from mlx_cluster.contract.errors import InvalidParam

SpeculativeMethod = Literal["none", "prompt_lookup", "draft"]
METHODS: tuple[str, ...] = get_args(SpeculativeMethod)
T = TypeVar("T")
MAX_DRAFT_TOKENS = 16
LOOKUP_MAX_NGRAM = 3  # the longest n-gram prompt lookup matches (then shorter ones)
LOOKUP_MIN_NGRAM = 1


@dataclass(frozen=True)
class Speculation:
    """A request's drafting: `method`, and at most `num_draft_tokens` drafts a step;
    `draft_model` is the cluster's (the `draft` method needs one)."""

    method: str = "none"
    num_draft_tokens: int = 4
    draft_model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidParam(
                "speculative.method",
                f"speculative.method must be one of {', '.join(METHODS)}, got {self.method!r}",
            )
        if self.method == "draft" and not self.draft_model:
            raise InvalidParam(
                "speculative.method",
                "speculative.method draft needs a draft model, and the cluster has none "
                "(speculative.draft_model in its config)",
            )
        if not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidParam(
                "speculative.num_draft_tokens",
                f"speculative.num_draft_tokens must be in [1, {MAX_DRAFT_TOKENS}], "
                f"got {self.num_draft_tokens!r}",
            )

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def split_rows(items: Sequence[T], counts: Sequence[int]) -> list[list[T]]:
    """A step's tokens, flattened row after row, back into rows of `counts` tokens each
    (a step that verified drafts gives a row several).

    Raises:
        ValueError: the counts do not add up to the tokens.
    """
    if sum(counts) != len(items) or any(count < 0 for count in counts):
        raise ValueError(f"{len(items)} tokens do not split into rows of {list(counts)}")
    rows, at = [], 0
    for count in counts:
        rows.append(list(items[at : at + count]))
        at += count
    return rows


@dataclass
class DraftStats:
    """What one request's drafting did (counted by the lane that carries it)."""

    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of those, kept
    traversals: int = 0  # decode steps that carried the request

    def add(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.traversals += 1


class PromptLookup:
    """Drafts from a row's own tokens: what followed the latest earlier occurrence of the
    longest n-gram (LOOKUP_MAX_NGRAM down to LOOKUP_MIN_NGRAM) that ends them.

    The n-grams are indexed as tokens arrive, so a lookup costs the same however
    long the prompt.
    """

    def __init__(self, tokens: Sequence[int] = ()) -> None:
        self.tokens: list[int] = []
        # n -> n-gram -> the latest start of it that some token follows
        self._latest: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(LOOKUP_MIN_NGRAM, LOOKUP_MAX_NGRAM + 1)
        }
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            size = len(self.tokens)  # the new token's index
            for n, latest in self._latest.items():
                if size >= n:
                    latest[tuple(self.tokens[size - n : size])] = size - n
            self.tokens.append(int(token))

    def drafts(self, count: int) -> list[int]:
        """Up to `count` tokens that may come next; none when nothing matches."""
        if count <= 0:
            return []
        size = len(self.tokens)
        for n in sorted(self._latest, reverse=True):
            if size < n:
                continue
            start = self._latest[n].get(tuple(self.tokens[size - n :]))
            if start is not None:
                return self.tokens[start + n : start + n + count]
        return []


class StepCosts:
    """What decode steps of each shape cost lately, on one decode loop: seconds for
    (rows, positions per row), the median of the last few. Speculation pays only where
    verifying k more positions costs less than k more steps: on a GPU a few positions
    cost about what one does; on a CPU each costs almost a whole step.

    The first step of a shape is not counted: it may build kernels or attention plans
    for that shape (tens of milliseconds on CUDA) that later steps reuse. The median
    ignores the odd slow step (a plan built again when a KV buffer grows).
    """

    KEPT = 9  # steps of each shape whose median is its cost

    def __init__(self) -> None:
        self._seconds: dict[tuple[int, int], deque[float]] = {}

    def add(self, rows: int, length: int, seconds: float) -> None:
        key = (rows, length)
        if key not in self._seconds:
            self._seconds[key] = deque(maxlen=self.KEPT)  # the first step: not counted
        else:
            self._seconds[key].append(seconds)

    def cost(self, rows: int, length: int) -> float | None:
        """The step's cost in seconds; None until measured."""
        kept = self._seconds.get((rows, length))
        return statistics.median(kept) if kept else None

    def ratio(self, rows: int, length: int) -> float:
        """A step of `length` positions against one of 1, for `rows` rows; 1 until both
        were measured (so an untried length gets tried)."""
        one, this = self.cost(rows, 1), self.cost(rows, length)
        if one is None or this is None or one <= 0:
            return 1.0
        return this / one


class DraftLength:
    """How many drafts a row asks for next: the k that maximizes the tokens a step is
    expected to give (from its drafts' acceptance so far) per unit of the step's
    measured cost; none when no k pays. A row that drafts nothing tries one draft
    again now and then, since what it copies may change."""

    RETRY_AFTER = 32  # steps without drafts before one draft is tried again
    MEMORY = 0.8  # weight of the past in the acceptance rate

    def __init__(self, most: int) -> None:
        self.most = most
        self._kept = 1.0  # drafts kept and verified, decayed: optimistic at first
        self._tried = 1.0
        self._idle = 0

    @property
    def acceptance(self) -> float:
        """The chance a draft is kept, given that the one before it was."""
        return min(self._kept / self._tried, 0.999)

    def next(self, costs: StepCosts, rows: int) -> int:
        """Drafts to ask for at this step of `rows` rows."""
        chance = self.acceptance
        best, best_rate = 0, 1.0
        for k in range(1, self.most + 1):
            expected = (1 - chance ** (k + 1)) / (1 - chance)  # tokens the step gives
            rate = expected / costs.ratio(rows, k + 1)
            if rate > best_rate:
                best, best_rate = k, rate
        if best:
            self._idle = 0
            return best
        self._idle += 1
        if self._idle >= self.RETRY_AFTER:
            self._idle = 0
            return 1
        return 0

    def update(self, drafted: int, accepted: int) -> None:
        """A step verified `drafted` drafts and kept the first `accepted`."""
        if drafted == 0:
            return
        rejected = 1 if accepted < drafted else 0
        self._kept = self.MEMORY * self._kept + accepted
        self._tried = self.MEMORY * self._tried + accepted + rejected
