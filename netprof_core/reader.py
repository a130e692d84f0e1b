"""Reading segments: consistent snapshots of one process, merged across many.

A snapshot never holds a torn record, and its histograms always agree with its
counters: the statistics come from one copy taken between two equal, even
reads of a sequence counter (see ``_layout``), and each record is validated by
its own sequence word.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, TypeVar

from . import _layout as L
from ._recorder import add_counts, core_module
from .control import ControlState, SegmentControl, read_control_words
from .histogram import Histogram, add_packed, pack_words, saturating_add, subtract_packed
from .log import segment_logger
from .segment import (
    SegmentError,
    SegmentHeader,
    _layout_and_size,
    parse_header,
    process_alive,
    segment_paths,
)

__all__ = (
    "Counters",
    "PackedBlock",
    "RecordScan",
    "RequestRecord",
    "RouteKey",
    "RouteStats",
    "RouteSums",
    "SegmentBusy",
    "SegmentReader",
    "SegmentSnapshot",
    "merge_routes",
    "read_segment",
    "read_segments",
)

if TYPE_CHECKING:
    from typing_extensions import Self

    from ._recorder_py import PackedBlock, new_frozen, open_segment, pack_blocks, read_live, segment_locked
else:  # the live core's: a C type where the Cython core is in use
    _core = core_module()
    PackedBlock, pack_blocks, read_live = _core.PackedBlock, _core.pack_blocks, _core.read_live
    new_frozen, open_segment, segment_locked = _core.new_frozen, _core.open_segment, _core.segment_locked

_T = TypeVar("_T")
# Failures that say nothing about a file, only about this moment (no
# descriptor, no memory, a signal): never a verdict on a segment or a writer.
TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN, errno.ENOBUFS, errno.ENOLCK}
)
LIVE_ATTEMPTS = 3
RING_CHUNK_SLOTS = 4096
_ERROR_KINDS = tuple(L.ErrorKind)
_CONTROL = struct.Struct(f"<{L.CONTROL_WORDS}Q")
_GLOBALS = struct.Struct(f"<{L.GLOBAL_WORDS}Q")
# What snapshot() and refresh() read before the statistics, in one pread:
# closed_ns (header), the control block, the route table's count words.
_META_START = L.CLOSED_NS_OFFSET
_META_SIZE = L.ROUTES_OFFSET + L.ROUTE_TABLE_STRUCT.size - _META_START
_META_STRUCT = struct.Struct(f"<Q{L.CONTROL_OFFSET - L.CLOSED_NS_OFFSET - L.WORD}x{L.CONTROL_WORDS}QQQ")
_BLOCK_BYTES = L.ROUTE_BLOCK_WORDS * L.WORD
# poll() reads from the meta words to the live sequence counter in one go when
# the route table between them is this small (24 routes: 9 KB): one read of a
# few KB costs less than two calls.
_POLL_MAX_BYTES = 16384
# What a reader that polls at once reads when it opens its file: the header,
# the meta words, the route table of up to 24 routes (the default) and the
# live sequence counter; with a larger table, poll() reads the rest.
_HEAD_BYTES = 4096
# Where route 0 is named, in every layout (SegmentLayout.route_name_offset).
_NAMES_START = L.ROUTES_OFFSET + L.ROUTE_TABLE_HEADER
# Shared across readers (bounded): route names and control states repeat
# from one process of an application to the next.
_CACHE_LIMIT = 1024
_route_key_cache: dict[bytes, RouteKey] = {}
_route_keys_cache: dict[bytes, tuple[RouteKey, ...]] = {}  # whole name tables
_control_cache: dict[tuple[int, ...], ControlState] = {}
_last_table: tuple[bytes, tuple[RouteKey, ...]] = (b"", ())  # the whole name table read last, and its keys
_scratch = threading.local()


def _cache_put(cache: dict[Any, Any], key: object, value: _T) -> _T:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()  # a bound, not an LRU: the working set is far smaller
    cache[key] = value
    return value


def _scratch_view(size: int) -> memoryview:
    """``size`` bytes of this thread's scratch buffer, which statistics are
    read into and packed from: no fresh 100 KB per snapshot to fault in."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < size:
        buf = _scratch.buf = bytearray(max(size, 2 * _BLOCK_BYTES))  # replaced, never resized: views may live
    return memoryview(buf)[:size]


class SegmentBusy(SegmentError):
    """No consistent copy could be had in time: the writer neither paused nor published."""


@dataclass(frozen=True, slots=True, order=True)
class RouteKey:
    direction: L.Direction
    method: str
    template: str

    def __str__(self) -> str:
        arrow = "->" if self.direction == L.Direction.OUTBOUND else "<-"
        return f"{arrow} {self.method} {self.template}".replace("  ", " ")


@dataclass(frozen=True, slots=True)
class RouteStats:
    key: RouteKey
    count: int
    errors: int
    slow: int
    sum_ns: int
    max_ns: int
    bytes_in: int
    bytes_out: int
    ttfb_sum_ns: int
    status_classes: tuple[int, ...]  # no status, 1xx, 2xx, 3xx, 4xx, 5xx
    error_kinds: tuple[int, ...]  # by ErrorKind
    histogram: Histogram = field(compare=False)

    @property
    def mean_ns(self) -> float:
        return self.sum_ns / self.count if self.count else 0.0

    def __add__(self, other: RouteStats) -> RouteStats:
        return RouteStats(
            key=self.key,
            count=self.count + other.count,
            errors=self.errors + other.errors,
            slow=self.slow + other.slow,
            sum_ns=self.sum_ns + other.sum_ns,
            max_ns=max(self.max_ns, other.max_ns),
            bytes_in=self.bytes_in + other.bytes_in,
            bytes_out=self.bytes_out + other.bytes_out,
            ttfb_sum_ns=self.ttfb_sum_ns + other.ttfb_sum_ns,
            status_classes=tuple(a + b for a, b in zip(self.status_classes, other.status_classes)),
            error_kinds=tuple(a + b for a, b in zip(self.error_kinds, other.error_kinds)),
            histogram=self.histogram + other.histogram,
        )


