"""Fuzzing segment files (issue 15, "Trust"): whatever a file in the segment
directory holds, every reader answers a snapshot or a SegmentError, in
bounded time, and the daemon's store never raises out of a tick.

The files start as real segments made by a recorder of each core (the
``implementation`` fixture), with routes, records and hostile names; then
hypothesis changes header fields (capacities and the size that follows from
them, version, sizes, identity, app name bytes, closed_ns), route table words
(the count, the names' bytes), control words, statistics words and ring
records. Each file is read by every reader netprof has: ``read_segment``,
``SegmentReader``, the export's ``RecordScan``, ``netprof stats``'s table, and
netprofd's ``SegmentStore`` (in process, two ticks). A live segment's control
block, which netprofd may write, is fuzzed under a writer that keeps recording.
(tests/test_segment_errors.py fuzzes single header bytes and truncation.)
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from netprof_core import Direction, Recorder, SegmentError, SegmentSnapshot, read_segment, read_segments
from netprof_core import _layout as L
from netprof_core.cli import _render, _stats_json, route_table
from netprof_core.reader import RecordScan, SegmentReader
from netprof_daemon.store import SegmentStore
from tests.fuzzing import fuzz_settings

MakeRecorder = Callable[..., Recorder]

T0 = 10**15
# Whatever a file holds, a reading of it ends within this (a ring of a million
# records included, on a loaded machine).
BOUND_SECONDS = 5.0
ROUTES = (
    ("GET", "/items/{item_id}", Direction.INBOUND),
    ("POST", '=HYPERLINK("x")', Direction.INBOUND),
    ("GET", "/clear\x1b[2J\u202e", Direction.INBOUND),
    ("GET", "api.example/v1/{id}", Direction.OUTBOUND),
)
U32_FIELDS = ("layout_version", "header_size", "ring_capacity", "route_capacity", "requested_ring_capacity",
              "requested_route_capacity", "hist_buckets", "memory_shrinks")  # fmt: skip
U64_FIELDS = ("total_size", "pid", "start_ticks", "created_ns")
FORMATS = {**dict.fromkeys(U32_FIELDS, "<I"), **dict.fromkeys(U64_FIELDS, "<Q"), "mono_offset_ns": "<q"}


def make_segment(recorder: Recorder) -> None:
    for i, (method, template, direction) in enumerate(ROUTES):
        route = recorder.route_id(template, method, direction)
        for n in range(5):
            recorder.record(route, (200, 500, 404)[n % 3], T0 + n, T0 + 1000 * (i + 1) + n, 10, 20 + n)


def layout_of(data: bytes) -> L.SegmentLayout:
    """Where the areas of the segment ``data`` lie, from its header's capacities."""
    return L.SegmentLayout(
        L.read_header_field(data, "ring_capacity"), L.read_header_field(data, "route_capacity")
    )


class SegmentBytes(bytes):
    """A segment's bytes, shown short in a failing example (not 600 KB of repr)."""

    def __repr__(self) -> str:
        return f"<a segment of {len(self)} bytes>"


@pytest.fixture
def segment_bytes(make_recorder: MakeRecorder) -> bytes:
    """A real, closed segment of the parametrised core: 4 routes, 20 records, a 64-record ring."""
    recorder = make_recorder(app_name="source", max_stored_requests=64, max_routes=8)
    make_segment(recorder)
    recorder.close()
    assert recorder.path is not None
    data = recorder.path.read_bytes()
    recorder.path.unlink()
    return SegmentBytes(data)


@pytest.fixture
def fuzz_dir(tmp_path: Path) -> Path:
    path = tmp_path / "fuzzed"
    path.mkdir()
    return path


