"""Quantiles from the histograms are within 1 % of the exact ones, and
histograms merge exactly.

The exact quantile is the nearest-rank one on the sorted values,
``sorted(values)[ceil(q * n) - 1]``. Durations range from 1 µs to 1 hour.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from netprof_core import Histogram, ProfilingConfig, Recorder, merge_routes, read_segments
from netprof_core import _layout as L

QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999, 1.0)
TOLERANCE = 0.01
US = 1_000
HOUR = 3_600_000_000_000
N = 20_000


def exact_quantile(sorted_values: list[int], q: float) -> int:
    return sorted_values[max(1, math.ceil(q * len(sorted_values))) - 1]


def assert_quantiles_close(hist: Histogram, values: list[int], what: str = "") -> None:
    ordered = sorted(values)
    assert hist.count == len(values)
    for q in QUANTILES:
        exact = exact_quantile(ordered, q)
        estimate = hist.quantile(q)
        assert abs(estimate - exact) <= TOLERANCE * exact, (
            f"{what} q={q}: estimate {estimate} vs exact {exact} ({(estimate - exact) / exact:+.3%})"
        )


# -- distributions from 1 µs to 1 hour ------------------------------------------------


def clip(value: float) -> int:
    return min(HOUR, max(US, round(value)))


def uniform(rng: random.Random) -> list[int]:
    return [rng.randint(US, HOUR) for _ in range(N)]


def log_uniform(rng: random.Random) -> list[int]:
    return [clip(US * 10 ** rng.uniform(0, math.log10(HOUR / US))) for _ in range(N)]


def log_normal(rng: random.Random) -> list[int]:
    return [clip(rng.lognormvariate(math.log(5e6), 1.5)) for _ in range(N)]  # median 5 ms


def bimodal(rng: random.Random) -> list[int]:
    # Cache hits around 2 ms, misses around 800 ms.
    return [clip(rng.gauss(2e6, 2e5) if rng.random() < 0.7 else rng.gauss(8e8, 1e8)) for _ in range(N)]


def exponential(rng: random.Random) -> list[int]:
    return [clip(rng.expovariate(1 / 5e7)) for _ in range(N)]  # mean 50 ms


def pareto(rng: random.Random) -> list[int]:
    return [clip(1e5 * rng.paretovariate(1.16)) for _ in range(N)]  # 80/20, from 100 µs, heavy tail


def constant_1us(rng: random.Random) -> list[int]:
    return [US] * 1_000


def constant_250us(rng: random.Random) -> list[int]:
    return [250_000] * 1_000


def constant_1h(rng: random.Random) -> list[int]:
    return [HOUR] * 1_000


def tiny_sample(rng: random.Random) -> list[int]:
    return [clip(rng.lognormvariate(math.log(3e7), 2)) for _ in range(7)]


DISTRIBUTIONS: dict[str, Callable[[random.Random], list[int]]] = {
    f.__name__: f
    for f in (uniform, log_uniform, log_normal, bimodal, exponential, pareto, constant_1us, constant_250us, constant_1h, tiny_sample)
}


def values_of(name: str) -> list[int]:
    return DISTRIBUTIONS[name](random.Random(f"netprof-{name}"))


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_quantiles_from_durations_within_one_percent(name: str) -> None:
    values = values_of(name)
    hist = Histogram.from_durations(values)
    assert hist.max_ns == max(values)
    assert_quantiles_close(hist, values, name)


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_quantiles_through_a_recorder_within_one_percent(make_recorder: Any, name: str) -> None:
    values = values_of(name)
    rec = make_recorder(slow_request_threshold=1.0, log_slow_requests=False)
    rid = rec.route_id("/work")
    start = 10**9
    for value in values:
        rec.record(rid, 200, start, start + value)
    route = rec.snapshot(records=False).routes[rid]
    assert route.count == route.histogram.count == len(values)
    assert route.max_ns == route.histogram.max_ns == max(values)
    assert route.sum_ns == sum(values)
    # The recorder's buckets are the reference ones, value for value.
    assert route.histogram == Histogram.from_durations(values)
    assert_quantiles_close(route.histogram, values, name)


def test_quantile_of_an_empty_histogram_is_nan_and_q_is_checked() -> None:
    assert math.isnan(Histogram().quantile(0.5))
    hist = Histogram.from_durations([5_000])
    assert hist.quantile(0.0) == hist.quantile(1.0) == 5_000  # never above the maximum
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError):
            hist.quantile(bad)


# -- property tests ---------------------------------------------------------------------

durations = st.integers(min_value=1_000, max_value=HOUR)
duration_lists = st.lists(durations, min_size=1, max_size=300)
# No example database: the run leaves no files behind, and every run is the same.
PROPERTY = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(duration_lists)
@example([1_023])  # once 3 % off (1000..1023 ns shared a 64 ns bucket): kept as a regression
def test_quantiles_within_one_percent_for_any_durations(values: list[int]) -> None:
    assert_quantiles_close(Histogram.from_durations(values), values)


@pytest.mark.parametrize(
    "value",
    [1_000, 1_002, 1_003, 1_010, 1_023, 1_024],
)
def test_quantile_just_above_one_microsecond(value: int) -> None:
    """The smallest durations of the promised range: a minimal reproduction."""
    hist = Histogram.from_durations([value, value])
    assert_quantiles_close(hist, [value, value], f"{value} ns")


def test_quantile_never_above_the_maximum_for_zero_durations(make_recorder: Any) -> None:
    rec = make_recorder(log_slow_requests=False)
    rid = rec.route_id("/cached")
    for _ in range(10):
        rec.record(rid, 200, 5_000, 5_000)  # answered from cache within the clock's resolution
    route = rec.snapshot(records=False).routes[rid]
    assert route.max_ns == 0 and route.histogram.count == 10
    assert route.histogram.quantile(0.5) == route.histogram.quantile(1.0) == 0


@PROPERTY
@given(duration_lists, duration_lists)
def test_merging_equals_the_histogram_of_the_concatenation(first: list[int], second: list[int]) -> None:
    a, b = Histogram.from_durations(first), Histogram.from_durations(second)
    a_before, b_before = list(a.counts), list(b.counts)
    whole = Histogram.from_durations(first + second)
    assert a + b == whole
    assert b + a == whole
    assert list(a.counts) == a_before and list(b.counts) == b_before  # + leaves its operands alone
    merged = Histogram.from_durations(first)
    merged += b
    assert merged == whole
    assert (a + b).counts.tolist() == [x + y for x, y in zip(a.counts, b.counts)]
    assert (whole - a).counts == b.counts  # and the difference undoes it


@PROPERTY
@given(st.lists(st.integers(min_value=0, max_value=2**63 - 1), min_size=1, max_size=100))
def test_recorded_histogram_equals_reference_buckets(tmp_path: Path, implementation: str, values: list[int]) -> None:
    """Over the whole valid range of durations, the core files every duration in
    the bucket the reference ``bucket_index`` names."""
    config = ProfilingConfig(segment_dir=str(tmp_path / "segments"), app_name="buckets", log_slow_requests=False)
    with Recorder(config, implementation=implementation) as rec:
        rid = rec.route_id("/any")
        for value in values:
            rec.record(rid, 200, 0, value)
        hist = rec.snapshot(records=False).routes[rid].histogram
        assert hist == Histogram.from_durations(values)
        assert rec.path is not None
        rec.path.unlink()


def test_merged_across_recorders_equals_concatenation(implementation: str, segment_dir: Path) -> None:
    """Two recorders of one app (as two processes would be) merge into exactly
    the histogram of all their durations, with quantiles within 1 %."""
    first, second = values_of("bimodal"), values_of("pareto")
    config = ProfilingConfig(segment_dir=str(segment_dir), app_name="merged", log_slow_requests=False)
    recorders = [Recorder(config, implementation=implementation) for _ in range(2)]
    try:
        for rec, values in zip(recorders, (first, second)):
            rid = rec.route_id("/merged", "POST")
            for value in values:
                rec.record(rid, 200, 0, value)
        snapshots = read_segments(segment_dir)
        assert len(snapshots) == 2
        merged = {key[1].template: stats for key, stats in merge_routes(snapshots).items()}
        hist = merged["/merged"].histogram
        assert hist == Histogram.from_durations(first) + Histogram.from_durations(second)
        assert hist == Histogram.from_durations(first + second)
        assert merged["/merged"].count == len(first) + len(second)
        assert merged["/merged"].sum_ns == sum(first) + sum(second)
        assert_quantiles_close(hist, first + second, "merged")
        assert merged[L.OVERFLOW_TEMPLATE].count == 0
    finally:
        for rec in recorders:
            rec.close()