_ROUTE_STATS_FIELDS = tuple(f.name for f in fields(RouteStats))


class RouteSums:
    """A route's statistics summed over processes, kept as one route block of
    the segment layout (counters, then histogram buckets) so that adding a
    process is one pass of u64 additions, with no object per bucket."""

    __slots__ = ("key", "max_ns", "words")

    def __init__(self, key: RouteKey) -> None:
        self.key = key
        self.words = array("Q", bytes(L.ROUTE_BLOCK_WORDS * L.WORD))
        self.max_ns = 0

    def add_block(self, block: PackedBlock) -> None:
        """Add a route block read from a segment (a word that would pass
        2**64 - 1 stays there: see :meth:`add`)."""
        if not add_packed(self.words, block.packed):
            saturating_add(self.words, block.words())
        self.max_ns = max(self.max_ns, block.max_ns)

    def subtract_block(self, block: PackedBlock) -> None:
        """Take away a block added before (the maximum stays: the largest ever seen)."""
        if not subtract_packed(self.words, block.packed):
            raise ValueError(f"{self.key}: subtracting a route block that was never added")

    def add(self, other: RouteSums) -> None:
        """Add ``other``'s sums. A word that would pass 2**64 - 1 stays there:
        sums made by adding (an application's totals, merged) are never
        subtracted from, and a counter that cannot grow must not go backwards."""
        if not add_counts(self.words, other.words):
            saturating_add(self.words, other.words)
        self.max_ns = max(self.max_ns, other.max_ns)

    def copy(self) -> RouteSums:
        twin = RouteSums(self.key)
        twin.add(self)
        return twin

    @property
    def count(self) -> int:
        return self.words[L.R_COUNT]  # type: ignore[no-any-return]

    def stats(self) -> RouteStats:
        w = self.words
        return new_frozen(  # type: ignore[no-any-return]  # RouteStats(...), made for each route at every change
            RouteStats,
            _ROUTE_STATS_FIELDS,
            (
                self.key,
                w[L.R_COUNT],
                w[L.R_ERRORS],
                w[L.R_SLOW],
                w[L.R_SUM_NS],
                self.max_ns,  # the words hold a sum of maxima
                w[L.R_BYTES_IN],
                w[L.R_BYTES_OUT],
                w[L.R_TTFB_SUM_NS],
                tuple(w[L.R_STATUS_CLASSES : L.R_STATUS_CLASSES + L.STATUS_CLASSES]),
                tuple(w[L.R_ERROR_KINDS : L.R_ERROR_KINDS + L.ERROR_KINDS]),
                Histogram(w[L.ROUTE_HEADER_WORDS :], self.max_ns),
            ),
        )


@dataclass(frozen=True, slots=True)
class RequestRecord:
    index: int
    wall_ns: int
    duration_ns: int
    route: RouteKey
    route_id: int
    status: int
    error_kind: L.ErrorKind
    bytes_in: int
    bytes_out: int
    ttfb_ns: int
    slow: bool
    error: bool


@dataclass(frozen=True, slots=True)
class Counters:
    requests: int  # recorded
    sampled_out: int
    disabled_calls: int
    internal_errors: int
    auto_disable_events: int
    overflowed_routes: int
    overhead_count: int
    overhead_sum_ns: int
    overhead_max_ns: int
    consecutive_errors: int
    overhead_histogram: Histogram = field(compare=False)

    @property
    def overhead_mean_ns(self) -> float:
        return self.overhead_sum_ns / self.overhead_count if self.overhead_count else 0.0


# Field names, in order, of the frozen dataclasses made for every process read
# (by new_frozen: what their __init__ does, in one call).
_COUNTERS_FIELDS = tuple(f.name for f in fields(Counters))


@dataclass(frozen=True, slots=True)
class SegmentSnapshot:
    path: str
    header: SegmentHeader
    control: ControlState
    counters: Counters
    routes: tuple[RouteStats, ...]
    records: tuple[RequestRecord, ...]  # oldest first
    taken_ns: int
    # "live" or "published" (the area the copy came from), or "final": the
    # writer has ended (closed its segment, or was found dead).
    source: str
    # False when the writer died inside an update: one request may be half-applied.
    complete: bool = True
    # The statistics copy itself, and the names of its routes by id: what
    # the daemon's sums are made from when ``routes`` was not built. ``blocks``
    # holds each route's block, packed; a snapshot taken by
    # :meth:`SegmentReader.refresh` shares its unchanged blocks with the last one.
    blocks: tuple[PackedBlock, ...] = field(default=(), repr=False, compare=False)
    route_keys: tuple[RouteKey, ...] = field(default=(), repr=False, compare=False)
    control_words: tuple[int, ...] = field(default=(), repr=False, compare=False)

    @property
    def app_name(self) -> str:
        return self.header.app_name

    @property
    def memory_bytes(self) -> int:
        return self.header.total_size