class StoreErrors(logging.Handler):
    """Errors netprofd's store logged with a traceback: a bug of its own
    (``SegmentStore._guarded``), never the verdict on a bad file."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@pytest.fixture
def store_errors() -> Iterator[StoreErrors]:
    handler = StoreErrors()
    logger = logging.getLogger("netprofd")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


# -- every reader, on one file ---------------------------------------------------------------------------


def read_everywhere(path: Path, state_dir: Path, store_errors: StoreErrors) -> SegmentSnapshot | None:
    """Read ``path`` with every reader: each answers or raises SegmentError,
    within BOUND_SECONDS; the store's ticks raise nothing and log no bug."""
    outcome: list[Any] = []

    def read() -> None:
        try:
            outcome.append(_read_everywhere(path, state_dir, store_errors))
        except BaseException as exc:  # noqa: BLE001  (handed to the test's thread)
            outcome.append(exc)

    # In a thread of its own: a reading that never ends fails the test, not the session.
    reader = threading.Thread(target=read, name="fuzz-reader", daemon=True)
    reader.start()
    reader.join(BOUND_SECONDS)
    if reader.is_alive():
        pytest.fail(f"reading {path} did not end within {BOUND_SECONDS} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]  # type: ignore[no-any-return]


def _read_everywhere(path: Path, state_dir: Path, store_errors: StoreErrors) -> SegmentSnapshot | None:
    started = time.monotonic()
    snapshot: SegmentSnapshot | None = None
    try:
        snapshot = read_segment(path, timeout=0.05)
    except SegmentError as exc:
        assert str(path) in str(exc) and exc.reason, exc
    try:
        with SegmentReader(path) as reader:
            reader.snapshot(records=False, routes=False, timeout=0.05)
    except SegmentError:
        pass
    try:
        with RecordScan(path, timeout=0.05) as scan:  # what an export reads
            while scan.next_chunk() is not None:
                pass
    except (SegmentError, OSError, ValueError):  # what the export skips a segment for
        pass
    # `netprof stats` (read_segments skips what it cannot read), as a table and as JSON.
    snapshots = read_segments(path.parent, records=False, timeout=0.05)
    _render(route_table(snapshots))
    _stats_json(snapshots)
    store = SegmentStore(path.parent, state_dir)
    try:
        store.refresh()
        store.refresh()
    finally:
        store.close()
    assert not store_errors.records, [r.getMessage() for r in store_errors.records]
    assert time.monotonic() - started < BOUND_SECONDS, (
        f"reading {path} took {time.monotonic() - started:.1f} s"
    )
    return snapshot


def write(directory: Path, data: bytes | bytearray, size: int | None = None) -> Path:
    """``data`` as a segment file, cut or extended (sparse) to ``size`` bytes."""
    path = directory / "fuzz-1-1-0.npseg"
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.write(data if size is None else data[:size])
        if size is not None and size > len(data):
            f.truncate(size)
    return path


# -- strategies -----------------------------------------------------------------------------------------

U32_EDGES = (0, 1, 2, 3, 7, 8, 15, 16, 17, 63, 64, 65, 4095, 4096, 4097, 999_999, 1_000_000, 1_000_001,
             2**31 - 1, 2**31, 2**32 - 1)  # fmt: skip
u32 = st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1))
name_bytes = st.binary(min_size=L.ROUTE_NAME_SIZE, max_size=L.ROUTE_NAME_SIZE)  # one route table entry
u64 = st.one_of(u32, st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))


def _field_value(name: str) -> st.SearchStrategy[int]:
    if name == "mono_offset_ns":
        return st.integers(-(2**63), 2**63 - 1)
    return u32 if name in U32_FIELDS else u64


header_fields = st.sampled_from(sorted(FORMATS)).flatmap(
    lambda name: st.tuples(st.just(name), _field_value(name))
)


@fuzz_settings(150)
@given(
    fields=st.lists(header_fields, min_size=1, max_size=6),
    app_name=st.none() | st.binary(min_size=64, max_size=64) | st.binary(max_size=64),
    closed_ns=st.none() | u64,
)
def test_fuzz_header_fields(
    segment_bytes: bytes, fuzz_dir: Path, tmp_path: Path, store_errors: StoreErrors,
    fields: list[tuple[str, int]], app_name: bytes | None, closed_ns: int | None,
) -> None:  # fmt: skip
    buf = bytearray(segment_bytes)
    for name, value in fields:
        struct.pack_into(FORMATS[name], buf, L.HEADER_OFFSETS[name], value)
    if app_name is not None:
        buf[L.HEADER_OFFSETS["app_name"] : L.HEADER_OFFSETS["app_name"] + 64] = app_name.ljust(64, b"\0")
    if closed_ns is not None:
        L.U64.pack_into(buf, L.CLOSED_NS_OFFSET, closed_ns)
    read_everywhere(write(fuzz_dir, buf), tmp_path / "state", store_errors)


