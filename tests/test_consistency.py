"""Snapshots taken by another process while the writer records at full speed
are consistent, every one of them.

The writer (this test process) records a deterministic sequence: request i
goes to a route, with a duration, status, error kind and byte counts that are
functions of i. So a reader that sees ``counters.requests == N`` knows exactly
what every statistic must be after the first N requests, and which fields
every record of index i must hold. The reader (a spawned process) snapshots the
segment in a loop, checks each snapshot against that, and reports how many
snapshots it took, from which source, and the first violation.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from collections import Counter
from typing import Any

import pytest

from netprof_core import SegmentBusy, SegmentReader, SegmentSnapshot
from netprof_core import _layout as L

SPAWN = multiprocessing.get_context("spawn")
MASK64 = (1 << 64) - 1
PERIOD = 840  # the call pattern repeats every PERIOD requests; a multiple of every route count used
T0 = 10**12  # start_ns of request 0; request i starts at T0 + i * 1000
SLOW_NS = 2_000_000_000  # the default slow_request_threshold
STATUS_OF = (0, 101, 200, 204, 302, 404, 503)
MIN_SNAPSHOTS = 20


# -- the call pattern, shared by the writer and the reader ------------------------


def duration_at(k: int) -> int:
    """Durations from 1 µs to 10 s, log-spread, in a scrambled order."""
    return int(1_000 * 10 ** (7 * ((k * 367) % PERIOD) / PERIOD)) + k


def status_of(duration: int) -> int:
    return STATUS_OF[duration % len(STATUS_OF)]


def error_kind_of(duration: int) -> int:
    return (duration // 7) % L.ERROR_KINDS if duration % 3 == 0 else 0


def call_tables(routes: int) -> list[tuple[int, int, int, int, int, int]]:
    """Per position k of the period: (route index, duration, status, error kind,
    ttfb, bytes_out without the route id)."""
    assert PERIOD % routes == 0
    table = []
    for k in range(PERIOD):
        duration = duration_at(k)
        table.append((k % routes, duration, status_of(duration), error_kind_of(duration), duration // 2, duration * 3))
    return table


def route_template(route: int) -> str:
    return f"/hammer/{route}"


def write(record: Any, route_ids: list[int], table: list[tuple[int, ...]], first: int, last: int) -> None:
    """Requests first..last-1: bytes_in is the request's index, bytes_out is
    duration * 3 + route id."""
    for i in range(first, last):
        route, duration, status, error_kind, ttfb, bytes_out = table[i % PERIOD]
        rid = route_ids[route]
        start = T0 + i * 1_000
        record(rid, status, start, start + duration, i, bytes_out + rid, error_kind, ttfb)


def expected_routes(requests: int, routes: int, table: list[tuple[int, ...]]) -> list[dict[str, Any]]:
    """What each route's statistics must be after exactly ``requests`` requests."""
    full, rest = divmod(requests, PERIOD)
    stats: list[dict[str, Any]] = [
        {
            "count": 0,
            "errors": 0,
            "slow": 0,
            "sum_ns": 0,
            "max_ns": 0,
            "bytes_out": 0,
            "ttfb_sum_ns": 0,
            "status_classes": [0] * L.STATUS_CLASSES,
            "error_kinds": [0] * L.ERROR_KINDS,
            "histogram": Counter(),
        }
        for _ in range(routes)
    ]
    for k, (route, duration, status, error_kind, ttfb, bytes_out) in enumerate(table):
        times = full + (k < rest)
        if not times:
            continue
        s = stats[route]
        rid = route + 1
        s["count"] += times
        s["errors"] += times * (error_kind != 0 or status >= 500)
        s["slow"] += times * (duration >= SLOW_NS)
        s["sum_ns"] += times * duration
        s["max_ns"] = max(s["max_ns"], duration)
        s["bytes_out"] += times * (bytes_out + rid)
        s["ttfb_sum_ns"] += times * ttfb
        s["status_classes"][status // 100 if 100 <= status < 600 else 0] += times
        if error_kind:
            s["error_kinds"][error_kind] += times
        s["histogram"][L.bucket_index(duration)] += times
    for route, s in enumerate(stats):
        # Request i goes to route i % routes and has bytes_in == i.
        c = s["count"]
        s["bytes_in"] = route * c + routes * c * (c - 1) // 2
    return stats


# -- the reader process --------------------------------------------------------------


class Violation(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Violation(message)


def check_snapshot(
    snap: SegmentSnapshot, previous: SegmentSnapshot | None, routes: int, table: list[tuple[int, ...]], writer_pid: int
) -> None:
    requests = snap.counters.requests
    check(snap.header.pid == writer_pid, f"header pid {snap.header.pid}")
    check(len(snap.routes) == routes + 1, f"{len(snap.routes)} routes")
    check(snap.counters.internal_errors == 0 and snap.counters.sampled_out == 0, f"counters {snap.counters}")
    check(
        snap.counters.overhead_histogram.count == snap.counters.overhead_count,
        f"overhead histogram {snap.counters.overhead_histogram.count} != {snap.counters.overhead_count}",
    )
    total = 0
    for route in snap.routes:
        what = f"route {route.key}"
        check(route.histogram.count == route.count, f"{what}: histogram count {route.histogram.count} != count {route.count}")
        check(sum(route.status_classes) == route.count, f"{what}: status classes {route.status_classes} != count {route.count}")
        check(route.errors <= route.count, f"{what}: errors {route.errors} > count {route.count}")
        check(route.slow <= route.count, f"{what}: slow {route.slow} > count {route.count}")
        check(sum(route.error_kinds) <= route.count, f"{what}: error kinds {route.error_kinds}")
        total += route.count
    check(total == requests, f"route counts sum to {total}, counters.requests is {requests}")
    check(snap.routes[L.OVERFLOW_ROUTE_ID].count == 0, "overflow route counted")

    if previous is not None:
        check(requests >= previous.counters.requests, f"requests went back: {previous.counters.requests} -> {requests}")
        for before, now in zip(previous.routes, snap.routes):
            check(now.count >= before.count, f"route {now.key} count went back: {before.count} -> {now.count}")

    # The statistics of exactly the first `requests` requests, field by field.
    for route, expected in enumerate(expected_routes(requests, routes, table)):
        actual = snap.routes[route + 1]
        check(actual.key.template == route_template(route), f"route {route + 1} is {actual.key}")
        for name in ("count", "errors", "slow", "sum_ns", "max_ns", "bytes_in", "bytes_out", "ttfb_sum_ns"):
            check(
                getattr(actual, name) == expected[name],
                f"after {requests} requests, {actual.key} {name} is {getattr(actual, name)}, expected {expected[name]}",
            )
        check(list(actual.status_classes) == expected["status_classes"], f"{actual.key} status classes")
        check(list(actual.error_kinds) == expected["error_kinds"], f"{actual.key} error kinds")
        check(
            dict(actual.histogram.nonzero()) == dict(expected["histogram"]),
            f"after {requests} requests, {actual.key} histogram differs",
        )

    # Every record whole: its fields are the functions of its index the writer used.
    last = -1
    ring = snap.control.ring_capacity
    offset = snap.header.mono_offset_ns
    for record in snap.records:
        i = record.index
        check(i > last, f"record indexes not increasing: {last} then {i}")
        last = i
        check(requests - ring <= i < requests, f"record {i} outside [{requests - ring}, {requests})")
        route, duration, status, error_kind, ttfb, _bytes_out = table[i % PERIOD]
        fields = (record.bytes_in, record.route_id, record.duration_ns, record.status, record.error_kind, record.ttfb_ns)
        check(fields == (i, route + 1, duration, status, error_kind, ttfb), f"record {i} torn: {record}")
        check(record.bytes_out == record.duration_ns * 3 + record.route_id, f"record {i} torn: {record}")
        check(record.wall_ns == (T0 + i * 1_000 + duration + offset) & MASK64, f"record {i} wall_ns: {record}")
        check(record.slow == (duration >= SLOW_NS), f"record {i} slow flag: {record}")
        check(record.error == (error_kind != 0 or status >= 500), f"record {i} error flag: {record}")
        check(record.route.template == route_template(route), f"record {i} route: {record.route}")


def reader_main(
    path: str,
    routes: int,
    writer_pid: int,
    ready: Any,
    done: Any,
    failed: Any,
    progress: Any,
    published: Any,
    results: Any,
) -> None:
    """Snapshot ``path`` until the writer is done, then once more; report."""
    report: dict[str, Any] = {"snapshots": 0, "sources": Counter(), "busy": 0, "violation": None, "requests": []}
    try:
        table = call_tables(routes)
        previous = None
        with SegmentReader(path) as reader:
            ready.set()
            while True:
                finished = done.is_set()
                try:
                    snap = reader.snapshot(timeout=5.0)
                except SegmentBusy:
                    report["busy"] += 1
                    continue
                try:
                    check_snapshot(snap, previous, routes, table, writer_pid)
                except Violation as exc:
                    report["violation"] = f"snapshot {report['snapshots'] + 1} ({snap.source}): {exc}"
                    failed.set()
                    break
                previous = snap
                report["snapshots"] += 1
                report["sources"][snap.source] += 1
                report["requests"].append((snap.counters.requests, snap.source))
                progress.value = report["snapshots"]
                if snap.source == "published":
                    published.value += 1
                if finished:  # this one was taken after the writer stopped
                    report["final_requests"] = snap.counters.requests
                    report["final_records"] = len(snap.records)
                    break
    except BaseException:  # noqa: BLE001  (any crash is reported to the parent as a violation)
        report["violation"] = "reader crashed: " + traceback.format_exc()
        failed.set()
    report["sources"] = dict(report["sources"])
    results.put(report)


# -- the writer (this process) -------------------------------------------------------


def run_writer_against_reader(
    make_recorder: Any, *, routes: int, min_records: int, ring: int, max_routes: int, min_published: int = 0
) -> tuple[dict[str, Any], int]:
    rec = make_recorder(max_routes=max_routes, max_stored_requests=ring, log_slow_requests=False)
    route_ids = [rec.route_id(route_template(route)) for route in range(routes)]
    assert route_ids == list(range(1, routes + 1))
    table = call_tables(routes)

    ready, done, failed = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    progress, published = SPAWN.Value("q", 0), SPAWN.Value("q", 0)
    results = SPAWN.Queue()
    reader = SPAWN.Process(
        target=reader_main,
        args=(str(rec.path), routes, os.getpid(), ready, done, failed, progress, published, results),
        daemon=True,
    )
    reader.start()
    try:
        assert ready.wait(120), "the reader process did not start"
        # Record in batches at full speed until the reader has had its chance:
        # enough records, enough snapshots taken meanwhile. The cap only stops
        # a reader that makes no progress from running the test forever.
        batch = 50_000
        cap = 30 * min_records
        written = 0
        while not failed.is_set():
            write(rec.record, route_ids, table, written, written + batch)
            written += batch
            enough = progress.value >= MIN_SNAPSHOTS + 5 and published.value >= min_published
            if (written >= min_records and enough) or written >= cap:
                break
        done.set()
        report = results.get(timeout=120)
        reader.join(60)
    finally:
        done.set()
        if reader.is_alive():
            reader.kill()
            reader.join()
    # This process's own view agrees with what it wrote.
    own = rec.snapshot()
    assert own.counters.requests == written
    check_snapshot(own, None, routes, table, os.getpid())
    return report, written


def assert_consistent(report: dict[str, Any], written: int) -> None:
    summary = {k: v for k, v in report.items() if k != "requests"}
    assert report["violation"] is None, report["violation"]
    assert report["snapshots"] >= MIN_SNAPSHOTS, summary
    # Taken while the writer was busy: many snapshots saw a count below the final one.
    during = sum(1 for n, _ in report["requests"] if n < written)
    assert during >= MIN_SNAPSHOTS - 1, summary
    assert report["final_requests"] == written, summary
    assert report["final_records"] > 0
    assert sum(report["sources"].values()) == report["snapshots"]
    assert set(report["sources"]) <= {"live", "published"}, summary


MIN_RECORDS = {"cython": 10**6, "python": 2 * 10**5}


def test_snapshots_from_another_process_are_consistent(make_recorder: Any, implementation: str) -> None:
    report, written = run_writer_against_reader(
        make_recorder, routes=5, min_records=MIN_RECORDS[implementation], ring=10_000, max_routes=8
    )
    assert written >= MIN_RECORDS[implementation]
    assert_consistent(report, written)


def test_single_route_hammered_is_served_from_the_published_copy(make_recorder: Any, implementation: str) -> None:
    """Every record changes the one route and the sequence counter: a copy of
    the live area rarely survives, so the reader asks the writer to publish."""
    report, written = run_writer_against_reader(
        make_recorder, routes=1, min_records=MIN_RECORDS[implementation], ring=1_000, max_routes=24, min_published=5
    )
    assert_consistent(report, written)
    assert report["sources"].get("published", 0) >= 5, report["sources"]


def test_the_expected_model_matches_a_quiet_recorder(make_recorder: Any, implementation: str) -> None:
    """The checker itself: on a recorder nobody writes to meanwhile, the model
    holds at every count, and a wrong count is caught."""
    rec = make_recorder(max_routes=8, max_stored_requests=500, log_slow_requests=False)
    route_ids = [rec.route_id(route_template(route)) for route in range(5)]
    table = call_tables(5)
    written = 0
    for upto in (0, 1, 7, PERIOD - 1, PERIOD, PERIOD + 3, 5 * PERIOD + 11):
        write(rec.record, route_ids, table, written, upto)
        written = upto
        snap = rec.snapshot()
        assert snap.counters.requests == upto
        check_snapshot(snap, None, 5, table, os.getpid())
        assert len(snap.records) == min(upto, 500)
    with pytest.raises(Violation, match="count"):
        rec.record(route_ids[0], 200, 0, 1)  # a request outside the pattern
        check_snapshot(rec.snapshot(), None, 5, table, os.getpid())
