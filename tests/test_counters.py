"""Counts are exact: under threads sharing one recorder, across processes
sharing one segment directory, and across fork.

Every expected value here is computed from the calls the test makes, never
from the recorder: totals, per-route counts, errors, status classes, error
kinds, byte and duration sums, and whole histograms bucket by bucket.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netprof_core import (
    Direction,
    Histogram,
    ProfilingConfig,
    Recorder,
    RouteKey,
    merge_routes,
    read_segments,
)
from netprof_core import _layout as L

FORK = multiprocessing.get_context("fork")
SLOW_NS = 2_000_000_000  # the default slow_request_threshold, 2 s
MASK64 = (1 << 64) - 1


@dataclass
class Expected:
    """The statistics of one route, accumulated from the calls made."""

    count: int = 0
    errors: int = 0
    slow: int = 0
    sum_ns: int = 0
    max_ns: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    ttfb_sum_ns: int = 0
    status_classes: list[int] = field(default_factory=lambda: [0] * L.STATUS_CLASSES)
    error_kinds: list[int] = field(default_factory=lambda: [0] * L.ERROR_KINDS)
    histogram: Counter[int] = field(default_factory=Counter)

    def add(self, status: int, duration: int, bytes_in: int, bytes_out: int, error_kind: int, ttfb: int, times: int = 1) -> None:
        self.count += times
        self.errors += times * (error_kind != 0 or status >= 500)
        self.slow += times * (duration >= SLOW_NS)
        self.sum_ns += times * duration
        self.max_ns = max(self.max_ns, duration)
        self.bytes_in += times * bytes_in
        self.bytes_out += times * bytes_out
        self.ttfb_sum_ns += times * ttfb
        self.status_classes[status // 100 if 100 <= status < 600 else 0] += times
        if error_kind:
            self.error_kinds[error_kind] += times
        self.histogram[L.bucket_index(duration)] += times

    def hist(self) -> Histogram:
        counts = [0] * L.HIST_BUCKETS
        for index, count in self.histogram.items():
            counts[index] = count
        return Histogram(counts, self.max_ns)


def assert_route_matches(actual: Any, expected: Expected, what: str) -> None:
    """``actual``: a RouteStats. Every field exact, and the invariants between them."""
    assert actual.count == expected.count, f"{what}: count"
    assert actual.errors == expected.errors, f"{what}: errors"
    assert actual.slow == expected.slow, f"{what}: slow"
    assert actual.sum_ns == expected.sum_ns & MASK64, f"{what}: sum_ns"
    assert actual.max_ns == expected.max_ns, f"{what}: max_ns"
    assert actual.bytes_in == expected.bytes_in & MASK64, f"{what}: bytes_in"
    assert actual.bytes_out == expected.bytes_out & MASK64, f"{what}: bytes_out"
    assert actual.ttfb_sum_ns == expected.ttfb_sum_ns & MASK64, f"{what}: ttfb_sum_ns"
    assert list(actual.status_classes) == expected.status_classes, f"{what}: status classes"
    assert list(actual.error_kinds) == expected.error_kinds, f"{what}: error kinds"
    assert actual.histogram.count == actual.count, f"{what}: histogram count != count"
    assert sum(actual.status_classes) == actual.count, f"{what}: status classes do not sum to count"
    assert actual.histogram == expected.hist(), f"{what}: histogram buckets"


def quiet_config(directory: Path | str, **keys: Any) -> ProfilingConfig:
    keys.setdefault("app_name", "counters")
    keys.setdefault("log_slow_requests", False)
    return ProfilingConfig(segment_dir=str(directory), **keys)


# -- (a) threads sharing one recorder ----------------------------------------------

THREADS = 4
PER_THREAD = 200_000
THREAD_ROUTES = ["/a", "/b/{id}", "/c", "/d", "/e/{x}/f"]
STATUS_CYCLE = [200, 201, 204, 0, 101, 302, 404, 429, 500, 503, 599, 600, 200, 200]
DURATION_CYCLE = [0, 1, 63, 64, 999, 1_000, 1_024, 5_000, 123_456, 10**6, 7 * 10**7, SLOW_NS - 1, SLOW_NS, 3 * 10**9, 1 << 42, 1 << 43]


def thread_calls(thread: int, route_ids: list[int]) -> list[tuple[Any, ...]]:
    """One period of the calls a thread makes, cycled: P entries, a few of them invalid."""
    period = 16 * 14 * 5 + thread  # coprime-ish lengths, different per thread: the mixes differ
    calls: list[tuple[Any, ...]] = []
    for k in range(period):
        if k % 97 == 13:
            calls.append((route_ids[0], 200, 10, 5))  # end before start: an internal error
            continue
        duration = DURATION_CYCLE[(k + thread) % len(DURATION_CYCLE)]
        status = STATUS_CYCLE[k % len(STATUS_CYCLE)]
        error_kind = (k // 3 + thread) % L.ERROR_KINDS if k % 5 == 0 else 0
        start = 1_000_000 + k * 1_000
        calls.append(
            (route_ids[(k * 7 + thread) % len(route_ids)], status, start, start + duration, k * 11 + thread, 3 * k, error_kind, duration // 2)
        )
    return calls


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Make the interpreter switch threads often, so that they interleave within records."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def test_threads_on_one_recorder_count_exactly(make_recorder: Any, fast_switching: None) -> None:
    rec = make_recorder(performance_monitoring=True, auto_disable_on_error=False, log_slow_requests=False, max_routes=8)
    route_ids = [rec.route_id(template) for template in THREAD_ROUTES]
    # The same key interned again, from many threads at once, gets the same id.
    assert rec.route_id(THREAD_ROUTES[1]) == route_ids[1]
    calls = [thread_calls(thread, route_ids) for thread in range(THREADS)]
    barrier = threading.Barrier(THREADS)
    failures: list[BaseException] = []

    def run(mine: list[tuple[Any, ...]]) -> None:
        try:
            record = rec.record
            barrier.wait()
            for args in itertools.islice(itertools.cycle(mine), PER_THREAD):
                record(*args)
        except BaseException as exc:  # noqa: BLE001  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(mine,)) for mine in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures

    expected = {rid: Expected() for rid in route_ids}
    invalid = 0
    for mine in calls:
        full, rest = divmod(PER_THREAD, len(mine))
        for position, (rid, status, start, end, *more) in enumerate(mine):
            times = full + (position < rest)
            if end < start:
                invalid += times
                continue
            bytes_in, bytes_out, error_kind, ttfb = more
            expected[rid].add(status, end - start, bytes_in, bytes_out, error_kind, ttfb, times)
    valid = THREADS * PER_THREAD - invalid

    snap = rec.snapshot()
    assert snap.counters.requests == valid
    assert snap.counters.internal_errors == invalid > 0
    assert snap.counters.sampled_out == snap.counters.disabled_calls == snap.counters.auto_disable_events == 0
    assert snap.counters.overhead_count > 0
    assert snap.counters.overhead_histogram.count == snap.counters.overhead_count
    assert sum(route.count for route in snap.routes) == valid
    assert snap.routes[L.OVERFLOW_ROUTE_ID].count == 0
    for rid, template in zip(route_ids, THREAD_ROUTES):
        route = snap.routes[rid]
        assert route.key == RouteKey(Direction.INBOUND, "GET", template)
        assert_route_matches(route, expected[rid], template)
    # The ring holds the last records, whole and in order.
    records = snap.records
    assert len(records) == rec.layout.ring_capacity
    assert [r.index for r in records] == list(range(valid - len(records), valid))
    for r in records:
        assert r.bytes_out % 3 == 0 and r.ttfb_ns == r.duration_ns // 2
        assert r.slow == (r.duration_ns >= SLOW_NS)
        assert r.error == (r.error_kind != 0 or r.status >= 500)


# -- (b) processes sharing one segment directory -------------------------------------

PROCESSES = 8
SHARED_ROUTES = [
    ("/users/{id}", "GET", Direction.INBOUND),
    ("/users/{id}", "POST", Direction.INBOUND),
    ("https://payments.example/charge", "POST", Direction.OUTBOUND),
]


def process_requests(process: int) -> int:
    return 15_000 + 2_501 * process  # different per process


def process_call(process: int, i: int) -> tuple[int, int, int, int, int, int]:
    """(route index, status, duration, bytes_in, bytes_out, error kind) of call i of a process."""
    route = (i + process) % len(SHARED_ROUTES)
    duration = 1_000 + ((i * 7919 + process * 104_729) % 5_000_000) * (1 + (i % 11 == 0) * 1000)
    status = (200, 201, 404, 500, 0, 302)[(i + route) % 6]
    error_kind = (process + i) % L.ERROR_KINDS if i % 13 == 0 else 0
    return route, status, duration, i % 1500, process * 10 + route, error_kind


def _child_records(implementation: str, directory: str, process: int) -> None:
    rec = Recorder(quiet_config(directory, app_name="multi", performance_monitoring=False), implementation=implementation)
    # Each process interns the routes in its own order: their ids differ between processes.
    order = SHARED_ROUTES[process % 3 :] + SHARED_ROUTES[: process % 3]
    ids = {key: rec.route_id(*key) for key in order}
    route_ids = [ids[key] for key in SHARED_ROUTES]
    record = rec.record
    for i in range(process_requests(process)):
        route, status, duration, bytes_in, bytes_out, error_kind = process_call(process, i)
        record(route_ids[route], status, 5_000, 5_000 + duration, bytes_in, bytes_out, error_kind)
    rec.close()  # the segment stays, marked closed


def expected_of_process(process: int) -> dict[int, Expected]:
    expected = {route: Expected() for route in range(len(SHARED_ROUTES))}
    for i in range(process_requests(process)):
        route, status, duration, bytes_in, bytes_out, error_kind = process_call(process, i)
        expected[route].add(status, duration, bytes_in, bytes_out, error_kind, 0)
    return expected


def route_key(key: tuple[str, str, Direction]) -> RouteKey:
    template, method, direction = key
    return RouteKey(direction, method, template)


def test_processes_in_one_directory_merge_exactly(implementation: str, segment_dir: Path) -> None:
    children = [
        FORK.Process(target=_child_records, args=(implementation, str(segment_dir), process)) for process in range(PROCESSES)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join()
    assert [child.exitcode for child in children] == [0] * PROCESSES
    pids = {child.pid: process for process, child in enumerate(children)}

    snapshots = read_segments(segment_dir)
    assert len(snapshots) == PROCESSES
    assert {snap.header.pid for snap in snapshots} == set(pids)
    assert all(snap.header.closed for snap in snapshots)

    total = {route: Expected() for route in range(len(SHARED_ROUTES))}
    for snap in snapshots:
        process = pids[snap.header.pid]
        assert snap.app_name == "multi"
        assert snap.counters.requests == process_requests(process)
        assert snap.counters.internal_errors == 0
        by_key = {route.key: route for route in snap.routes}
        for route, expected in expected_of_process(process).items():
            assert_route_matches(by_key[route_key(SHARED_ROUTES[route])], expected, f"process {process} route {route}")
            totals = total[route]
            for name in ("count", "errors", "slow", "sum_ns", "bytes_in", "bytes_out", "ttfb_sum_ns"):
                setattr(totals, name, getattr(totals, name) + getattr(expected, name))
            totals.max_ns = max(totals.max_ns, expected.max_ns)
            totals.status_classes = [a + b for a, b in zip(totals.status_classes, expected.status_classes)]
            totals.error_kinds = [a + b for a, b in zip(totals.error_kinds, expected.error_kinds)]
            totals.histogram.update(expected.histogram)

    merged = merge_routes(snapshots)
    for route, key in enumerate(SHARED_ROUTES):
        stats = merged[("multi", route_key(key))]
        assert_route_matches(stats, total[route], f"merged {key}")
        # Bucket by bucket, the merged histogram is the sum of the processes' histograms.
        per_process = [next(r for r in snap.routes if r.key == route_key(key)).histogram for snap in snapshots]
        for bucket in range(L.HIST_BUCKETS):
            assert stats.histogram.counts[bucket] == sum(h.counts[bucket] for h in per_process), bucket
        assert stats.histogram.max_ns == max(h.max_ns for h in per_process)
    overflow = merged[("multi", RouteKey(Direction.INBOUND, "", L.OVERFLOW_TEMPLATE))]
    assert overflow.count == 0
    assert len(merged) == len(SHARED_ROUTES) + 1
    assert sum(stats.count for stats in merged.values()) == sum(map(process_requests, range(PROCESSES)))


# -- (c) a recorder inherited across fork ------------------------------------------

CHILDREN = 3


def child_requests(child: int) -> int:
    return 1_000 + 777 * child


def _forked_child(rec: Recorder, child: int, route_ids: list[int], results: Any) -> None:
    try:
        before = rec.snapshot()
        ids_again = [rec.route_id(template) for template in THREAD_ROUTES[:3]]
        for i in range(child_requests(child)):
            rec.record(route_ids[i % 3], 200 + 100 * (i % 4), 0, 1_000 * (child + 1), 1, 2, 0)
        after = rec.snapshot()
        results.put(
            {
                "child": child,
                "pid": os.getpid(),
                "path": str(rec.path),
                "header_pid": before.header.pid,
                "before_requests": before.counters.requests,
                "before_counts": [route.count for route in before.routes],
                "before_records": len(before.records),
                "route_keys": [str(route.key) for route in before.routes],
                "ids_again": ids_again,
                "after_requests": after.counters.requests,
                "after_counts": [route.count for route in after.routes],
                "after_durations": sorted({r.duration_ns for r in after.records}),
                "sample_rate": after.control.sample_rate,
                "slow_threshold": after.control.slow_request_threshold,
                "error": None,
            }
        )
        rec.close()
    except BaseException as exc:  # noqa: BLE001  # pragma: no cover - reported by the parent
        results.put({"child": child, "error": repr(exc)})


def test_forked_children_write_their_own_segments(make_recorder: Any, segment_dir: Path) -> None:
    rec = make_recorder(performance_monitoring=False, log_slow_requests=False, slow_request_threshold=0.25)
    route_ids = [rec.route_id(template) for template in THREAD_ROUTES[:3]]
    parent_requests = 5_000
    for i in range(parent_requests):
        rec.record(route_ids[i % 3], 200, 0, 7, 3, 4)
    parent_before = rec.snapshot()
    parent_path = rec.path

    results = FORK.Queue()
    children = [FORK.Process(target=_forked_child, args=(rec, child, route_ids, results)) for child in range(CHILDREN)]
    for child in children:
        child.start()
    reports = sorted((results.get(timeout=120) for _ in children), key=lambda report: report["child"])
    for child in children:
        child.join()
    assert [child.exitcode for child in children] == [0] * CHILDREN
    assert [report["error"] for report in reports] == [None] * CHILDREN

    parent_keys = [str(route.key) for route in parent_before.routes]
    for report, child in zip(reports, children):
        n = child_requests(report["child"])
        assert report["pid"] == child.pid == report["header_pid"]
        assert report["path"] != str(parent_path)
        # A fresh segment: the same routes and settings, counts from zero.
        assert report["route_keys"] == parent_keys
        assert report["ids_again"] == route_ids
        assert report["before_requests"] == 0 and report["before_records"] == 0
        assert report["before_counts"] == [0] * len(parent_keys)
        assert report["slow_threshold"] == 0.25 and report["sample_rate"] == 1.0
        assert report["after_requests"] == n
        assert report["after_counts"] == [0] + [len(range(k, n, 3)) for k in range(3)]
        assert report["after_durations"] == [1_000 * (report["child"] + 1)]

    # The parent's segment was not touched by the children...
    parent_after = rec.snapshot()
    assert parent_after.counters == parent_before.counters
    assert [route.count for route in parent_after.routes] == [route.count for route in parent_before.routes]
    assert parent_after.records == parent_before.records
    # ...and the parent records on into it.
    rec.record(route_ids[0], 200, 0, 7)
    assert rec.snapshot().counters.requests == parent_requests + 1
    assert rec.path == parent_path and rec.header.pid == os.getpid()

    snapshots = {snap.header.pid: snap for snap in read_segments(segment_dir)}
    assert set(snapshots) == {os.getpid(), *(child.pid for child in children)}
    assert not snapshots[os.getpid()].header.closed
    assert snapshots[os.getpid()].counters.requests == parent_requests + 1
    for report, child in zip(reports, children):
        snap = snapshots[child.pid]
        assert snap.header.closed
        assert snap.path == report["path"]
        assert snap.counters.requests == child_requests(report["child"])
    merged = merge_routes(snapshots.values())
    assert sum(stats.count for stats in merged.values()) == parent_requests + 1 + sum(
        child_requests(report["child"]) for report in reports
    )