_SNAPSHOT_FIELDS = tuple(f.name for f in fields(SegmentSnapshot))


class SegmentReader:
    """Snapshots one segment, keeping its file open between snapshots.

    Reads go through ``pread``: the pages stay in the page cache without being
    mapped into this process, so a daemon reading many segments does not carry
    them in its RSS (a word read through a mapping maps the 64 KiB around it:
    the kernel's fault-around). The file is mapped, writable, only when its
    control block is written (:attr:`control`), so that a busy writer can be
    asked to publish; a segment that may only be read has no control, and then
    a writer that never pauses makes :meth:`snapshot` raise SegmentBusy after
    its timeout.
    """

    # (Slots: the daemon makes one per process it finds, each with a dozen attributes.)
    __slots__ = (
        "_buf",
        "_control",
        "_control_seen",
        "_fd",
        "_head",
        "_keys",
        "_live",
        "_owns_buffer",
        "_route_slots",
        "_writable",
        "header",
        "layout",
        "path",
        "polled",
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mapped: tuple[mmap.mmap, SegmentHeader] | None = None,
        poll: bool = False,
    ) -> None:
        """``mapped``: a buffer and header the caller already holds, and closes.
        ``poll``: set :attr:`polled` to what :meth:`poll` returns, read with
        the header (one read less for a caller that polls at once)."""
        self.path = os.fspath(path)
        self.polled: tuple[tuple[int, tuple[int, ...], int, int], int] | None = None
        # What the open read, with the route count it holds: the first
        # snapshot takes the route names from it (read after that count).
        self._head: tuple[bytes, int] | None = None
        self._keys: tuple[RouteKey, ...] = ()
        self._control_seen: tuple[tuple[int, ...], ControlState] | None = None
        self._owns_buffer = mapped is None
        self._fd: int | None = None
        self._writable = False
        self._buf: mmap.mmap | None = None
        self._control: SegmentControl | None = None
        if mapped is not None:
            self._buf, self.header = mapped
            self._control = SegmentControl(self._buf, self.header)
        else:
            head = self._open(self.path, _HEAD_BYTES if poll else L.HEADER_SIZE)
        # Offsets the layout computes on each use, asked for at every tick.
        self.layout, _, self._live, self._route_slots = _layout_and_size(
            self.header.ring_capacity, self.header.route_capacity
        )
        if poll:
            size = self._live + L.WORD - _META_START
            if mapped is None and _META_START + size <= len(head):
                self.polled = self._polled(head, size, _META_START)
                self._head = head, self.polled[0][2]
            else:
                try:
                    self.polled = self.poll()
                except BaseException:
                    self.close()
                    raise

    @classmethod
    def first(
        cls, path: str | os.PathLike[str], *, timeout: float = 1.0
    ) -> tuple[SegmentReader, SegmentSnapshot, int]:
        """Open a segment and take what the daemon keeps of it: the reader,
        ``snapshot(records=False, routes=False)`` and the live sequence
        counter read before it (a record after that counter is read at the
        next :meth:`refresh`). What netprofd does for each process it finds,
        in as few steps as it takes. ``timeout``: as :meth:`snapshot`'s."""
        reader = cls(path, poll=True)
        try:
            meta, sequence = reader.polled  # type: ignore[misc]
            return reader, reader._first_snapshot(meta, sequence, timeout), sequence
        except BaseException:
            reader.close()
            raise

    def _first_snapshot(
        self, meta: tuple[int, tuple[int, ...], int, int], sequence: int, timeout: float = 1.0
    ) -> SegmentSnapshot:
        """snapshot(records=False, routes=False, meta=meta, sequence=sequence),
        for a segment read through its file whose writer is not inside an
        update: one read of the live area (the general path otherwise)."""
        closed_ns, control_words, route_count, overflowed = meta
        if self._fd is None or sequence & 1 or not 1 <= route_count <= self._route_slots:
            return self.snapshot(records=False, routes=False, meta=meta, sequence=sequence, timeout=timeout)
        header = self._header(closed_ns)
        # Asked before the copy, as in snapshot().
        ended = closed_ns or not self.writer_alive()
        keys = self._route_keys(route_count)
        try:
            got = read_live(self._fd, self._live, sequence, self._route_slots, route_count, (), None)
        except ValueError as exc:  # a short read
            raise SegmentError(self.path, str(exc)) from None
        if got is None:  # written meanwhile
            return self.snapshot(records=False, routes=False, meta=meta, timeout=timeout)
        globals_, blocks, packed = got
        control_words, control = self._control_state(control_words)
        overhead = Histogram.from_packed(packed, globals_[L.G_OVERHEAD_MAX_NS])  # type: ignore[arg-type]  # read: no count then
        counters = _counters(globals_, overflowed, control_words, overhead)
        return self._made(
            header, control, counters, "final" if ended else "live", blocks, keys, control_words
        )

    def _made(
        self,
        header: SegmentHeader,
        control: ControlState,
        counters: Counters,
        source: str,
        blocks: tuple[PackedBlock, ...],
        keys: tuple[RouteKey, ...],
        control_words: tuple[int, ...],
        *,
        routes: tuple[RouteStats, ...] = (),
        records: tuple[RequestRecord, ...] = (),
        taken_ns: int | None = None,
        complete: bool = True,
    ) -> SegmentSnapshot:
        """The snapshot of what was read. By default what the daemon keeps
        (first() and refresh()): no route objects, no records, taken now."""
        # SegmentSnapshot(...), every field given, without the dataclass
        # __init__ (new_frozen): one is made for every process read.
        return new_frozen(  # type: ignore[no-any-return]
            SegmentSnapshot,
            _SNAPSHOT_FIELDS,
            (
                self.path,
                header,
                control,
                counters,
                routes,
                records,
                time.time_ns() if taken_ns is None else taken_ns,
                source,
                complete,
                blocks,
                keys,
                control_words,
            ),
        )

    def _open(self, path: str, head_size: int) -> bytes:
        """Open the file and read its header (in the first ``head_size``
        bytes read, returned)."""
        try:
            fd, self._writable, size, head = open_segment(path, head_size)
        except OSError as exc:
            raise SegmentError(path, f"cannot open: {exc.strerror}", exc.errno) from exc
        try:
            if size < 0:
                raise SegmentError(path, "not a regular file")
            if size < L.HEADER_SIZE:
                raise SegmentError(path, f"truncated: {size} bytes, shorter than a header")
            self.header = parse_header(head, path, file_size=size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return head

    def _read(self, offset: int, size: int) -> bytes:
        if self._fd is None:
            return self._buf[offset : offset + size]  # type: ignore[index]
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise SegmentError(
                self.path, f"truncated while being read: {len(data)} of {size} bytes at {offset}"
            )
        return data

    def _read_into(self, offset: int, size: int) -> memoryview:
        """``size`` bytes at ``offset``, in this thread's scratch buffer (valid
        until the next read into it)."""
        view = _scratch_view(size)
        if self._fd is None:
            view[:] = self._buf[offset : offset + size]  # type: ignore[index]
            return view
        got = os.preadv(self._fd, [view], offset)
        if got != size:
            raise SegmentError(self.path, f"truncated while being read: {got} of {size} bytes at {offset}")
        return view

    def close(self) -> None:
        self._head = None
        if self._owns_buffer and self._buf is not None:
            self._buf.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def control(self) -> SegmentControl | None:
        """The segment's control block, None when it may only be read. Maps
        the head of the file (up to the live counters) on first use."""
        if self._control is None and self._writable and self._fd is not None:
            try:
                self._buf = mmap.mmap(
                    self._fd, self.layout.live_offset + L.GLOBAL_WORDS * L.WORD, access=mmap.ACCESS_WRITE
                )
            except OSError as exc:
                segment_logger.warning("%s: cannot map the control block: %s", self.path, exc.strerror)
                if exc.errno not in TRANSIENT_ERRNOS:  # (else: asked again next time)
                    self._writable = False
                return None
            self._control = SegmentControl(self._buf, self.header)
        return self._control

    def writer_alive(self) -> bool:
        """True while the process writing this segment is alive: it holds the
        segment's lock (one fcntl on the open file), else /proc says so.
        OSError when /proc could not be read for the moment (no descriptor,
        no memory): that is no answer, and must not be taken for "ended"."""
        header = self.header
        if self._fd is not None and segment_locked(self._fd):  # (segment.writer_alive, inline)
            return True
        if process_alive(header.pid, header.start_ticks):
            return True
        return header.start_ticks != 0 and _proc_start_ticks_or_raise(header.pid) == header.start_ticks

    def live_sequence(self) -> int:
        """The live statistics' sequence counter: it moves with every record, so
        a reader can tell at the cost of one read whether anything changed."""
        return self._word(self._live)

    def control_words(self) -> tuple[int, ...]:
        """The control block's words as they are now (cheap: one read)."""
        if self._fd is None:
            return read_control_words(self._buf)
        return _CONTROL.unpack(self._read(L.CONTROL_OFFSET, L.CONTROL_SIZE))  # type: ignore[no-any-return]

    def closed_ns(self) -> int:
        """When the writer closed the segment at exit (wall clock, ns); 0 while open."""
        return self._word(L.CLOSED_NS_OFFSET)

    def meta(self) -> tuple[int, tuple[int, ...], int, int]:
        """closed_ns, the control words, the route count and the overflowed
        count, in one read (what :meth:`refresh` needs besides the statistics).
        Read before the statistics: a segment closed by then holds every
        record of its writer (closing comes after the last)."""
        values = _META_STRUCT.unpack(self._read(_META_START, _META_SIZE))
        return values[0], values[1:-2], values[-2], values[-1]

    def poll(self) -> tuple[tuple[int, tuple[int, ...], int, int], int]:
        """:meth:`meta` and :meth:`live_sequence` (what a tick asks of every
        process), in one read where the route table between them is small."""
        size = self._live + L.WORD - _META_START
        if self._fd is None or size > _POLL_MAX_BYTES:
            return self.meta(), self.live_sequence()
        return self._polled(self._read(_META_START, size), size)

    @staticmethod
    def _polled(
        data: bytes | memoryview, size: int, at: int = 0
    ) -> tuple[tuple[int, tuple[int, ...], int, int], int]:
        """What poll() returns, from the ``size`` bytes it reads, at ``at`` in ``data``."""
        values = _META_STRUCT.unpack_from(data, at)
        (sequence,) = L.U64.unpack_from(data, at + size - L.WORD)
        return (values[0], values[1:-2], values[-2], values[-1]), sequence

    def snapshot(
        self,
        *,
        records: bool = True,
        routes: bool = True,
        timeout: float = 1.0,
        now_ns: int | None = None,
        alive: bool | None = None,
        meta: tuple[int, tuple[int, ...], int, int] | None = None,
        sequence: int | None = None,
    ) -> SegmentSnapshot:
        """A consistent snapshot. ``routes=False`` leaves ``routes`` empty (sum
        ``blocks`` by ``route_keys`` instead: no object per route);
        ``alive``: whether the writer is alive, when the caller just checked.
        ``meta`` and ``sequence``: what :meth:`poll` returned just now, when
        the caller has it."""
        # Only the route blocks in use are copied. The count is read before the
        # copy: a route is named before the count that makes it visible is
        # raised, and one interned during the copy shows at the next snapshot.
        closed_ns, control_words, route_count, overflowed = self.meta() if meta is None else meta
        if not 1 <= route_count <= self._route_slots:
            raise SegmentError(
                self.path, f"corrupt route table: {route_count} routes in {self._route_slots} slots"
            )
        header = self._header(closed_ns)
        # Asked before the copy, as closed_ns: a writer gone by then wrote
        # everything it will ever write.
        if alive is None and not closed_ns:
            alive = self.writer_alive()
        keys = self._route_keys(route_count)
        sparse = None
        if not routes:  # only what the daemon keeps: read no more than that (see read_blocks)
            for _ in range(LIVE_ATTEMPTS):
                seq = self._word(self._live) if sequence is None else sequence
                sequence = None
                if not seq & 1:
                    sparse = self._read_live(seq, route_count, (), None)
                    if sparse is not None:
                        break
        built: tuple[RouteStats, ...] = ()
        if sparse is not None:
            globals_, overhead, blocks = sparse
            source, complete = "live", True
        else:
            stats, source, complete = self._consistent_stats(
                timeout,
                L.stats_prefix_words(self._route_slots, route_count) * L.WORD,
                0 if not routes else LIVE_ATTEMPTS,  # the live area was just tried
            )
            with stats, stats.cast("Q") as words:  # the scratch buffer is free again after
                built = (
                    tuple(
                        _route_stats(words, self.layout, route_id, key) for route_id, key in enumerate(keys)
                    )
                    if routes
                    else ()
                )
                overhead = _packed_histogram(words, L.OVERHEAD_HIST, words[L.G_OVERHEAD_MAX_NS])
                globals_ = tuple(words[: L.GLOBAL_WORDS])
                # Packed copies: a later refresh() keeps the unchanged ones.
                blocks = pack_blocks(words, self._route_slots, route_count, ())
        if source == "live" and (closed_ns or not alive):
            # Closing at exit is best effort (a process killed by a signal
            # skips it): a writer that is gone is gone either way.
            source = "final"
        control_words, control = self._control_state(control_words)
        counters = _counters(globals_, overflowed, control_words, overhead)
        next_index = globals_[L.G_NEXT_INDEX]
        now = time.time_ns() if now_ns is None else now_ns
        found = self._records(next_index, control, keys, now) if records else ()
        return self._made(
            header,
            control,
            counters,
            source,
            blocks,
            keys,
            control_words,
            routes=built,
            records=found,
            taken_ns=now,
            complete=complete,
        )

    def refresh(
        self,
        previous: SegmentSnapshot,
        *,
        attempts: int = 3,
        meta: tuple[int, tuple[int, ...], int, int] | None = None,
        sequence: int | None = None,
        timeout: float = 1.0,
    ) -> SegmentSnapshot:
        """What ``snapshot(records=False, routes=False, alive=True)`` gives,
        reading only what changed since ``previous`` (a snapshot of this
        segment): the blocks of the routes whose count moved, and the overhead
        histogram when a record was timed; the others are shared with
        ``previous``. A route's block changes only with its count, under the
        sequence counter, so a count read between two equal, even reads of
        that counter tells whether the block moved. With a writer too busy for
        that, a full snapshot (which can ask it to publish). ``meta``: what
        :meth:`meta` returned just now, and ``sequence`` the
        :meth:`live_sequence` read after it, when the caller has them.
        ``timeout``: as :meth:`snapshot`'s."""
        closed_ns, control_words, route_count, overflowed = self.meta() if meta is None else meta
        then = previous.blocks
        if not 1 <= route_count <= self._route_slots or len(then) > route_count:
            return self.snapshot(records=False, routes=False, alive=True, timeout=timeout)
        for _ in range(attempts):
            seq = self._word(self._live) if sequence is None else sequence
            sequence = None
            if seq & 1:
                continue
            got = self._read_live(seq, route_count, then, previous.counters)
            if got is None:
                continue  # written meanwhile: the reads may not agree
            globals_, overhead, blocks = got
            control_words, control = self._control_state(control_words)
            return self._made(
                self._header(closed_ns),
                control,
                _counters(globals_, overflowed, control_words, overhead),
                "final" if closed_ns else "live",
                blocks,
                self._route_keys(route_count),
                control_words,
            )
        return self.snapshot(records=False, routes=False, alive=True, timeout=timeout)

    def _read_live(
        self, seq: int, route_count: int, then: tuple[PackedBlock, ...], earlier: Counters | None
    ) -> tuple[tuple[int, ...], Histogram, tuple[PackedBlock, ...]] | None:
        """The live area's global words, overhead histogram and first
        ``route_count`` route blocks, if its sequence counter is still ``seq``
        (even, read before) after reading them; else None. Reads only what
        moved since ``then`` (blocks by route id) and ``earlier`` (counters)."""
        live = self._live
        if self._fd is None:  # a buffer the caller mapped: copied, then packed
            globals_: tuple[int, ...] = _GLOBALS.unpack(self._read(live, L.GLOBAL_WORDS * L.WORD))
            size = L.stats_prefix_words(self._route_slots, route_count) * L.WORD
            with self._read_into(live, size).cast("Q") as words:
                blocks = pack_blocks(words, self._route_slots, route_count, then)
        else:
            try:
                got = read_live(
                    self._fd,
                    live,
                    seq,
                    self._route_slots,
                    route_count,
                    then,
                    None if earlier is None else earlier.overhead_count,
                )
            except ValueError as exc:  # a short read
                raise SegmentError(self.path, str(exc)) from None
            if got is None:
                return None
            globals_, blocks, packed = got
            if packed is None:  # no record timed since ``earlier``
                return globals_, earlier.overhead_histogram, blocks  # type: ignore[union-attr]
            return globals_, Histogram.from_packed(packed, globals_[L.G_OVERHEAD_MAX_NS]), blocks
        # The overhead histogram moves only when a record was timed; read after
        # the rest, under the same counter.
        if earlier is not None and globals_[L.G_OVERHEAD_COUNT] == earlier.overhead_count:
            return globals_, earlier.overhead_histogram, blocks
        overhead = self._overhead_histogram(globals_[L.G_OVERHEAD_MAX_NS])
        if self._word(live) != seq:
            return None
        return globals_, overhead, blocks

    def _overhead_histogram(self, max_ns: int) -> Histogram:
        """The live overhead histogram, read up to the bucket of its maximum
        (those above are empty)."""
        count = L.bucket_index(max_ns) + 1
        offset = self._live + L.OVERHEAD_HIST * L.WORD
        return Histogram.from_packed(pack_words(self._read(offset, count * L.WORD), 0, count), max_ns)

    def _control_state(self, words: tuple[int, ...]) -> tuple[tuple[int, ...], ControlState]:
        """The control block's words and state; most snapshots see the
        settings the last one saw (and most processes the settings of others),
        and share its state."""
        if self._control_seen is None or words != self._control_seen[0]:
            state = _control_cache.get(words)
            if state is None:
                state = _cache_put(_control_cache, words, ControlState.from_words(words))
            self._control_seen = (words, state)
        return self._control_seen

    def _header(self, closed_ns: int) -> SegmentHeader:
        """The header, with the time the writer closed the segment (0: open)."""
        return (
            self.header if closed_ns == self.header.closed_ns else replace(self.header, closed_ns=closed_ns)
        )

    def _route_keys(self, route_count: int) -> tuple[RouteKey, ...]:
        """The names of the first ``route_count`` routes. An entry never changes
        once its count is visible, so the names read before are kept."""
        global _last_table
        known = self._keys
        if len(known) < route_count:
            first = _NAMES_START + len(known) * L.ROUTE_NAME_SIZE  # layout.route_name_offset(), inline
            end = _NAMES_START + route_count * L.ROUTE_NAME_SIZE
            head, self._head = self._head, None
            if head is not None and route_count <= head[1] and end <= len(head[0]):
                # Read at the open, after the count. Most often the table the
                # last process of the app read: compared in place, neither
                # copied nor hashed (a few hundred bytes per process).
                last_names, last_keys = _last_table
                if not known and len(last_names) == end - first and head[0].startswith(last_names, first):
                    self._keys = last_keys
                    return last_keys
                names = head[0][first:end]
            else:
                names = self._read(first, end - first)
            found = _route_keys_cache.get(names)
            if found is None:
                found = tuple(
                    self._route_key(len(known) + i, names[at : at + L.ROUTE_NAME_SIZE])
                    for i, at in enumerate(range(0, len(names), L.ROUTE_NAME_SIZE))
                )
                if len(known) == 0:  # the usual table, as every process of the app names it
                    _cache_put(_route_keys_cache, names, found)
            if not known:
                _last_table = names, found
            known = self._keys = known + found
        return known[:route_count] if len(known) > route_count else known

    def _route_key(self, route_id: int, raw: bytes) -> RouteKey:
        key = _route_key_cache.get(raw)
        if key is not None:
            return key
        direction, method, template = L.ROUTE_NAME_STRUCT.unpack(raw)
        if direction not in (L.Direction.INBOUND, L.Direction.OUTBOUND):
            raise SegmentError(self.path, f"corrupt route table: route {route_id} has direction {direction}")
        key = RouteKey(
            L.Direction(direction),
            method.rstrip(b"\0").decode("utf-8", "replace"),
            template.rstrip(b"\0").decode("utf-8", "replace"),
        )
        _cache_put(_route_key_cache, raw, key)
        return key

    def _copy_stats(self, offset: int, size: int) -> memoryview | None:
        """The first ``size`` bytes of the statistics area at ``offset`` if they
        were not written during the copy."""
        seq_before = self._word(offset)
        if seq_before & 1:
            return None
        data = self._read_into(offset, size)
        if self._word(offset) == seq_before:
            return data
        data.release()
        return None

    def _word(self, offset: int) -> int:
        return L.U64.unpack(self._read(offset, L.WORD))[0]  # type: ignore[no-any-return]

    def _consistent_stats(
        self, timeout: float, size: int, live_attempts: int = LIVE_ATTEMPTS
    ) -> tuple[memoryview, str, bool]:
        """A consistent copy of the statistics (in the scratch buffer), where it
        came from, and whether it is complete."""
        live = self._live
        for _ in range(live_attempts):
            data = self._copy_stats(live, size)
            if data is not None:
                return data, "live", True
        if not self.writer_alive():
            # The writer died; an odd counter means inside an update.
            seq = self._word(live)
            return self._read_into(live, size), "final", not seq & 1
        published = self.layout.published_offset
        published_before = self._word(published)
        control = self.control
        if control is not None:
            control.request_publish()
        deadline = time.monotonic() + timeout
        pause = 20e-6
        while time.monotonic() < deadline:
            # Any publish completed since the request is recent enough.
            if self._word(published) > published_before:
                data = self._copy_stats(published, size)
                if data is not None:
                    return data, "published", True
            data = self._copy_stats(live, size)
            if data is not None:
                return data, "live", True
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        raise SegmentBusy(self.path, f"no consistent copy within {timeout} s (writer busy)")

    def _records(
        self, next_index: int, control: ControlState, keys: tuple[RouteKey, ...], now_ns: int
    ) -> tuple[RequestRecord, ...]:
        """The ring's complete records counted in this snapshot, oldest first."""
        found = [
            record for chunk in self._record_chunks(next_index, control, keys, now_ns) for record in chunk
        ]
        found.sort(key=lambda record: record.index)
        return tuple(found)

    def _record_chunks(
        self,
        next_index: int,
        control: ControlState,
        keys: tuple[RouteKey, ...],
        now_ns: int,
        start_slot: int = 0,
    ) -> Iterator[list[RequestRecord]]:
        """The ring's complete records counted in a snapshot, RING_CHUNK_SLOTS
        slots at a time from ``start_slot`` round the ring (each chunk's
        records by index): what is held at once, and how long a step takes,
        are bounded whatever the ring's size."""
        capacity = control.ring_capacity
        ring = self.layout.ring_capacity
        if not 0 < capacity <= ring:  # as the writer reads it
            capacity = ring
        lowest = max(next_index - capacity, control.clean_floor, 0)
        oldest_wall = now_ns - int(control.retention_seconds * 1e9) if control.retention_seconds else 0
        start_slot = start_slot if 0 <= start_slot < ring else 0
        for begin, end in ((start_slot, ring), (0, start_slot)):
            for first in range(begin, end, RING_CHUNK_SLOTS):
                slots = min(RING_CHUNK_SLOTS, end - first)
                found = self._chunk_records(first, slots, lowest, next_index, oldest_wall, keys)
                found.sort(key=lambda record: record.index)
                yield found

    def _chunk_records(
        self,
        first: int,
        slots: int,
        lowest: int,
        next_index: int,
        oldest_wall: int,
        keys: tuple[RouteKey, ...],
    ) -> list[RequestRecord]:
        """The complete records of ``slots`` ring slots from ``first`` whose
        index is in [lowest, next_index) and that ended at ``oldest_wall`` or after."""
        start = self.layout.ring_offset + first * L.RECORD_SIZE
        size = slots * L.RECORD_SIZE
        # Sequence words before, the records, sequence words after: a record
        # is whole if its sequence word was even and the same both times.
        before = memoryview(self._read(start, size)).cast("Q")
        data = memoryview(self._read(start, size)).cast("Q")
        after = memoryview(self._read(start, size)).cast("Q")
        found = []
        for at in range(0, slots * L.RECORD_WORDS, L.RECORD_WORDS):
            seq = before[at]
            if seq == 0 or seq & 1 or after[at] != seq:
                continue
            index = seq // 2 - 1
            if not lowest <= index < next_index:
                continue
            wall_ns = data[at + L.REC_WALL_NS]
            if wall_ns < oldest_wall:
                continue
            route_id, status, error_kind, flags = L.unpack_record_word(data[at + L.REC_PACKED])
            found.append(
                RequestRecord(
                    index=index,
                    wall_ns=wall_ns,
                    duration_ns=data[at + L.REC_DURATION_NS],
                    route=keys[route_id] if route_id < len(keys) else keys[L.OVERFLOW_ROUTE_ID],
                    route_id=route_id,
                    status=status,
                    error_kind=_ERROR_KINDS[error_kind] if error_kind < L.ERROR_KINDS else L.ErrorKind.OTHER,
                    bytes_in=data[at + L.REC_BYTES_IN],
                    bytes_out=data[at + L.REC_BYTES_OUT],
                    ttfb_ns=data[at + L.REC_TTFB_NS],
                    slow=bool(flags & L.FLAG_SLOW),
                    error=bool(flags & L.FLAG_ERROR),
                )
            )
        return found

    def record_chunks(self, snapshot: SegmentSnapshot) -> Iterator[list[RequestRecord]]:
        """The stored records counted in ``snapshot`` (one of this segment),
        a chunk of ring slots at a time, oldest first (as the ring holds them:
        from the slot the writer writes next), each step bounded in time and
        memory: see :class:`RecordScan`."""
        cursor = self._word(self._live + L.G_RING_CURSOR * L.WORD)
        return self._record_chunks(
            snapshot.counters.requests, snapshot.control, snapshot.route_keys, snapshot.taken_ns, cursor
        )


class RecordScan:
    """The stored request records of one segment, read a chunk of ring slots
    at a time (RING_CHUNK_SLOTS slots: a few hundred KB read, a few thousand
    records made per step), so that reading a ring holds bounded memory and a
    worker thread for a bounded time per step, whatever the ring's size: a
    daemon runs each :meth:`next_chunk` in a worker thread, and a large ring
    never holds the threads every other request needs. The scan opens its own
    reader (the daemon's may be closed by a tick meanwhile)."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 0.1) -> None:
        """``timeout``: how long to wait for a writer caught inside an update
        to publish (SegmentBusy after that; a busy writer publishes at once)."""
        self._reader = SegmentReader(path)
        try:
            self.snapshot = self._reader.snapshot(records=False, routes=False, timeout=timeout)
            self._chunks = self._reader.record_chunks(self.snapshot)
        except BaseException:
            self._reader.close()
            raise

    def next_chunk(self) -> list[RequestRecord] | None:
        """The next chunk's records (oldest first within it); None when the
        ring has been read (the file is closed then)."""
        try:
            chunk = next(self._chunks, None)
        except BaseException:
            self.close()
            raise
        if chunk is None:
            self.close()
        return chunk

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _proc_start_ticks_or_raise(pid: int) -> int | None:
    """The start time of ``pid`` (as ``proc_start_ticks``), None if it is gone
    or a zombie; OSError if /proc could not be read for the moment. Asked only
    when the cheap way said "gone" (a writer ends once)."""
    if not 0 < pid < 2**63:
        return None
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            raise
        return None
    try:
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    # The command name may hold spaces and parentheses: fields follow the last ')'.
    fields_ = data[data.rindex(b")") + 2 :].split()
    return None if fields_[0] in (b"Z", b"X") else int(fields_[19])


def _route_stats(words: memoryview, layout: L.SegmentLayout, route_id: int, key: RouteKey) -> RouteStats:
    r = layout.route_header(route_id)
    return RouteStats(
        key=key,
        count=words[r + L.R_COUNT],
        errors=words[r + L.R_ERRORS],
        slow=words[r + L.R_SLOW],
        sum_ns=words[r + L.R_SUM_NS],
        max_ns=words[r + L.R_MAX_NS],
        bytes_in=words[r + L.R_BYTES_IN],
        bytes_out=words[r + L.R_BYTES_OUT],
        ttfb_sum_ns=words[r + L.R_TTFB_SUM_NS],
        status_classes=tuple(words[r + L.R_STATUS_CLASSES : r + L.R_STATUS_CLASSES + L.STATUS_CLASSES]),
        error_kinds=tuple(words[r + L.R_ERROR_KINDS : r + L.R_ERROR_KINDS + L.ERROR_KINDS]),
        histogram=_histogram(words, layout.route_histogram(route_id), words[r + L.R_MAX_NS]),
    )


def _counters(
    words: Sequence[int], overflowed: int, control_words: tuple[int, ...], overhead: Histogram
) -> Counters:
    """The segment-wide counters, from the statistics' global words."""
    return new_frozen(  # type: ignore[no-any-return]  # Counters(...): made at every tick for every process that recorded
        Counters,
        _COUNTERS_FIELDS,
        (
            words[L.G_NEXT_INDEX],
            words[L.G_SAMPLED_OUT],
            words[L.G_DISABLED_CALLS],
            words[L.G_INTERNAL_ERRORS],
            words[L.G_AUTO_DISABLE_EVENTS],
            overflowed,
            words[L.G_OVERHEAD_COUNT],
            words[L.G_OVERHEAD_SUM_NS],
            words[L.G_OVERHEAD_MAX_NS],
            # A pending reset clears the count at the next error; it counts as done.
            0
            if control_words[L.C_RESET_ERRORS_REQUEST] != words[L.G_RESET_ACK]
            else words[L.G_CONSECUTIVE_ERRORS],
            overhead,
        ),
    )


def _histogram(words: memoryview, start: int, max_ns: int) -> Histogram:
    return Histogram.from_bytes(words[start : start + L.HIST_BUCKETS].cast("B"), max_ns)


def _packed_histogram(words: memoryview, start: int, max_ns: int) -> Histogram:
    return Histogram.from_packed(pack_words(words, start, L.HIST_BUCKETS), max_ns)


def read_segment(
    path: str | os.PathLike[str], *, records: bool = True, timeout: float = 1.0
) -> SegmentSnapshot:
    """A consistent snapshot of one segment; SegmentError if it is not one."""
    with SegmentReader(path) as reader:
        return reader.snapshot(records=records, timeout=timeout)


def read_segments(
    directory: str | os.PathLike[str], *, records: bool = True, timeout: float = 1.0
) -> list[SegmentSnapshot]:
    """Snapshots of every readable segment in ``directory``; others are logged and skipped."""
    snapshots = []
    for path in segment_paths(directory):
        try:
            snapshots.append(read_segment(path, records=records, timeout=timeout))
        except SegmentError as exc:
            if exc.errno == errno.ENOENT:  # the process ended and its segment was removed
                segment_logger.debug("segment %s went away", path)
            else:
                segment_logger.warning("skipping segment: %s", exc)
        except OSError as exc:
            segment_logger.warning("skipping segment %s: %s", path, exc)
    return snapshots


def merge_routes(snapshots: Iterable[SegmentSnapshot]) -> dict[tuple[str, RouteKey], RouteStats]:
    """Per (application, route), the exact sum over processes."""
    merged: dict[tuple[str, RouteKey], RouteStats] = {}
    for snapshot in snapshots:
        for route in snapshot.routes:
            key = (snapshot.app_name, route.key)
            merged[key] = merged[key] + route if key in merged else route
    return merged
