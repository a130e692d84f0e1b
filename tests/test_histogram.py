"""Histogram arithmetic the daemon relies on: merging, interval deltas, bounds."""

from __future__ import annotations

import math

import pytest

from netprof_core import Histogram


def test_delta_between_two_states_is_what_was_recorded_in_between() -> None:
    earlier = Histogram.from_durations([1_000_000] * 10)
    later = earlier + Histogram.from_durations([5_000_000] * 30)

    delta = later - earlier

    assert delta.count == 30
    assert 4_960_000 <= delta.quantile(0.5) <= 5_040_000


def test_subtracting_a_later_state_is_refused() -> None:
    small = Histogram.from_durations([1_000])
    large = Histogram.from_durations([1_000, 1_000])
    with pytest.raises(ValueError, match="not an earlier state"):
        small - large


def test_an_unknown_maximum_stays_unknown_when_merged() -> None:
    known = Histogram.from_durations([2_000])
    unknown = Histogram(known.counts)  # e.g. built from bucket counts alone
    assert unknown.max_ns is None
    assert (known + unknown).max_ns is None
    assert (known + known).max_ns == 2_000


def test_empty_histogram_has_no_quantiles() -> None:
    assert math.isnan(Histogram().quantile(0.99))
    assert Histogram() == Histogram()
    assert Histogram() != Histogram.from_durations([1])


@pytest.mark.parametrize("q", [-0.1, 1.5, math.nan])
def test_quantile_outside_zero_to_one_is_refused(q: float) -> None:
    with pytest.raises(ValueError, match="q must be within 0 and 1"):
        Histogram.from_durations([1]).quantile(q)


def test_wrong_number_of_buckets_is_refused() -> None:
    with pytest.raises(ValueError, match="buckets"):
        Histogram([1, 2, 3])
    with pytest.raises(ValueError, match="buckets"):
        Histogram.from_bytes(bytes(24))
