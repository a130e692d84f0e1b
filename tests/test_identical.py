"""The Cython core and its pure-Python twin write byte-identical segments.

Two recorders, one of each core, are made by this process with the same
configuration and the same ``created_ns``; the same long, deterministic,
pseudo-random sequence of calls is applied to both (valid and invalid records,
every status class, every error kind, durations across the whole histogram,
byte counts that wrap, route overflow, ring wraparound and a lowered ring
capacity, publishing, disabling, auto-disabling, sampling). The two segment
files must then be equal byte for byte, and so must the snapshots read from them.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netprof_core import Direction, ErrorKind, ProfilingConfig, Recorder, SegmentSnapshot
from netprof_core import _layout as L

# The tests that make both cores side by side need the Cython one.
both_cores = pytest.mark.c_extension

MASK64 = (1 << 64) - 1
MAX_I64 = (1 << 63) - 1
CREATED_NS = 1_700_000_000_123_456_789

ROUTES = [
    ("/", "GET", Direction.INBOUND),
    ("/users/{id}", "GET", Direction.INBOUND),
    ("/users/{id}", "PUT", Direction.INBOUND),
    ("/users/{id}", "DELETE", Direction.INBOUND),
    ("/orders", "POST", Direction.INBOUND),
    ("https://api.example.com/v1/charge", "POST", Direction.OUTBOUND),
    ("redis://cache", "GET", Direction.OUTBOUND),
    ("/health", "GET", Direction.INBOUND),
    # Past max_routes=8: these share the overflow route 0.
    ("/static/{path}", "GET", Direction.INBOUND),
    ("/admin", "GET", Direction.INBOUND),
    ("/ünïcödé/{x}", "PATCH", Direction.INBOUND),
    ("/" + "long" * 60, "OPTIONS", Direction.OUTBOUND),  # truncated in the route table
]
LATE_ROUTES = [("/late/one", "GET", Direction.INBOUND), ("/late/two", "HEAD", Direction.OUTBOUND)]

STATUSES = [0, 1, 99, 100, 101, 199, 200, 201, 204, 299, 301, 304, 399, 400, 404, 499, 500, 502, 503, 599, 600, 601, 999, 0xFFFF]

# Durations on and around the histogram's bucket edges and beyond its range.
EDGE_DURATIONS = [
    0, 1, 63, 64, 65, 1023, 1024, 1025, 2047, 2048, 10**6, 2 * 10**9 - 1, 2 * 10**9, 2 * 10**9 + 1,
    (1 << 41) - 1, 1 << 41, (1 << 42) - 1, 1 << 42, (1 << 42) + 1, 1 << 50, 1 << 62,
]
BIG_BYTES = [MASK64, MASK64 - 1, 1 << 63, (1 << 63) - 1, (1 << 62) + 12345]


# -- the call sequence --------------------------------------------------------------


def _duration(rng: random.Random) -> int:
    pick = rng.random()
    if pick < 0.1:
        return rng.choice(EDGE_DURATIONS)
    if pick < 0.2:
        return rng.randrange(0, 1024)  # the linear buckets
    # log-uniform from 1 ns to 2**46 ns, past the last bucket's lower bound (2**42)
    return int(2 ** rng.uniform(0, 46))


def _bytes(rng: random.Random) -> int:
    pick = rng.random()
    if pick < 0.15:
        return rng.choice(BIG_BYTES)
    if pick < 0.3:
        return 0
    return rng.randrange(0, 1 << rng.choice((8, 16, 32, 48)))


INVALID_CALLS: list[Callable[[int], tuple[Any, ...]]] = [
    lambda rid: (rid, 200, 1.5, 10),  # a float start
    lambda rid: (rid, 200, 10, 20.0),  # a float end
    lambda rid: (rid, None, 10, 20),
    lambda rid: (None, 200, 10, 20),
    lambda rid: (rid, "200", 10, 20),
    lambda rid: (rid, 200, -1, 20),  # a negative start
    lambda rid: (rid, 200, 30, 20),  # end before start
    lambda rid: (rid, 200, 10, 20, -5),  # negative bytes_in
    lambda rid: (rid, 200, 10, 20, 0, 1 << 64),  # bytes_out past u64
    lambda rid: (rid, 200, 10, 20, 0, 0, 8),  # no such error kind
    lambda rid: (rid, 200, 10, 20, 0, 0, -1),
    lambda rid: (rid, 200, 10, 20, 0, 0, 0, -3),  # negative ttfb
    lambda rid: (rid, 200, 10, 20, 0, 0, 0, 1 << 64),
    lambda rid: (rid, 1 << 16, 10, 20),  # status past u16
    lambda rid: (rid, -200, 10, 20),
    lambda rid: (10**6, 200, 10, 20),  # no such route
    lambda rid: (-1, 200, 10, 20),
    lambda rid: (rid, 200, 10, 1 << 63),  # end past i64
    lambda rid: (rid, 200, 1 << 64, 1 << 65),
    lambda rid: (rid, 200, 10**30, 10**30),
    lambda rid: (rid, 200, 10, 20, 1.0),
    lambda rid: (rid, 200.0, 10, 20),
]


def build_operations(seed: int, count: int) -> list[tuple[Any, ...]]:
    """A deterministic sequence of operations, applied in the same order to
    both recorders by :func:`apply`. Route ids are given as indexes into the
    interned list, so that each recorder uses its own ``route_id()`` answers."""
    rng = random.Random(seed)
    ops: list[tuple[Any, ...]] = []
    routes = len(ROUTES)
    late_done = False
    for n in range(count):
        if not late_done and n == count // 2:
            # Interning in the middle of recording (past max_routes: the overflow route).
            ops.append(("intern_late",))
            late_done = True
        pick = rng.random()
        route = rng.randrange(routes + (2 if late_done else 0))
        if pick < 0.0015:
            ops.append(("control", "request_publish"))
        elif pick < 0.0020:
            ops.append(("control", "disable"))
            for _ in range(rng.randrange(1, 20)):
                ops.append(("record", route, (200, 10, 20), None))  # counted as disabled calls
            ops.append(("control", "enable"))
        elif pick < 0.0023:
            # Four invalid calls in a row: auto-disabled until enabled again.
            for _ in range(rng.randrange(4, 7)):
                ops.append(("invalid", route, rng.randrange(len(INVALID_CALLS))))
            for _ in range(rng.randrange(0, 5)):
                ops.append(("record", route, (200, 10, 20), None))  # disabled calls
            ops.append(("control", "enable"))
        elif pick < 0.0026:
            # None: back to the segment's full size; larger values are clamped to it.
            ops.append(("control", "set_ring_capacity", rng.choice((1, 7, 50, 100, 199, 257, None))))
        elif pick < 0.0028:
            ops.append(("control", "set_slow_request_threshold", rng.choice((0.001, 0.5, 2.0, 3600))))
        elif pick < 0.0030:
            ops.append(("control", "set_feature_flag", False))
            ops.append(("record", route, (500, 0, 5), None))
            ops.append(("control", "set_feature_flag", True))
        elif pick < 0.0032:
            ops.append(("control", "cleanup"))
        elif pick < 0.0034:
            ops.append(("internal_error",))
        elif pick < 0.0036:
            ops.append(("bad_route",))
        elif pick < 0.03:
            ops.append(("invalid", route, rng.randrange(len(INVALID_CALLS))))
        else:
            duration = _duration(rng)
            start = rng.randrange(0, MAX_I64 - duration + 1) if rng.random() < 0.02 else rng.randrange(0, 1 << 52)
            if rng.random() < 0.01:
                start = MAX_I64 - duration  # end_ns at the very top of the valid range
            end = start + duration
            status = rng.choice(STATUSES)
            error_kind = rng.randrange(L.ERROR_KINDS) if rng.random() < 0.3 else 0
            ttfb = rng.choice((0, duration // 3, duration, MASK64)) if rng.random() < 0.5 else 0
            args: tuple[Any, ...] = (status, start, end, _bytes(rng), _bytes(rng), error_kind, ttfb)
            style = rng.randrange(4)
            if style == 0:
                args = args[:3]  # defaults for the rest
            elif style == 1 and error_kind:
                args = (*args[:5], ErrorKind(error_kind), ttfb)  # an IntEnum is an int
            # the keyword form is taken in apply()
            ops.append(("record", route, args, "kw" if style == 2 else None))
    ops.append(("control", "request_publish"))
    ops.append(("record", 1, (200, 1000, 2000), None))  # answers the request: the published copy is current
    return ops


def intern_routes(rec: Recorder) -> list[int]:
    return [rec.route_id(template, method, direction) for template, method, direction in ROUTES]


def _fits_c_integers(args: tuple[Any, ...]) -> bool:
    return all(type(a) is int and -(1 << 63) <= a <= MAX_I64 for a in args)


def apply(
    rec: Recorder,
    ids: list[int],
    ops: list[tuple[Any, ...]],
    *,
    c_integers: bool = False,
    admitted: bool = False,
) -> None:
    """Apply ``ops`` to ``rec``; ``ids`` (from :func:`intern_routes`) grows
    when the late routes are interned. ``c_integers``: each call whose numbers
    a compiled hook could hold goes through ``record_ints``, as the hooks'.
    ``admitted``: each call is ``admit()`` then ``record_admitted()`` (with
    ``c_integers``, ``record_admitted_ints``), as the framework hooks call."""
    plain, ints = rec.record, rec._core.record_ints  # type: ignore[attr-defined]
    if admitted:
        admit, two_calls = rec.admit, rec.record_admitted
        two_calls_ints = rec._core.record_admitted_ints  # type: ignore[attr-defined]

        def plain(*args: Any, **kwargs: Any) -> None:
            two_calls(admit(), *args, **kwargs)

        def ints(*args: int) -> None:
            two_calls_ints(admit(), *args)

    record = plain
    if c_integers:

        def record(*args: Any, **kwargs: Any) -> None:
            args = (*args, *kwargs.values())
            if _fits_c_integers(args):
                ints(*args, *(0,) * (8 - len(args)))
            else:
                plain(*args)

    for op in ops:
        kind = op[0]
        if kind == "record":
            _, route, args, style = op
            rid = ids[route]
            if style == "kw":
                status, start, end, b_in, b_out, kind_, ttfb = args
                record(rid, status, start, end, bytes_in=b_in, bytes_out=b_out, error_kind=kind_, ttfb_ns=ttfb)
            else:
                record(rid, *args)
        elif kind == "invalid":
            _, route, which = op
            record(*INVALID_CALLS[which](ids[route]))
        elif kind == "control" and op[1] == "set_ring_capacity":
            full = rec.header.ring_capacity
            rec.control.set_ring_capacity(full if op[2] is None else min(op[2], full))
        elif kind == "control":
            getattr(rec.control, op[1])(*op[2:])
        elif kind == "intern_late":
            ids.extend(rec.route_id(template, method, direction) for template, method, direction in LATE_ROUTES)
        elif kind == "internal_error":
            rec.internal_error(RuntimeError("a hook failed"))
        elif kind == "bad_route":
            assert rec.route_id("/bad", "GET", direction=7) == L.OVERFLOW_ROUTE_ID  # type: ignore[arg-type]
        else:  # pragma: no cover
            raise AssertionError(op)


# -- comparing ----------------------------------------------------------------------

_GLOBAL_NAMES = {value: name for name, value in vars(L).items() if name.startswith("G_")}
_ROUTE_NAMES = {value: name for name, value in vars(L).items() if name.startswith("R_")}
_CONTROL_NAMES = {value: name for name, value in vars(L).items() if name.startswith("C_")}
_RECORD_NAMES = {value: name for name, value in vars(L).items() if name.startswith("REC_")}


def _stats_word(word: int, layout: L.SegmentLayout) -> str:
    if word < L.GLOBAL_WORDS:
        return _GLOBAL_NAMES.get(word, f"global word {word}")
    if word < L.ROUTE_HEADERS_START:
        return f"overhead histogram bucket {word - L.GLOBAL_WORDS}"
    if word < layout.route_histograms_start:
        route, within = divmod(word - L.ROUTE_HEADERS_START, L.ROUTE_HEADER_WORDS)
        base = max(v for v in _ROUTE_NAMES if v <= within)
        name = _ROUTE_NAMES[base] if within == base else f"{_ROUTE_NAMES[base]}+{within - base}"
        return f"route {route} {name}"
    route, bucket = divmod(word - layout.route_histograms_start, L.HIST_BUCKETS)
    return f"route {route} histogram bucket {bucket}"


def describe_offset(offset: int, layout: L.SegmentLayout) -> str:
    """Which region of a segment, and which field in it, holds ``offset``."""
    if offset < L.HEADER_SIZE:
        if offset >= L.CLOSED_NS_OFFSET + L.WORD:
            return "header (padding)"
        fields = sorted((at, name) for name, at in L.HEADER_OFFSETS.items())
        fields.append((L.CLOSED_NS_OFFSET, "closed_ns"))
        name = max(f for f in fields if f[0] <= offset)[1]
        return f"header ({name})"
    if offset < L.CONTROL_OFFSET + L.CONTROL_SIZE:
        word = (offset - L.CONTROL_OFFSET) // L.WORD
        return f"control ({_CONTROL_NAMES.get(word, f'word {word}')})"
    if offset < layout.live_offset:
        if offset < L.ROUTES_OFFSET + L.ROUTE_TABLE_HEADER:
            return "routes (table header)"
        slot = (offset - L.ROUTES_OFFSET - L.ROUTE_TABLE_HEADER) // L.ROUTE_NAME_SIZE
        return f"routes (name of route {slot})" if slot < layout.route_slots else "routes (padding)"
    if offset < layout.published_offset:
        return f"live ({_stats_word((offset - layout.live_offset) // L.WORD, layout)})"
    if offset < layout.ring_offset:
        return f"published ({_stats_word((offset - layout.published_offset) // L.WORD, layout)})"
    slot, within = divmod((offset - layout.ring_offset) // L.WORD, L.RECORD_WORDS)
    return f"ring (slot {slot}, {_RECORD_NAMES.get(within, f'word {within}')})"


def first_difference(a: bytes, b: bytes) -> int | None:
    if a == b:
        return None
    if len(a) != len(b):
        common = min(len(a), len(b))
        if a[:common] == b[:common]:
            return common
    # Bisect by chunks: the files are a few MB at most.
    chunk = 4096
    for start in range(0, min(len(a), len(b)), chunk):
        if a[start : start + chunk] != b[start : start + chunk]:
            for offset in range(start, start + chunk):
                if a[offset] != b[offset]:
                    return offset
    return min(len(a), len(b))


HEADER_FIELDS_THAT_MAY_DIFFER = {"mono_offset_ns"}


def canonical_tokens(data: bytes, layout: L.SegmentLayout) -> bytes:
    """``data`` with the request tokens renamed 1, 2, ... in order of appearance.

    A reader's request (publish, reset of errors) is a token unique to that
    request, and the writer answers by copying it into an acknowledgement word.
    The two recorders are asked by different calls, so their tokens differ;
    what must be the same is which words hold equal tokens.
    """
    words = [
        L.CONTROL_OFFSET + L.C_PUBLISH_REQUEST * L.WORD,
        L.CONTROL_OFFSET + L.C_RESET_ERRORS_REQUEST * L.WORD,
        layout.live_offset + L.G_RESET_ACK * L.WORD,
        layout.published_offset + L.G_RESET_ACK * L.WORD,
        layout.published_offset + L.G_PUBLISH_ACK * L.WORD,
    ]
    names = {0: 0}
    fixed = bytearray(data)
    for at in words:
        (token,) = struct.unpack_from("<Q", fixed, at)
        struct.pack_into("<Q", fixed, at, names.setdefault(token, len(names)))
    return bytes(fixed)


def normalised_python_segment(c_bytes: bytes, py_bytes: bytes, layout: L.SegmentLayout) -> bytes:
    """The Python core's segment with the one legitimate difference removed.

    ``mono_offset_ns`` (wall clock minus monotonic clock) is measured when each
    segment is made, from two clock reads a few ns apart: the two recorders,
    made one after the other, may see it differ by some ns. Nothing else in the
    header may differ (same process, same ``created_ns``, same config). Each
    ring record's ``wall_ns`` is ``end_ns + mono_offset_ns``, so it differs by
    exactly the same amount: here the Python segment is rewritten as if it had
    the Cython segment's offset, which is checked to remove every difference in
    the ring while leaving everything else untouched.
    """
    c_header = dict(zip(L.HEADER_FIELDS, L.HEADER_STRUCT.unpack_from(c_bytes, 0)))
    py_header = dict(zip(L.HEADER_FIELDS, L.HEADER_STRUCT.unpack_from(py_bytes, 0)))
    differing = {name for name in L.HEADER_FIELDS if c_header[name] != py_header[name]}
    assert differing <= HEADER_FIELDS_THAT_MAY_DIFFER, (
        f"header fields differ: { {n: (c_header[n], py_header[n]) for n in differing} }"
    )
    delta = py_header["mono_offset_ns"] - c_header["mono_offset_ns"]
    if not delta:
        return py_bytes
    fixed = bytearray(py_bytes)
    struct.pack_into("<q", fixed, L.HEADER_OFFSETS["mono_offset_ns"], c_header["mono_offset_ns"])
    for slot in range(layout.ring_capacity):
        at = layout.ring_offset + slot * L.RECORD_SIZE
        (seq,) = struct.unpack_from("<Q", fixed, at)
        if seq:
            wall_at = at + L.REC_WALL_NS * L.WORD
            (wall,) = struct.unpack_from("<Q", fixed, wall_at)
            struct.pack_into("<Q", fixed, wall_at, (wall - delta) & MASK64)
    return bytes(fixed)


def assert_same_segment(c_rec: Recorder, py_rec: Recorder) -> None:
    assert c_rec.layout == py_rec.layout
    assert c_rec.path is not None and py_rec.path is not None and c_rec.path != py_rec.path
    c_bytes = c_rec.path.read_bytes()
    py_bytes = py_rec.path.read_bytes()
    assert len(c_bytes) == len(py_bytes) == c_rec.layout.total_size
    py_bytes = normalised_python_segment(c_bytes, py_bytes, c_rec.layout)
    c_bytes, py_bytes = (canonical_tokens(data, c_rec.layout) for data in (c_bytes, py_bytes))
    offset = first_difference(c_bytes, py_bytes)
    if offset is not None:
        word_at = offset - offset % L.WORD
        c_word = c_bytes[word_at : word_at + L.WORD].hex()
        py_word = py_bytes[word_at : word_at + L.WORD].hex()
        differing = sum(1 for x, y in zip(c_bytes, py_bytes) if x != y)
        pytest.fail(
            f"segments differ first at offset {offset} in {describe_offset(offset, c_rec.layout)}: "
            f"cython word {c_word}, python word {py_word} (little-endian hex); "
            f"{differing} differing bytes in all"
        )


def assert_same_snapshot(c_snap: SegmentSnapshot, py_snap: SegmentSnapshot) -> None:
    delta = py_snap.header.mono_offset_ns - c_snap.header.mono_offset_ns
    assert dataclasses.replace(py_snap.header, mono_offset_ns=c_snap.header.mono_offset_ns) == c_snap.header
    assert py_snap.control == c_snap.control
    assert py_snap.counters == c_snap.counters
    assert py_snap.counters.overhead_histogram == c_snap.counters.overhead_histogram
    assert py_snap.source == c_snap.source
    assert app_name_and_size(py_snap) == app_name_and_size(c_snap)
    assert len(py_snap.routes) == len(c_snap.routes)
    for c_route, py_route in zip(c_snap.routes, py_snap.routes):
        assert py_route == c_route
        assert py_route.histogram == c_route.histogram, f"histograms of {c_route.key} differ"
    assert len(py_snap.records) == len(c_snap.records)
    for c_record, py_record in zip(c_snap.records, py_snap.records):
        assert dataclasses.replace(py_record, wall_ns=(py_record.wall_ns - delta) & MASK64) == c_record


def app_name_and_size(snapshot: SegmentSnapshot) -> tuple[str, int]:
    return snapshot.app_name, snapshot.memory_bytes


# -- the tests ----------------------------------------------------------------------


def make_pair(tmp_path: Path, **keys: Any) -> tuple[Recorder, Recorder]:
    recorders = []
    for implementation in ("cython", "python"):
        directory = tmp_path / implementation
        directory.mkdir()
        config = ProfilingConfig(segment_dir=str(directory), app_name="twins", **keys)
        recorders.append(Recorder(config, implementation=implementation, created_ns=CREATED_NS))
    c_rec, py_rec = recorders
    assert (c_rec.implementation, py_rec.implementation) == ("cython", "python")
    return c_rec, py_rec


CASES = {
    "sampled": {
        "sample_rate": 0.5, "max_routes": 8, "max_stored_requests": 300, "seed": 1, "count": 150_000,
    },
    "unsampled": {
        "sample_rate": 1.0, "max_routes": 8, "max_stored_requests": 300, "seed": 2, "count": 150_000,
    },
    "low-rate": {
        "sample_rate": 0.013, "max_routes": 8, "max_stored_requests": 100, "seed": 3, "count": 100_000,
    },
    "default-sizes": {
        "sample_rate": 1.0, "max_routes": 24, "max_stored_requests": 1000, "seed": 4, "count": 100_000,
    },
}


@both_cores
@pytest.mark.parametrize("case", list(CASES))
def test_cores_write_identical_segments(tmp_path: Path, case: str) -> None:
    params = dict(CASES[case])
    seed, count = params.pop("seed"), params.pop("count")
    c_rec, py_rec = make_pair(
        tmp_path, performance_monitoring=False, log_slow_requests=False, slow_request_threshold=2.0, **params
    )
    try:
        # Made by this process with the same created_ns: the headers are equal
        # but for the clock offset (see normalised_python_segment).
        assert dataclasses.replace(py_rec.header, mono_offset_ns=0) == dataclasses.replace(
            c_rec.header, mono_offset_ns=0
        )
        assert_same_segment(c_rec, py_rec)  # freshly made

        ops = build_operations(seed, count)
        half = len(ops) // 2
        ids = {rec: intern_routes(rec) for rec in (c_rec, py_rec)}
        assert ids[c_rec] == ids[py_rec]
        for rec in (c_rec, py_rec):
            apply(rec, ids[rec], ops[:half])
        assert_same_segment(c_rec, py_rec)
        for rec in (c_rec, py_rec):
            apply(rec, ids[rec], ops[half:])
        assert_same_segment(c_rec, py_rec)

        c_snap, py_snap = c_rec.snapshot(), py_rec.snapshot()
        assert_same_snapshot(c_snap, py_snap)

        # The sequence did what it was made for (in both, since they are equal).
        counters = c_snap.counters
        all_routes = len(ROUTES) + len(LATE_ROUTES)
        assert counters.requests > c_rec.layout.ring_capacity  # the ring wrapped
        assert counters.internal_errors > 0
        assert counters.disabled_calls > 0
        assert counters.overflowed_routes == max(0, all_routes - params["max_routes"])
        assert len(c_snap.routes) == min(all_routes, params["max_routes"]) + 1
        if params["sample_rate"] < 1.0:
            assert counters.sampled_out > 0
        else:
            assert counters.sampled_out == 0
            assert counters.auto_disable_events > 0
            assert counters.internal_errors > 1000
        assert sum(route.count for route in c_snap.routes) == counters.requests
        assert any(route.status_classes[0] and route.status_classes[5] for route in c_snap.routes)
        assert any(route.histogram.counts[L.HIST_BUCKETS - 1] for route in c_snap.routes)  # past 2**42 ns
        overflow = c_snap.routes[L.OVERFLOW_ROUTE_ID]
        assert overflow.key.template == L.OVERFLOW_TEMPLATE
        assert (overflow.count > 0) == (params["max_routes"] < all_routes)
        assert c_snap.records and len(c_snap.records) <= c_rec.layout.ring_capacity

        # Closing marks both closed; the rest stays identical.
        for rec in (c_rec, py_rec):
            rec.close()
        c_bytes = c_rec.path.read_bytes()  # type: ignore[union-attr]
        py_bytes = py_rec.path.read_bytes()  # type: ignore[union-attr]
        assert struct.unpack_from("<Q", c_bytes, L.CLOSED_NS_OFFSET)[0] > 0
        assert struct.unpack_from("<Q", py_bytes, L.CLOSED_NS_OFFSET)[0] > 0
        # closed_ns is the wall clock at close: the one other field allowed to differ.
        blank = bytes(L.WORD)
        c_open = c_bytes[: L.CLOSED_NS_OFFSET] + blank + c_bytes[L.CLOSED_NS_OFFSET + L.WORD :]
        py_open = py_bytes[: L.CLOSED_NS_OFFSET] + blank + py_bytes[L.CLOSED_NS_OFFSET + L.WORD :]
        py_open = normalised_python_segment(c_open, py_open, c_rec.layout)
        c_open, py_open = (canonical_tokens(data, c_rec.layout) for data in (c_open, py_open))
        offset = first_difference(c_open, py_open)
        assert offset is None, f"closed segments differ at {offset}: {describe_offset(offset, c_rec.layout)}"
    finally:
        c_rec.close()
        py_rec.close()


@both_cores
def test_record_ints_writes_what_record_writes(tmp_path: Path) -> None:
    """The compiled hooks' entry (C integers) against the pure-Python twin's record()."""
    c_rec, py_rec = make_pair(
        tmp_path, performance_monitoring=False, log_slow_requests=False, slow_request_threshold=2.0,
        sample_rate=1.0, max_routes=8, max_stored_requests=300,
    )  # fmt: skip
    try:
        ops = build_operations(5, 60_000)
        ids = {rec: intern_routes(rec) for rec in (c_rec, py_rec)}
        apply(c_rec, ids[c_rec], ops, c_integers=True)
        apply(py_rec, ids[py_rec], ops, c_integers=True)
        assert_same_segment(c_rec, py_rec)
        assert_same_snapshot(c_rec.snapshot(), py_rec.snapshot())
        assert c_rec.snapshot().counters.internal_errors > 0  # the invalid calls were refused by record_ints too
    finally:
        c_rec.close()
        py_rec.close()


@both_cores
@pytest.mark.parametrize(
    ("two_calls_in", "c_integers"),
    [("cython", False), ("cython", True), ("python", False)],
    ids=["cython-objects", "cython-c-integers", "python"],
)
def test_admit_then_record_admitted_writes_what_record_writes(
    tmp_path: Path, two_calls_in: str, c_integers: bool
) -> None:
    """The middleware's two calls (admit as a request starts, record_admitted
    as it ends) in one core, against record() in the other: the same requests
    sampled out, disabled and recorded, the same bytes."""
    c_rec, py_rec = make_pair(
        tmp_path, performance_monitoring=False, log_slow_requests=False, slow_request_threshold=2.0,
        sample_rate=0.5, max_routes=8, max_stored_requests=300,
    )  # fmt: skip
    try:
        ops = build_operations(11, 30_000)
        for rec in (c_rec, py_rec):
            two_calls = rec.implementation == two_calls_in
            apply(rec, intern_routes(rec), ops, c_integers=two_calls and c_integers, admitted=two_calls)
        assert_same_segment(c_rec, py_rec)
        assert_same_snapshot(c_rec.snapshot(), py_rec.snapshot())
        counters = c_rec.snapshot().counters
        assert counters.sampled_out > 0 and counters.requests > 0 and counters.internal_errors > 0
    finally:
        c_rec.close()
        py_rec.close()


@both_cores
def test_cores_identical_with_snapshots_and_publishes_interleaved(tmp_path: Path) -> None:
    """Snapshots taken by the recorder itself between calls, and publish requests
    answered by every kind of call (a record, a sampled-out call, a disabled
    call, an internal error), leave the two segments equal at every step."""
    c_rec, py_rec = make_pair(
        tmp_path, performance_monitoring=False, sample_rate=0.7, max_routes=8, max_stored_requests=64
    )
    try:
        ops = build_operations(seed=11, count=4_000)
        ids = {rec: intern_routes(rec) for rec in (c_rec, py_rec)}
        step = 250
        for start in range(0, len(ops), step):
            chunk = ops[start : start + step]
            for rec in (c_rec, py_rec):
                rec.control.request_publish()
                apply(rec, ids[rec], chunk)
                rec.record(L.OVERFLOW_ROUTE_ID, "bad", 0, 1)  # an internal error answers a request too
                rec.control.request_publish()
                rec.control.disable()
                rec.record(1, 200, 0, 1)  # a disabled call answers it
                rec.control.enable()
            assert_same_segment(c_rec, py_rec)
            assert_same_snapshot(c_rec.snapshot(), py_rec.snapshot())
        # The published copy (answered above) is the live statistics, word for word.
        for rec in (c_rec, py_rec):
            rec.control.request_publish()
            rec.record(1, 200, 0, 1)
            data = rec.path.read_bytes()  # type: ignore[union-attr]
            live = data[rec.layout.live_offset + L.WORD : rec.layout.published_offset]
            published = data[rec.layout.published_offset + L.WORD : rec.layout.ring_offset]
            ack = L.G_PUBLISH_ACK * L.WORD - L.WORD
            assert live[:ack] == published[:ack]
            assert live[ack + L.WORD :] == published[ack + L.WORD :]
    finally:
        c_rec.close()
        py_rec.close()


@both_cores
def test_cores_identical_but_for_measured_overhead(tmp_path: Path) -> None:
    """With performance monitoring on, each core times one record in 64 with the
    real clock: how long that took (the overhead sum, maximum and histogram)
    legitimately differs; which records were timed, and everything else, does not."""
    c_rec, py_rec = make_pair(tmp_path, performance_monitoring=True, sample_rate=0.9, max_routes=8)
    try:
        ops = build_operations(seed=21, count=30_000)
        for rec in (c_rec, py_rec):
            apply(rec, intern_routes(rec), ops)
        c_bytes = bytearray(c_rec.path.read_bytes())  # type: ignore[union-attr]
        py_bytes = bytearray(py_rec.path.read_bytes())  # type: ignore[union-attr]
        layout = c_rec.layout
        for area in (layout.live_offset, layout.published_offset):
            c_words = memoryview(c_bytes)[area : area + layout.stats_size].cast("Q")
            py_words = memoryview(py_bytes)[area : area + layout.stats_size].cast("Q")
            assert c_words[L.G_OVERHEAD_COUNT] == py_words[L.G_OVERHEAD_COUNT] > 0
            for words in (c_words, py_words):
                hist = words[L.OVERHEAD_HIST : L.OVERHEAD_HIST + L.HIST_BUCKETS]
                assert sum(hist) == words[L.G_OVERHEAD_COUNT]
                assert words[L.G_OVERHEAD_MAX_NS] <= words[L.G_OVERHEAD_SUM_NS]
                # Blank what the clock decided, in both.
                words[L.G_OVERHEAD_SUM_NS] = words[L.G_OVERHEAD_MAX_NS] = 0
                for bucket in range(L.OVERHEAD_HIST, L.OVERHEAD_HIST + L.HIST_BUCKETS):
                    words[bucket] = 0
            c_words.release()
            py_words.release()
        py_fixed = canonical_tokens(normalised_python_segment(bytes(c_bytes), bytes(py_bytes), layout), layout)
        offset = first_difference(canonical_tokens(bytes(c_bytes), layout), py_fixed)
        assert offset is None, f"segments differ at {offset}: {describe_offset(offset, layout)}"
    finally:
        c_rec.close()
        py_rec.close()


def test_describe_offset_names_every_region(tmp_path: Path) -> None:
    """The helper that names a mismatch, checked on its own."""
    layout = L.SegmentLayout(ring_capacity=10, route_capacity=3)
    assert describe_offset(0, layout) == "header (magic)"
    assert describe_offset(L.HEADER_OFFSETS["pid"] + 3, layout) == "header (pid)"
    assert describe_offset(L.CLOSED_NS_OFFSET, layout) == "header (closed_ns)"
    assert describe_offset(L.CONTROL_OFFSET + L.C_SAMPLE_THRESHOLD * 8, layout) == "control (C_SAMPLE_THRESHOLD)"
    assert describe_offset(L.ROUTES_OFFSET, layout) == "routes (table header)"
    assert describe_offset(layout.route_name_offset(2) + 5, layout) == "routes (name of route 2)"
    assert describe_offset(layout.live_offset + L.G_NEXT_INDEX * 8, layout) == "live (G_NEXT_INDEX)"
    header = layout.route_header(1)
    assert describe_offset(layout.live_offset + (header + L.R_COUNT) * 8, layout) == "live (route 1 R_COUNT)"
    assert describe_offset(layout.live_offset + (header + L.R_MIN_NS) * 8, layout) == "live (route 1 R_MIN_NS)"
    assert describe_offset(layout.published_offset + (layout.route_histogram(1) + 5) * 8, layout) == (
        "published (route 1 histogram bucket 5)"
    )
    assert describe_offset(layout.ring_offset + L.RECORD_SIZE * 3 + 16, layout) == "ring (slot 3, REC_DURATION_NS)"
