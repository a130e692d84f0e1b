"""record() beside the floor (an empty method of a cdef class taking the same
arguments) and beside what a user would otherwise write: a prometheus_client
Histogram with labels. Each benchmark makes CALLS calls, so the figures are
per CALLS calls; benchmarks/report.py turns a JSON run into per-call ratios."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import Histogram as PromHistogram

from netprof_core import Direction

CALLS = 1000
START = time.monotonic_ns()
END = START + 1_234_567


@pytest.mark.c_extension
def test_floor_empty_cdef_method(benchmark) -> None:
    from netprof_core._recorder_c import EmptyRecorder

    record = EmptyRecorder().record

    def calls() -> None:
        for _ in range(CALLS):
            record(1, 200, START, END, 512, 2048, 0)

    benchmark(calls)


def test_record(benchmark, make_recorder) -> None:
    recorder = make_recorder()
    route = recorder.route_id("/items/{item_id}", "GET", Direction.INBOUND)
    record = recorder.record

    def calls() -> None:
        for _ in range(CALLS):
            record(route, 200, START, END, 512, 2048, 0)

    benchmark(calls)
    assert recorder.snapshot(records=False).counters.requests >= CALLS


def test_record_sampled_out(benchmark, make_recorder) -> None:
    """At a 0 % sample rate: the cost of profiling that is rolled out but off."""
    recorder = make_recorder(sample_rate=0.0)
    route = recorder.route_id("/items/{item_id}")
    record = recorder.record

    def calls() -> None:
        for _ in range(CALLS):
            record(route, 200, START, END, 512, 2048, 0)

    benchmark(calls)


def test_prometheus_client_histogram(benchmark) -> None:
    histogram = PromHistogram(
        "http_request_duration_seconds",
        "Request latency",
        ["method", "route", "status"],
        registry=CollectorRegistry(),
    )
    seconds = (END - START) / 1e9

    def calls() -> None:
        for _ in range(CALLS):
            histogram.labels("GET", "/items/{item_id}", "200").observe(seconds)

    benchmark(calls)


def test_record_unmonitored(benchmark, make_recorder) -> None:
    """With performance_monitoring off: what timing 1 call in 64 costs."""
    recorder = make_recorder(performance_monitoring=False)
    route = recorder.route_id("/items/{item_id}")
    record = recorder.record

    def calls() -> None:
        for _ in range(CALLS):
            record(route, 200, START, END, 512, 2048, 0)

    benchmark(calls)


def test_snapshot_default_segment(benchmark, make_recorder) -> None:
    """A reader's consistent snapshot of a full default-size segment (the
    daemon takes one per process per tick). Per snapshot, not per CALLS."""
    recorder = make_recorder()
    routes = [recorder.route_id(f"/route/{i}") for i in range(recorder.layout.route_capacity)]
    for i in range(5 * recorder.layout.ring_capacity):
        recorder.record(routes[i % len(routes)], 200, START, END + i * 997, 512, 2048, 0)
    snapshot = benchmark(recorder.snapshot)
    assert len(snapshot.records) == recorder.layout.ring_capacity
