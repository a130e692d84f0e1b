"""Input that once slipped past the recorder's guards: huge or hostile ints,
bad values set inside measure(), corrupt shared words, dead writers, FIFOs."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import pytest

from netprof_core import (
    ConfigError,
    Direction,
    ProfilingConfig,
    Recorder,
    SegmentControl,
    SegmentError,
    read_segment,
    read_segments,
)
from netprof_core import _layout as L

T0 = 10**12


class LoudInt(int):
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")


@pytest.mark.parametrize("route_id", [10**5000, LoudInt(10**30)], ids=["10**5000", "int-with-raising-repr"])
def test_values_that_cannot_be_shown_are_still_just_counted(make_recorder, route_id: int) -> None:
    rec = make_recorder()
    rec.record(route_id, 200, T0, T0 + 1)  # must not raise
    counters = rec.snapshot().counters
    assert (counters.requests, counters.internal_errors) == (0, 1)


def test_bad_values_set_inside_measure_do_not_replace_the_applications_exception(make_recorder) -> None:
    rec = make_recorder()
    with pytest.raises(KeyError, match="the app's own"), rec.measure("payments.internal", "POST") as call:
        call.error_kind = None  # type: ignore[assignment]
        call.status = "timeout"  # type: ignore[assignment]
        raise KeyError("the app's own")
    assert rec.snapshot().counters.internal_errors == 1


def test_close_while_other_threads_record(make_recorder) -> None:
    rec = make_recorder()
    route = rec.route_id("/busy")
    record = rec.record
    failures: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(20_000):
                record(route, 200, T0, T0 + 5)
        except BaseException as exc:  # noqa: BLE001  # pragma: no cover - the failure being tested for
            failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    rec.close()
    for thread in threads:
        thread.join()
    assert failures == []


def test_a_segment_dir_with_a_nul_byte_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="segment_dir"):
        ProfilingConfig(segment_dir="/tmp/a\0b")


def test_a_direction_that_only_equals_1_is_refused_even_when_cached(make_recorder) -> None:
    rec = make_recorder()
    outbound = rec.route_id("api.example.com", "GET", Direction.OUTBOUND)
    assert outbound != L.OVERFLOW_ROUTE_ID
    for sloppy in (True, 1.0, "1"):
        assert rec.route_id("api.example.com", "GET", sloppy) == L.OVERFLOW_ROUTE_ID  # type: ignore[arg-type]
    assert rec.route_id("api.example.com", "GET", 1) == outbound
    assert rec.snapshot().counters.internal_errors == 3


def test_a_corrupt_route_count_cannot_push_the_writer_out_of_its_segment(make_recorder) -> None:
    rec = make_recorder(max_routes=2)
    rec.route_id("/only")
    with open(rec.path, "r+b") as file:  # another process scribbles on the shared word
        file.seek(L.ROUTES_OFFSET)
        file.write(struct.pack("<Q", 2**40))
    rec.record(rec.layout.route_slots + 5, 200, T0, T0 + 1)  # past the layout: no write
    rec.record(2, 200, T0, T0 + 1)  # inside the layout, never handed out: recorded in its slot
    with open(rec.path, "r+b") as file:
        file.seek(L.ROUTES_OFFSET)
        file.write(struct.pack("<Q", 0))
    with pytest.raises(SegmentError, match="corrupt route table"):
        read_segment(rec.path)


def test_a_writer_killed_inside_an_update_is_read_as_final_and_incomplete(segment_dir: Path) -> None:
    script = (
        "import os, sys\n"
        "from netprof_core import ProfilingConfig, Recorder\n"
        f"rec = Recorder(ProfilingConfig(segment_dir={str(segment_dir)!r}, app_name='dying'))\n"
        "route = rec.route_id('/x')\n"
        "for _ in range(10): rec.record(route, 200, 1000, 2000)\n"
        "print(rec.path, flush=True)\n"
        "os._exit(0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    path = Path(result.stdout.strip())
    header_layout = read_segment(path).header.layout
    seq_at = header_layout.live_offset + L.G_SEQ * L.WORD
    with open(path, "r+b") as file:  # as if it died between the two sequence stores
        file.seek(seq_at)
        (seq,) = struct.unpack("<Q", file.read(8))
        file.seek(seq_at)
        file.write(struct.pack("<Q", seq + 1))

    snapshot = read_segment(path)

    assert snapshot.source == "final" and not snapshot.complete
    assert snapshot.counters.requests == 10


def test_a_fifo_named_like_a_segment_hangs_nothing(segment_dir: Path, implementation: str) -> None:
    fifo = segment_dir / "intruder-1-1-0.npseg"
    os.mkfifo(fifo)
    recorder = Recorder(ProfilingConfig(segment_dir=str(segment_dir), app_name="a"), implementation=implementation)
    try:
        snapshots = read_segments(segment_dir)
        assert [s.app_name for s in snapshots] == ["a"]
        with pytest.raises(SegmentError, match="not a regular file"):
            read_segment(fifo)
    finally:
        recorder.close(remove=True)


def test_a_symlink_named_like_a_segment_is_not_followed(
    segment_dir: Path, tmp_path: Path, core: ModuleType, implementation: str
) -> None:
    """A reader (netprofd may write control blocks with CAP_DAC_OVERRIDE) never
    opens the file a symlink points to: each core's open, the reader and the
    control mapping refuse it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    recorder = Recorder(ProfilingConfig(segment_dir=str(elsewhere), app_name="target"), implementation=implementation)
    try:
        link = segment_dir / "intruder-1-1-0.npseg"
        link.symlink_to(recorder.path)
        with pytest.raises(OSError) as opened:
            core.open_segment(str(link), 512)
        assert opened.value.errno == errno.ELOOP
        with pytest.raises(SegmentError):
            read_segment(link)
        with pytest.raises(SegmentError):
            SegmentControl.open(link)
        assert read_segments(segment_dir) == []
    finally:
        recorder.close(remove=True)