@fuzz_settings(60)
@given(
    ring=st.one_of(u32, st.integers(0, 1_000_000)),
    routes=st.one_of(u32, st.integers(0, 4096)),
    wanted_ring=st.none() | u32,
    wanted_routes=st.none() | u32,
    shrinks=st.sampled_from([0, 1, 2]),
    size_change=st.sampled_from([0, 0, 0, -1, -8, 1, 4096]),
    next_index=st.none() | u64,
)
# The largest segment a writer makes (max_stored_requests and max_routes at
# their bounds, 205 MB, sparse), full; one record past it; and the issue's
# absurd ring (2**32 - 1 records, a sparse file of 275 GB, claiming as many requests).
@example(
    ring=1_000_000,
    routes=4096,
    wanted_ring=None,
    wanted_routes=None,
    shrinks=0,
    size_change=0,
    next_index=2**40,
)
@example(
    ring=1_000_001,
    routes=4096,
    wanted_ring=None,
    wanted_routes=None,
    shrinks=0,
    size_change=0,
    next_index=None,
)
@example(
    ring=2**32 - 1, routes=8, wanted_ring=None, wanted_routes=None, shrinks=0, size_change=0, next_index=2**40
)
def test_fuzz_capacities_with_the_size_that_follows(
    segment_bytes: bytes, fuzz_dir: Path, tmp_path: Path, store_errors: StoreErrors,
    ring: int, routes: int, wanted_ring: int | None, wanted_routes: int | None, shrinks: int,
    size_change: int, next_index: int | None,
) -> None:  # fmt: skip
    """Capacities with a total_size (and a file, sparse) that agree: past the
    size check, to the bounds of what a writer makes, and to reading a large
    ring (``next_index``: the records the statistics claim). A ring of up to
    1,000,000 records, within bounds, is read within BOUND_SECONDS by every
    reader; one past the bounds is refused."""
    buf = bytearray(segment_bytes)
    for name, value in (("ring_capacity", ring), ("route_capacity", routes),
                        ("requested_ring_capacity", ring if wanted_ring is None else wanted_ring),
                        ("requested_route_capacity", routes if wanted_routes is None else wanted_routes),
                        ("memory_shrinks", shrinks)):  # fmt: skip
        struct.pack_into(FORMATS[name], buf, L.HEADER_OFFSETS[name], value)
    layout = L.SegmentLayout(ring, routes)
    struct.pack_into("<Q", buf, L.HEADER_OFFSETS["total_size"], layout.total_size % 2**64)
    size = max(0, layout.total_size + size_change)
    if size > 2**40:  # (a sparse file past a terabyte: the header check alone is the point)
        size = len(buf)
    path = write(fuzz_dir, buf, size)
    if next_index is not None and layout.ring_offset <= size:
        with open(path, "r+b") as f:
            for area in (layout.live_offset, layout.published_offset):
                f.seek(area + L.G_NEXT_INDEX * L.WORD)
                f.write(L.U64.pack(next_index))
    read_everywhere(path, tmp_path / "state", store_errors)


@pytest.mark.parametrize("pid", [2**63 - 1, 2**64 - 1, 2**31, 0])
def test_a_pid_no_process_can_have_is_no_writer(
    segment_bytes: bytes, fuzz_dir: Path, tmp_path: Path, store_errors: StoreErrors, pid: int
) -> None:
    """Regression (found by the fuzzing): a segment not closed, with no start
    time, whose header claims a pid past pid_t made read_segment() (and so
    ``netprof stats``) raise OverflowError from os.kill(); pid 0 was taken for
    a live writer forever (os.kill(0, 0) signals the caller's own group)."""
    buf = bytearray(segment_bytes)
    for name, value in (("pid", pid), ("start_ticks", 0)):
        struct.pack_into(FORMATS[name], buf, L.HEADER_OFFSETS[name], value)
    L.U64.pack_into(buf, L.CLOSED_NS_OFFSET, 0)
    path = write(fuzz_dir, buf)
    assert read_segment(path).source == "final"  # no writer alive: all it will ever hold
    assert len(read_segments(fuzz_dir)) == 1
    read_everywhere(path, tmp_path / "state", store_errors)


