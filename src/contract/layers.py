"""Half-open layer ranges [start, end) and simple ways to split a model into them."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class LayerRange:
    """Layers [start, end) of a model with `total` layers."""

    start: int
    end: int
    total: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.total:
            raise ValueError(
                f"layer range [{self.start}, {self.end}) is not inside a model "
                f"of {self.total} layers"
            )

    @property
    def count(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"


def split_by_counts(counts: list[int], total: int) -> list[LayerRange]:
    """Contiguous ranges holding counts[i] layers each, in order.

    Raises:
        ValueError: if a count is not positive or the counts do not sum to total.
    """
    if any(c <= 0 for c in counts) or sum(counts) != total:
        raise ValueError(f"layer counts {counts} must be positive and sum to {total} layers")
    ranges, start = [], 0
    for count in counts:
        ranges.append(LayerRange(start, start + count, total))
        start += count
    return ranges


def split_evenly(total: int, parts: int) -> list[LayerRange]:
    """Split `total` layers into `parts` contiguous ranges; earlier parts get the extras."""
    if parts <= 0 or parts > total:
        raise ValueError(f"cannot split {total} layers into {parts} parts")
    base, extra = divmod(total, parts)
    return split_by_counts([base + (1 if i < extra else 0) for i in range(parts)], total)


def check_coverage(ranges: list[LayerRange]) -> None:
    """Raise ValueError unless the ranges cover every layer exactly once, in order."""
    if not ranges:
        raise ValueError("no layer ranges")
    total = ranges[0].total
    expected = 0
    for r in ranges:
        if r.total != total:
            raise ValueError(f"range {r} is of a {r.total}-layer model, expected {total}")
        if r.start != expected:
            kind = "gap" if r.start > expected else "overlap"
            raise ValueError(f"layer ranges have a {kind} at layer {expected}: next range is {r}")
        expected = r.end
    if expected != total:
        raise ValueError(f"layer ranges end at {expected}, model has {total} layers")


def split_proportional(total: int, weights: list[float]) -> list[int]:
    """Split `total` into integers proportional to `weights` by largest remainder.

    Ties in the remainders go to the earlier weight. Counts may be 0.

    Raises:
        ValueError: if weights are empty, negative, or all zero.
    """
    if not weights or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights}")
    scale = sum(weights)
    exact = [total * w / scale for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def at_least_one(counts: list[int]) -> list[int]:
    """Give every zero count one layer, taken from the largest counts."""
    counts = list(counts)
    for i, c in enumerate(counts):
        if c == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] = 1
    return counts
