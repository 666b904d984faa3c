"""Layer ranges and simple splits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlx_cluster.contract.layers import LayerRange, check_coverage, split_by_counts, split_evenly


def test_even_split_gives_extras_to_the_first():
    assert [(r.start, r.end) for r in split_evenly(30, 4)] == [(0, 8), (8, 16), (16, 23), (23, 30)]


def test_counts_must_sum_to_the_model():
    with pytest.raises(ValueError, match=r"\[1, 5\] must be positive and sum to 8"):
        split_by_counts([1, 5], 8)


def test_range_outside_model():
    with pytest.raises(ValueError, match=r"\[3, 9\) is not inside a model of 8 layers"):
        LayerRange(3, 9, 8)


def test_gaps_and_overlaps_are_named():
    with pytest.raises(ValueError, match="gap at layer 2"):
        check_coverage([LayerRange(0, 2, 8), LayerRange(3, 8, 8)])
    with pytest.raises(ValueError, match="overlap at layer 3"):
        check_coverage([LayerRange(0, 3, 8), LayerRange(2, 8, 8)])


@given(st.integers(1, 200), st.integers(1, 16))
def test_even_split_covers_every_layer_once(total, parts):
    if parts > total:
        with pytest.raises(ValueError):
            split_evenly(total, parts)
        return
    ranges = split_evenly(total, parts)
    check_coverage(ranges)
    assert max(r.count for r in ranges) - min(r.count for r in ranges) <= 1
