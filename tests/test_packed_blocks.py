"""Route blocks read and summed the way netprofd does at every tick: the
Cython helpers and their pure-Python twins give the same blocks, the same
sums and the same errors, and reading only what is needed (each route's
counters, its histogram up to its maximum's bucket) gives exactly the blocks
a full copy of the area packs."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import pytest

from netprof_core import SegmentReader, _recorder_py
from netprof_core import _layout as L
from netprof_core.reader import RouteKey, RouteSums


def _area(rng: random.Random, routes: int) -> array[int]:
    """A statistics area as a writer leaves it: each route's histogram holds
    nothing above its maximum's bucket; some routes were never used."""
    words = array("Q", bytes(8 * L.stats_prefix_words(routes, routes)))
    for i in range(L.GLOBAL_WORDS):
        words[i] = rng.randrange(0, 1000)
    words[L.G_SEQ] = 2 * rng.randrange(1000)
    for route in range(routes):
        for _ in range(rng.choice([0, 0, 1, 5, 400])):
            _record(words, routes, route, int(rng.lognormvariate(14, 3)), rng)
    return words


def _record(words: array[int], routes: int, route: int, duration: int, rng: random.Random) -> None:
    """What a writer of ``routes`` route slots does for one request of ``route``."""
    start = L.ROUTE_HEADERS_START + route * L.ROUTE_HEADER_WORDS
    words[start + L.R_COUNT] += 1
    words[start + L.R_SUM_NS] += duration
    words[start + L.R_MAX_NS] = max(words[start + L.R_MAX_NS], duration)
    if words[start + L.R_COUNT] == 1 or duration < words[start + L.R_MIN_NS]:
        words[start + L.R_MIN_NS] = duration
    words[start + L.R_STATUS_CLASSES + rng.randrange(L.STATUS_CLASSES)] += 1
    words[L.route_histograms_start(routes) + route * L.HIST_BUCKETS + L.bucket_index(duration)] += 1


def _file(tmp_path: Path, words: array[int], offset: int) -> int:
    path = tmp_path / f"area-{offset}"
    path.write_bytes(bytes(offset) + words.tobytes())
    return os.open(path, os.O_RDONLY)


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return [(x.count, x.max_ns, x.packed) for x in a] == [(y.count, y.max_ns, y.packed) for y in b]  # type: ignore[attr-defined]


def test_sparse_reads_give_the_blocks_a_full_copy_packs(core: object, tmp_path: Path) -> None:
    rng = random.Random(11)
    for trial in range(8):
        routes = rng.randrange(1, 8)
        words = _area(rng, routes)
        fd = _file(tmp_path, words, 8 * trial)
        try:
            full = _recorder_py.pack_blocks(words, routes, routes, ())
            assert _same(core.pack_blocks(words, routes, routes, ()), full)  # type: ignore[attr-defined]
            blocks = core.read_blocks(fd, 8 * trial, routes, routes, ())  # type: ignore[attr-defined]
            assert _same(blocks, full)
            # One route moves: only its block is new; the others are the same objects.
            moved = rng.randrange(routes)
            _record(words, routes, moved, int(rng.lognormvariate(20, 2)), rng)  # may raise the maximum
            fd2 = _file(tmp_path, words, 8 * trial + 8)
            try:
                again = core.read_blocks(fd2, 8 * trial + 8, routes, routes, blocks)  # type: ignore[attr-defined]
                assert _same(again, _recorder_py.pack_blocks(words, routes, routes, ()))
                assert [a is b for a, b in zip(again, blocks)] == [r != moved for r in range(routes)]
                assert _same(core.pack_blocks(words, routes, routes, blocks), again)  # type: ignore[attr-defined]
            finally:
                os.close(fd2)
        finally:
            os.close(fd)


@pytest.mark.parametrize("minimum", ["none", "above the maximum"])
def test_a_block_without_a_trustworthy_minimum_is_read_whole(core: object, tmp_path: Path, minimum: str) -> None:
    """A segment from before the minimum was kept (0), or one whose minimum
    lies above its maximum: the histogram is read from bucket 0."""
    rng = random.Random(3)
    words = array("Q", bytes(8 * L.stats_prefix_words(2, 2)))
    start = L.ROUTE_HEADERS_START + L.ROUTE_HEADER_WORDS
    for _ in range(50):
        _record(words, 2, 1, int(rng.lognormvariate(14, 3)), rng)
    words[start + L.R_MIN_NS] = 0 if minimum == "none" else 2 * words[start + L.R_MAX_NS]
    fd = _file(tmp_path, words, 0)
    try:
        blocks = core.read_blocks(fd, 0, 2, 2, ())  # type: ignore[attr-defined]
    finally:
        os.close(fd)
    assert _same(blocks, _recorder_py.pack_blocks(words, 2, 2, ()))
    assert blocks[1].count == 50