def _words_in(start: int, end: int) -> st.SearchStrategy[int]:
    return st.integers(start // L.WORD, end // L.WORD - 1)


@fuzz_settings(200)
@given(
    area=st.sampled_from(["route table", "control", "live", "published", "ring", "anywhere"]),
    data=st.data(),
)
def test_fuzz_words_of_the_segment(
    segment_bytes: bytes, fuzz_dir: Path, tmp_path: Path, store_errors: StoreErrors, area: str, data: Any
) -> None:
    """Words of each area set to random and edge values: the route count and
    names, the control block, the statistics (sequence words, counters,
    histograms: sums that wrap), the ring's records."""
    layout = layout_of(segment_bytes)
    bounds = {
        "route table": (L.ROUTES_OFFSET, layout.live_offset),
        "control": (L.CONTROL_OFFSET, L.CONTROL_OFFSET + L.CONTROL_SIZE),
        "live": (layout.live_offset, layout.published_offset),
        "published": (layout.published_offset, layout.ring_offset),
        "ring": (layout.ring_offset, layout.total_size),
        "anywhere": (L.HEADER_SIZE, layout.total_size),
    }[area]
    writes = data.draw(st.lists(st.tuples(_words_in(*bounds), u64), min_size=1, max_size=12), label="writes")
    buf = bytearray(segment_bytes)
    for word, value in writes:
        L.U64.pack_into(buf, word * L.WORD, value)
    read_everywhere(write(fuzz_dir, buf), tmp_path / "state", store_errors)


@fuzz_settings(100)
@given(
    count=st.one_of(st.integers(0, 12), u64),
    names=st.lists(st.tuples(st.integers(0, 8), name_bytes), max_size=4),
)  # fmt: skip
def test_fuzz_the_route_table(
    segment_bytes: bytes, fuzz_dir: Path, tmp_path: Path, store_errors: StoreErrors,
    count: int, names: list[tuple[int, bytes]],
) -> None:  # fmt: skip
    """The route count and the names' bytes (direction, method, template:
    invalid UTF-8, control characters, no NUL padding)."""
    layout = layout_of(segment_bytes)
    buf = bytearray(segment_bytes)
    L.U64.pack_into(buf, L.ROUTES_OFFSET, count)
    for route_id, raw in names:
        if route_id < layout.route_slots:
            offset = layout.route_name_offset(route_id)
            buf[offset : offset + L.ROUTE_NAME_SIZE] = raw
    snapshot = read_everywhere(write(fuzz_dir, buf), tmp_path / "state", store_errors)
    if snapshot is not None:
        assert 1 <= len(snapshot.route_keys) <= layout.route_slots


# -- a live segment's control block, written by the daemon's side -----------------------------------------


@fuzz_settings(60)
@given(writes=st.lists(st.tuples(st.integers(0, L.CONTROL_WORDS - 1), u64), min_size=1, max_size=8))
def test_fuzz_the_control_block_of_a_live_writer(
    make_recorder: MakeRecorder, segment_dir: Path, tmp_path: Path, store_errors: StoreErrors,
    writes: list[tuple[int, int]],
) -> None:  # fmt: skip
    """netprofd writes control words; whatever they hold, the writer keeps
    recording without raising (the application is never hurt), and every
    reader still reads the segment. One recorder for all examples."""
    recorder, initial = _live_recorder(make_recorder)
    assert recorder.path is not None
    fd = os.open(recorder.path, os.O_RDWR)
    try:
        for word, value in writes:
            os.pwrite(fd, L.U64.pack(value), L.CONTROL_OFFSET + word * L.WORD)
        make_segment(recorder)
        counters = recorder.snapshot(records=False).counters
        read_everywhere(recorder.path, tmp_path / "state", store_errors)
    finally:
        os.pwrite(fd, initial, L.CONTROL_OFFSET)  # a sane block again for the next example
        os.close(fd)
    assert counters.internal_errors == 0, counters


# The live recorder of the running test: (the test's make_recorder, which
# closes it at the end; the recorder; its control block as made).
_live: list[tuple[MakeRecorder, Recorder, bytes]] = []


def _live_recorder(make_recorder: MakeRecorder) -> tuple[Recorder, bytes]:
    """One recorder for all examples of a test (made at the first)."""
    if not _live or _live[0][0] is not make_recorder:
        recorder = make_recorder(app_name="live", max_stored_requests=64, max_routes=8)
        assert recorder.path is not None
        initial = recorder.path.read_bytes()[L.CONTROL_OFFSET : L.CONTROL_OFFSET + L.CONTROL_SIZE]
        _live[:] = [(make_recorder, recorder, initial)]
    return _live[0][1], _live[0][2]
