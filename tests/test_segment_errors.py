"""Files that are not readable segments: the reader names the file and the
reason in a SegmentError and raises nothing else; ``read_segments`` skips them
with one warning each and returns the good ones."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netprof_core import Recorder, SegmentError, SegmentSnapshot, read_segment, read_segments
from netprof_core import _layout as L

MakeRecorder = Callable[..., Recorder]

T0 = 10**15
FIELD_FORMATS = {"layout_version": "<I", "header_size": "<I", "total_size": "<Q", "ring_capacity": "<I",
                 "route_capacity": "<I", "hist_buckets": "<I"}


@pytest.fixture
def segment_bytes(make_recorder: MakeRecorder) -> bytes:
    """The bytes of a real, closed segment with a few requests in it."""
    rec = make_recorder(app_name="source", max_stored_requests=64)
    for template in ("/a", "/b"):
        rid = rec.route_id(template)
        for i in range(5):
            rec.record(rid, 200, T0 + i, T0 + 1000 + i)
    rec.close()
    data = rec.path.read_bytes()
    rec.path.unlink()
    assert read_header(data, "total_size") == len(data)
    return data


@pytest.fixture
def bad_dir(tmp_path: Path) -> Path:
    path = tmp_path / "bad"
    path.mkdir()
    return path


def read_header(data: bytes, field: str) -> int:
    return struct.unpack_from(FIELD_FORMATS[field], data, L.HEADER_OFFSETS[field])[0]  # type: ignore[no-any-return]


def patched(data: bytes, field: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(FIELD_FORMATS[field], buf, L.HEADER_OFFSETS[field], value)
    return bytes(buf)


def write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def segment_error(path: Path) -> SegmentError:
    """The SegmentError read_segment raises for ``path``; fails on anything else."""
    try:
        read_segment(path)
    except SegmentError as exc:
        assert str(path) in str(exc), "the message names the file"
        assert exc.path == str(path)
        assert str(exc) == f"{path}: {exc.reason}"
        return exc
    except BaseException as exc:  # noqa: BLE001  # pragma: no cover - the failure being tested for
        pytest.fail(f"read_segment({path}) raised {type(exc).__name__}: {exc}, not SegmentError")
    pytest.fail(f"read_segment({path}) accepted a bad file")


# -- a good segment is read -------------------------------------------------------------------------


def test_the_source_segment_itself_reads(segment_bytes: bytes, bad_dir: Path) -> None:
    snap = read_segment(write(bad_dir, "good.npseg", segment_bytes))
    assert snap.app_name == "source"
    assert snap.counters.requests == 10
    assert len(snap.records) == 10


# -- one kind of damage at a time ---------------------------------------------------------------------


@pytest.mark.parametrize("magic", [b"NOTPROF1", b"NETPROF2", b"netprof1", b"\xff" * 8])
def test_wrong_magic(segment_bytes: bytes, bad_dir: Path, magic: bytes) -> None:
    path = write(bad_dir, "magic.npseg", magic + segment_bytes[8:])
    exc = segment_error(path)
    assert "magic" in exc.reason and "not a netprof segment" in exc.reason


def test_zero_magic_is_a_half_made_segment(segment_bytes: bytes, bad_dir: Path) -> None:
    path = write(bad_dir, "unborn.npseg", bytes(8) + segment_bytes[8:])
    exc = segment_error(path)
    assert "magic" in exc.reason and "not initialised" in exc.reason


@pytest.mark.parametrize("version", [0, L.LAYOUT_VERSION + 1, 99, 2**32 - 1])
def test_other_layout_version(segment_bytes: bytes, bad_dir: Path, version: int) -> None:
    path = write(bad_dir, "version.npseg", patched(segment_bytes, "layout_version", version))
    exc = segment_error(path)
    assert "version" in exc.reason
    assert str(version) in exc.reason and str(L.LAYOUT_VERSION) in exc.reason


@pytest.mark.parametrize(("field", "delta"), [("header_size", 8), ("hist_buckets", 1), ("hist_buckets", -1)])
def test_header_sizes_of_another_layout(segment_bytes: bytes, bad_dir: Path, field: str, delta: int) -> None:
    path = write(bad_dir, "sizes.npseg", patched(segment_bytes, field, read_header(segment_bytes, field) + delta))
    assert "header sizes" in segment_error(path).reason


@pytest.mark.parametrize("cut", ["0", "100", "header-1", "header", "header+100", "half", "all-but-1"])
def test_truncated_copy(segment_bytes: bytes, bad_dir: Path, cut: str) -> None:
    n = len(segment_bytes)
    length = {
        "0": 0,
        "100": 100,
        "header-1": L.HEADER_SIZE - 1,
        "header": L.HEADER_SIZE,
        "header+100": L.HEADER_SIZE + 100,
        "half": n // 2,
        "all-but-1": n - 1,
    }[cut]
    path = write(bad_dir, "cut.npseg", segment_bytes[:length])
    exc = segment_error(path)
    assert "truncated" in exc.reason
    assert str(length) in exc.reason


@pytest.mark.parametrize(
    ("field", "delta"),
    [("total_size", 64), ("total_size", -64), ("total_size", -10**5), ("ring_capacity", 1), ("route_capacity", -1)],
)
def test_total_size_disagrees_with_capacities(segment_bytes: bytes, bad_dir: Path, field: str, delta: int) -> None:
    data = patched(segment_bytes, field, read_header(segment_bytes, field) + delta)
    exc = segment_error(write(bad_dir, "size.npseg", data))
    assert "capacities" in exc.reason
    assert str(read_header(data, "total_size")) in exc.reason


def test_capacities_larger_than_the_file(segment_bytes: bytes, bad_dir: Path) -> None:
    """A consistent header that promises more than the file holds: truncated."""
    ring = read_header(segment_bytes, "ring_capacity") + 1000
    routes = read_header(segment_bytes, "route_capacity")
    data = patched(segment_bytes, "ring_capacity", ring)
    data = patched(data, "total_size", L.SegmentLayout(ring, routes).total_size)
    exc = segment_error(write(bad_dir, "short.npseg", data))
    assert "truncated" in exc.reason


@pytest.mark.parametrize("size", [1, 7, 100, L.HEADER_SIZE - 1, L.HEADER_SIZE, 4096, 200_000])
def test_random_garbage(bad_dir: Path, size: int) -> None:
    path = write(bad_dir, "garbage.npseg", os.urandom(size))
    exc = segment_error(path)
    assert ("truncated" if size < L.HEADER_SIZE else "magic") in exc.reason


def test_garbage_after_a_valid_magic(bad_dir: Path) -> None:
    path = write(bad_dir, "magic-then-garbage.npseg", L.MAGIC + os.urandom(4096))
    segment_error(path)


def test_empty_file(bad_dir: Path) -> None:
    exc = segment_error(write(bad_dir, "empty.npseg", b""))
    assert "truncated" in exc.reason and "0 bytes" in exc.reason


def test_missing_file(bad_dir: Path) -> None:
    exc = segment_error(bad_dir / "missing.npseg")
    assert "cannot open" in exc.reason


def _big_directory(parent: Path) -> Path:
    """A directory whose size (st_size) is at least a header's, on any file system."""
    path = parent / "a-directory.npseg"
    path.mkdir()
    i = 0
    while path.stat().st_size < L.HEADER_SIZE:
        (path / f"entry-with-a-longish-name-{i}").touch()
        i += 1
    return path