def test_read_live_checks_the_sequence_counter(core: object, tmp_path: Path) -> None:
    words = _area(random.Random(5), 3)
    fd = _file(tmp_path, words, 64)
    try:
        seq = words[L.G_SEQ]
        globals_, blocks, overhead = core.read_live(fd, 64, seq, 3, 3, ())  # type: ignore[attr-defined]
        assert globals_ == tuple(words[: L.GLOBAL_WORDS])
        assert _same(blocks, _recorder_py.pack_blocks(words, 3, 3, ()))
        assert overhead == _recorder_py.pack_words(
            words, L.OVERHEAD_HIST, L.bucket_index(words[L.G_OVERHEAD_MAX_NS]) + 1
        )
        # The overhead histogram is read only when its count moved.
        again = core.read_live(fd, 64, seq, 3, 3, blocks, words[L.G_OVERHEAD_COUNT])  # type: ignore[attr-defined]
        assert again[2] is None and all(a is b for a, b in zip(again[1], blocks))
        assert core.read_live(fd, 64, seq + 2, 3, 3, ()) is None  # type: ignore[attr-defined]
        with pytest.raises(ValueError, match="truncated"):
            core.read_live(fd, 64, seq, 300, 300, ())  # type: ignore[attr-defined]  # more route headers than the file holds
    finally:
        os.close(fd)


def _sums(n: int) -> list[RouteSums]:
    return [RouteSums(RouteKey(L.Direction.INBOUND, "GET", f"/r{i}")) for i in range(n)]


def test_replace_blocks_swaps_what_moved(core: object) -> None:
    rng = random.Random(2)
    routes = 5
    words = _area(rng, routes)
    first = core.pack_blocks(words, routes, routes, ())  # type: ignore[attr-defined]
    for r in range(routes):
        _record(words, routes, r, rng.randrange(1, 10**9), rng)
    second = core.pack_blocks(words, routes, routes, ())  # type: ignore[attr-defined]
    theirs, ours = _sums(routes), _sums(routes)
    core.replace_blocks((), first, ours)  # type: ignore[attr-defined]
    core.replace_blocks(first, second, ours)  # type: ignore[attr-defined]
    for block, route in zip(second, theirs):
        route.add_block(block)
    assert [(s.words, s.max_ns) for s in ours] == [(s.words, s.max_ns) for s in theirs]
    core.replace_blocks(second, (), ours)  # type: ignore[attr-defined]
    assert not any(any(s.words) for s in ours)
    assert [s.max_ns for s in ours] == [s.max_ns for s in theirs]  # the maximum stays


def test_replace_blocks_refuses_what_was_never_added(core: object) -> None:
    rng = random.Random(3)
    words = _area(rng, 2)
    words[L.ROUTE_HEADERS_START + L.R_COUNT] += 1  # route 0 used
    blocks = core.pack_blocks(words, 2, 2, ())  # type: ignore[attr-defined]
    sums = _sums(2)
    core.replace_blocks((), blocks[:1], sums)  # type: ignore[attr-defined]
    before = [s.words.tobytes() for s in sums]
    # Route 0's block taken away twice: the second time refused, its sum unchanged.
    assert core.replace_blocks(blocks[:1], (), sums) is None  # type: ignore[attr-defined]
    assert core.replace_blocks(blocks[:1], (), sums) == (0, "unsubtractable")  # type: ignore[attr-defined]
    assert sums[0].words.tobytes() == bytes(len(before[0]))
    # Blocks made from Python (indexes in any order) are checked, and summed alike.
    packed = blocks[0].packed
    n = (len(packed) - 8) // 10
    order = list(range(n))[::-1]
    vals = array("Q", packed[8 : 8 + 8 * n])
    idx = array("H", packed[8 + 8 * n :])
    shuffled = (
        packed[:8]
        + array("Q", [vals[i] for i in order]).tobytes()
        + array("H", [idx[i] for i in order]).tobytes()
    )
    made = core.PackedBlock(blocks[0].count, blocks[0].max_ns, shuffled)  # type: ignore[attr-defined]
    core.replace_blocks((), (made,), sums)  # type: ignore[attr-defined]
    assert sums[0].words.tobytes() == blocks[0].words().tobytes()
    with pytest.raises(ValueError):
        core.replace_blocks((), (core.PackedBlock(1, 1, b"\1\0\0\0\0\0\0\0" + bytes(8) + b"\xff\xff"),), sums)  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        core.PackedBlock(1, 1, bytearray(8))  # type: ignore[attr-defined]


def test_proc_start_ticks(core: object) -> None:
    mine = _recorder_py.proc_start_ticks(os.getpid())
    assert mine is not None and core.proc_start_ticks(os.getpid()) == mine  # type: ignore[attr-defined]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while _recorder_py.proc_start_ticks(child.pid) is not None:  # until it has ended (a zombie)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert core.proc_start_ticks(child.pid) is None  # type: ignore[attr-defined]
    child.wait()
    for gone in (child.pid, -1, 2**63):
        assert core.proc_start_ticks(gone) is None  # type: ignore[attr-defined]


def test_new_frozen_is_the_dataclass_init(core: object) -> None:
    """What a frozen dataclass's __init__ makes, field by field, and its errors."""
    from dataclasses import FrozenInstanceError, fields

    from netprof_core import Histogram
    from netprof_core.reader import Counters, RouteStats, SegmentSnapshot
    from netprof_core.segment import SegmentHeader

    new_frozen = core.new_frozen  # type: ignore[attr-defined]
    histogram = Histogram()
    values = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, histogram)
    names = tuple(f.name for f in fields(Counters))
    made = new_frozen(Counters, names, values)
    assert type(made) is Counters and made == Counters(*values)
    assert made.overhead_histogram is histogram
    with pytest.raises(FrozenInstanceError):
        made.requests = 2  # type: ignore[misc]
    header: tuple[Any, ...] = (*range(11), "app", 12)
    assert new_frozen(SegmentHeader, tuple(f.name for f in fields(SegmentHeader)), header) == SegmentHeader(
        *header
    )
    # The classes the reader makes this way: an __init__ that only sets fields.
    for cls in (Counters, SegmentHeader, SegmentSnapshot, RouteStats):
        assert not hasattr(cls, "__post_init__") and getattr(cls, "__dataclass_params__").frozen  # noqa: B009
    for bad in ((1, 2), values + (1,)):
        with pytest.raises(ValueError, match="values for 11 attributes"):
            new_frozen(Counters, names, bad)
    with pytest.raises(TypeError):
        new_frozen(Counters, list(names), values)
    with pytest.raises(AttributeError):
        new_frozen(Counters, ("requests", "no_such_field"), (1, 2))


def test_counter_totals_copy_is_an_empty_total_plus_the_original() -> None:
    """CounterTotals.copy, written field by field, gives what adding to an empty total gives."""
    from dataclasses import fields

    from netprof_core import Histogram
    from netprof_daemon.totals import CounterTotals

    rng = random.Random(3)
    counts = array("Q", bytes(8 * L.HIST_BUCKETS))
    for _ in range(50):
        counts[rng.randrange(L.HIST_BUCKETS)] += rng.randrange(1, 1000)
    values = [rng.randrange(10**12) for _ in range(9)]
    totals = CounterTotals(*values)  # type: ignore[arg-type]  # nine ints, then the histogram
    totals.overhead_histogram = Histogram(counts, 123)
    added = CounterTotals()
    added.add(totals)
    twin = totals.copy()
    for f in fields(CounterTotals):
        if f.name != "overhead_histogram":
            assert getattr(twin, f.name) == getattr(added, f.name) == getattr(totals, f.name)
    assert twin.overhead_histogram.counts == added.overhead_histogram.counts == counts
    assert twin.overhead_histogram.max_ns == added.overhead_histogram.max_ns
    assert twin.overhead_histogram is not totals.overhead_histogram


def test_the_recorder_keeps_each_routes_minimum(make_recorder: Any) -> None:
    """What lets a reader copy only the buckets that can be nonzero: the
    shortest duration of each route, from its first record on."""
    rec = make_recorder()
    fast, slow, unused = rec.route_id("/fast"), rec.route_id("/slow"), rec.route_id("/unused")
    for duration in (5_000, 300, 90_000, 300, 7_000):
        rec.record(fast, 200, 10**15, 10**15 + duration)
    rec.record(slow, 200, 10**15, 10**15 + 4_000_000_000)
    with SegmentReader(rec.path) as reader:
        live = reader.layout.live_offset

        def word(route: int, index: int) -> int:
            at = live + (reader.layout.route_header(route) + index) * L.WORD
            return L.U64.unpack(os.pread(reader._fd, L.WORD, at))[0]  # type: ignore[arg-type]

        assert [word(r, L.R_MIN_NS) for r in (fast, slow, unused)] == [300, 4_000_000_000, 0]
        # The daemon's reads, from the minimum's bucket on, give what a full copy packs.
        daemon = reader.snapshot(records=False, routes=False)
        routes = len(daemon.blocks)
        slots = reader.layout.route_slots
        area = array("Q", os.pread(reader._fd, L.stats_prefix_words(slots, routes) * L.WORD, live))  # type: ignore[arg-type]
        assert _same(daemon.blocks, _recorder_py.pack_blocks(area, slots, routes, ()))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_segment_leaves_nothing_open_when_it_fails(core: object, tmp_path: Path) -> None:
    """A file that opens but cannot be read (/proc/self/mem at 0: EIO), a
    path that cannot be opened, a path with a NUL: an error, no descriptor left."""
    before = _open_fds()
    for _ in range(3):
        with pytest.raises(OSError) as failed:
            core.open_segment("/proc/self/mem", 512)  # type: ignore[attr-defined]
        assert failed.value.errno == errno.EIO
        assert failed.value.filename == "/proc/self/mem"
        with pytest.raises(FileNotFoundError):
            core.open_segment(str(tmp_path / "missing.npseg"), 512)  # type: ignore[attr-defined]
        with pytest.raises(ValueError, match="embedded null byte"):
            core.open_segment(str(tmp_path / "a.npseg") + "\0junk", 512)  # type: ignore[attr-defined]
    assert _open_fds() == before