def test_directory(bad_dir: Path) -> None:
    segment_error(_big_directory(bad_dir))


def test_corrupt_route_table_entry(segment_bytes: bytes, bad_dir: Path) -> None:
    buf = bytearray(segment_bytes)
    layout = L.SegmentLayout(read_header(segment_bytes, "ring_capacity"), read_header(segment_bytes, "route_capacity"))
    buf[layout.route_name_offset(1)] = 136  # the direction byte of route 1
    path = write(bad_dir, "routes.npseg", bytes(buf))
    try:
        read_segment(path)
    except SegmentError:
        return
    # Reading it is acceptable too, as long as nothing else is raised.


# -- read_segments: the good ones, one warning per bad one ------------------------------------------------


def test_read_segments_skips_bad_files_with_one_warning_each(
    make_recorder: MakeRecorder, segment_dir: Path, segment_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    live = make_recorder(app_name="live")
    live.record(live.route_id("/live"), 200, T0, T0 + 1)
    closed = make_recorder(app_name="closed")
    closed.record(closed.route_id("/closed"), 200, T0, T0 + 1)
    closed.close()
    copied = write(segment_dir, "copied.npseg", segment_bytes)

    bad = [
        write(segment_dir, "bad-magic.npseg", b"NOTPROF1" + segment_bytes[8:]),
        write(segment_dir, "bad-version.npseg", patched(segment_bytes, "layout_version", 7)),
        write(segment_dir, "bad-truncated.npseg", segment_bytes[: len(segment_bytes) // 2]),
        write(segment_dir, "bad-tiny.npseg", segment_bytes[:100]),
        write(segment_dir, "bad-size.npseg", patched(segment_bytes, "total_size", len(segment_bytes) + 8)),
        write(segment_dir, "bad-garbage.npseg", os.urandom(8192)),
        write(segment_dir, "bad-empty.npseg", b""),
        write(segment_dir, "bad-unborn.npseg", bytes(len(segment_bytes))),
    ]
    write(segment_dir, "not-a-segment.txt", b"ignored: wrong suffix")
    (segment_dir / L.DAEMON_LOCK_NAME).write_bytes(b"")

    caplog.set_level(logging.WARNING, logger="netprof.segment")
    snapshots = read_segments(segment_dir)

    assert all(isinstance(s, SegmentSnapshot) for s in snapshots)
    assert sorted(s.path for s in snapshots) == sorted(str(p) for p in (live.path, closed.path, copied))
    by_app = {s.app_name: s for s in snapshots}
    assert by_app["live"].counters.requests == 1
    assert by_app["closed"].header.closed
    assert by_app["source"].counters.requests == 10

    warnings = [r for r in caplog.records if r.name == "netprof.segment" and r.levelno >= logging.WARNING]
    assert len(warnings) == len(bad)
    for path in bad:
        naming = [r for r in warnings if str(path) in r.getMessage()]
        assert len(naming) == 1, f"{path.name}: {[r.getMessage() for r in warnings]}"


def test_read_segments_of_a_missing_or_empty_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="netprof.segment")
    assert read_segments(tmp_path / "missing") == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_segments(empty) == []
    assert not [r for r in caplog.records if r.name == "netprof.segment"]


def test_read_segments_warns_about_a_directory_named_like_a_segment(
    segment_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = _big_directory(segment_dir)
    caplog.set_level(logging.DEBUG, logger="netprof.segment")
    assert read_segments(segment_dir) == []
    warnings = [r for r in caplog.records if r.name == "netprof.segment" and r.levelno >= logging.WARNING]
    assert [str(directory) in r.getMessage() for r in warnings] == [True]


# -- fuzz ----------------------------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def snapshot_or_segment_error(path: Path) -> SegmentSnapshot | SegmentError:
    try:
        return read_segment(path)
    except SegmentError as exc:
        assert str(path) in str(exc)
        return exc


@FUZZ
@given(
    mutations=st.lists(
        st.tuples(st.integers(0, L.HEADER_SIZE - 1), st.integers(0, 255)), min_size=1, max_size=16
    )
)
def test_fuzz_header_bytes(segment_bytes: bytes, bad_dir: Path, mutations: list[tuple[int, int]]) -> None:
    buf = bytearray(segment_bytes)
    for offset, value in mutations:
        buf[offset] = value
    path = write(bad_dir, "fuzz.npseg", bytes(buf))
    result = snapshot_or_segment_error(path)
    if isinstance(result, SegmentSnapshot):
        assert result.header.total_size <= len(buf)
        assert result.counters.requests == 10


@FUZZ
@given(
    fields=st.dictionaries(
        st.sampled_from(sorted(FIELD_FORMATS)), st.integers(0, 2**32 - 1), min_size=1, max_size=len(FIELD_FORMATS)
    )
)
def test_fuzz_header_fields(segment_bytes: bytes, bad_dir: Path, fields: dict[str, int]) -> None:
    """Whole-field changes reach the capacity checks that single bytes rarely do."""
    data = segment_bytes
    for field, value in fields.items():
        data = patched(data, field, value)
    snapshot_or_segment_error(write(bad_dir, "fields.npseg", data))


@FUZZ
@given(
    mutations=st.lists(
        st.tuples(st.integers(L.CONTROL_OFFSET, L.CONTROL_OFFSET + L.CONTROL_SIZE - 1), st.integers(0, 255)),
        min_size=1,
        max_size=32,
    )
)
def test_fuzz_control_block_never_breaks_reading(
    segment_bytes: bytes, bad_dir: Path, mutations: list[tuple[int, int]]
) -> None:
    buf = bytearray(segment_bytes)
    for offset, value in mutations:
        buf[offset] = value
    snap = read_segment(write(bad_dir, "control.npseg", bytes(buf)))
    assert len(snap.records) <= read_header(segment_bytes, "ring_capacity")
    assert snap.counters.requests == 10


@FUZZ
@given(length=st.integers(0, 10**6))
def test_fuzz_truncation(segment_bytes: bytes, bad_dir: Path, length: int) -> None:
    length %= len(segment_bytes)
    exc = segment_error(write(bad_dir, "trunc.npseg", segment_bytes[:length]))
    assert "truncated" in exc.reason


@FUZZ
@given(data=st.binary(max_size=2048), with_magic=st.booleans())
def test_fuzz_garbage(bad_dir: Path, data: bytes, with_magic: bool) -> None:
    segment_error(write(bad_dir, "garbage.npseg", (L.MAGIC if with_magic else b"") + data))
