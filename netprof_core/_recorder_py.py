"""The pure-Python recorder core: the twin of ``_recorder_c.pyx``.

Both apply the same updates, in the same order, to the segment described in
``_layout``; a test proves they leave byte-identical segments. Keep them in step.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from itertools import compress, pairwise
from typing import Any

from . import _layout as L

MASK64 = (1 << 64) - 1
# What admit() returns for a request to record: ADMIT_TIMED when its update
# is also to be timed, for the profiler's own overhead histogram.
ADMIT_RECORD = 1
ADMIT_TIMED = 2

SlowCallback = Callable[[int, int, int, int], None]


def invalid_arguments(graceful: bool, args: tuple[object, ...]) -> ValueError:
    """The error for a bad record() call. Its message shows the values only
    when it will be raised: a repr can be costly, or raise itself."""
    message = "netprof: record() takes non-negative ints within range, a route id from route_id() and end_ns >= start_ns"
    if graceful:
        return ValueError(f"{message}; got types {tuple(type(arg).__name__ for arg in args)}")
    try:
        return ValueError(f"{message}; got {args!r}")
    except Exception:  # noqa: BLE001 - an argument's repr may raise anything
        return ValueError(message)


class RecorderCore:
    """Applies one request to a segment.

    Thread-safe through a lock (the Cython core relies on the GIL instead);
    never blocked by a reader. ``on_slow(route_id, duration_ns, status,
    suppressed)`` is called, outside the update, for slow requests when slow
    logging is on, at most once a second.

    A signal handler runs in the thread it interrupts, maybe inside an update:
    its calls get in (the lock is reentrant) and find ``_busy`` set; what they
    would write waits in ``_pending``, applied as soon as the update it
    interrupted is done (a plain lock would wait for itself forever).
    """

    def __init__(
        self, buf: object, layout: L.SegmentLayout, seed: int, on_slow: SlowCallback | None = None
    ) -> None:
        self._lock = threading.RLock()
        self._busy = False  # an update is in progress in the thread holding the lock
        self._nested = False  # admit() is deciding inside another update: its counts wait
        self._pending: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._layout = layout
        self._slots = layout.route_slots
        self._hists = layout.route_histograms_start
        self._ctl = L.CONTROL_OFFSET // L.WORD
        self._live = layout.live_offset // L.WORD
        self._pub = layout.published_offset // L.WORD
        self._ring = layout.ring_offset // L.WORD
        self._ring_capacity = layout.ring_capacity
        self._on_slow = on_slow
        self._words: memoryview | None = None
        self.rebind(buf, seed)

    def rebind(self, buf: object, seed: int) -> None:
        """Write into another segment of the same layout (a forked child's)."""
        with self._lock:
            self._release()
            self._words = memoryview(buf).cast("Q")  # type: ignore[arg-type]
            self._mono_offset_ns = L.read_header_field(buf, "mono_offset_ns")
            self._rng = seed
            self._calls = 0
            self._publish_ack = 0
            self._dirty = bytearray(self._slots + 1)  # route blocks, then the overhead histogram
            self._last_slow_log_ns = -L.SLOW_LOG_INTERVAL_NS
            self._slow_suppressed = 0

    def release(self) -> None:
        """Stop writing; record() becomes a no-op."""
        with self._lock:
            if self._busy:  # a signal handler's: the update it interrupted still writes
                self._pending.append((self._release, ()))
                return
            self._release()

    def _release(self) -> None:
        if self._words is not None:
            self._words.release()
            self._words = None

    def reset_lock(self) -> None:
        """In a forked child: the parent's lock may have been held by a thread
        that does not exist here (and what it left pending was the parent's)."""
        self._lock = threading.RLock()
        self._busy = self._nested = False
        self._pending.clear()

    def _run_pending(self) -> None:
        """Apply what signal handlers asked while an update was in progress."""
        while self._pending:
            self._busy = True
            try:
                while self._pending:
                    call, args = self._pending.popleft()
                    call(*args)
            finally:
                self._busy = False

    def _record_later(self, *args: int) -> None:
        admitted = self._admit()
        if admitted:
            self._record(admitted, *args)

    def _count_error_later(self, exc: BaseException) -> None:
        try:
            self._internal_error(exc)
        except BaseException as raised:  # already raised in the signal handler, where it was asked
            if raised is not exc:
                raise

    # -- the hot path -------------------------------------------------------

    def record(
        self,
        route_id: int,
        status: int,
        start_ns: int,
        end_ns: int,
        bytes_in: int = 0,
        bytes_out: int = 0,
        error_kind: int = 0,
        ttfb_ns: int = 0,
    ) -> None:
        with self._lock:
            if self._busy:  # a signal handler, inside this thread's own update: applied after it
                args = (route_id, status, start_ns, end_ns, bytes_in, bytes_out, error_kind, ttfb_ns)
                self._pending.append((self._record_later, args))
                return
            self._busy = True
            try:
                admitted = self._admit()
                slow = admitted and self._record(
                    admitted, route_id, status, start_ns, end_ns, bytes_in, bytes_out, error_kind, ttfb_ns
                )
            finally:
                self._busy = False
            if self._pending:
                self._run_pending()
        if slow and self._on_slow is not None:
            self._log_slow(route_id, end_ns - start_ns, status, end_ns)

    # The Cython core's entry for compiled hooks, which pass C integers; the same call here.
    record_ints = record

    def admit(self) -> int:
        """Whether to record the request that starts now: 0 when not (recording
        is off, or the request is sampled out; counted as such), else a token
        for :meth:`record_admitted` when it ends. A hook that asks first leaves
        a request it will not record alone, at the cost of this call."""
        with self._lock:
            if self._busy:  # a signal handler's: decided now, its counts written after the update
                self._nested = True
                try:
                    return self._admit()
                finally:
                    self._nested = False
            self._busy = True
            try:
                admitted = self._admit()
            finally:
                self._busy = False
            if self._pending:
                self._run_pending()
            return admitted

    def record_admitted(
        self,
        admitted: int,
        route_id: int,
        status: int,
        start_ns: int,
        end_ns: int,
        bytes_in: int = 0,
        bytes_out: int = 0,
        error_kind: int = 0,
        ttfb_ns: int = 0,
    ) -> None:
        """:meth:`record` for a request that :meth:`admit` let in when it
        started: ``admitted`` is what it returned (anything false records nothing)."""
        if not admitted:
            return
        args = (admitted, route_id, status, start_ns, end_ns, bytes_in, bytes_out, error_kind, ttfb_ns)
        with self._lock:
            if self._busy:  # a signal handler's (see record)
                self._pending.append((self._record, args))
                return
            self._busy = True
            try:
                slow = self._record(*args)
            finally:
                self._busy = False
            if self._pending:
                self._run_pending()
        if slow and self._on_slow is not None:
            self._log_slow(route_id, end_ns - start_ns, status, end_ns)

    record_admitted_ints = record_admitted

    def _admit(self) -> int:
        """``admit``, under the lock."""
        w = self._words
        if w is None:
            return 0
        c = self._ctl
        if not w[c + L.C_ENABLED] or not w[c + L.C_FEATURE_FLAG] or w[c + L.C_AUTO_DISABLED]:
            self._count(L.G_DISABLED_CALLS)
            return 0
        threshold = w[c + L.C_SAMPLE_THRESHOLD]
        if threshold < L.SAMPLE_ALL:
            x = self._rng
            x ^= x >> 12
            x ^= (x << 25) & MASK64
            x ^= x >> 27
            self._rng = x
            if ((x * 0x2545F4914F6CDD1D) & MASK64) >> 32 >= threshold:
                self._count(L.G_SAMPLED_OUT)
                return 0
        timed = w[c + L.C_PERF_MONITORING] and not self._calls & L.OVERHEAD_SAMPLE_MASK
        self._calls += 1
        return ADMIT_TIMED if timed else ADMIT_RECORD

    def _record(
        self,
        admitted: int,
        route_id: int,
        status: int,
        start_ns: int,
        end_ns: int,
        bytes_in: int,
        bytes_out: int,
        error_kind: int,
        ttfb_ns: int,
    ) -> bool:
        w = self._words
        if w is None:
            return False
        c = self._ctl
        timed = admitted == ADMIT_TIMED
        if timed:
            t0 = time.monotonic_ns()
        if not (
            isinstance(route_id, int)
            and isinstance(status, int)
            and isinstance(start_ns, int)
            and isinstance(end_ns, int)
            and isinstance(bytes_in, int)
            and isinstance(bytes_out, int)
            and isinstance(error_kind, int)
            and isinstance(ttfb_ns, int)
            # The route count is shared memory: trust it no further than the layout.
            and 0 <= route_id < min(w[L.ROUTE_COUNT_WORD], self._slots)
            and 0 <= status <= 0xFFFF
            and 0 <= start_ns <= end_ns <= 0x7FFFFFFFFFFFFFFF
            and 0 <= bytes_in <= MASK64
            and 0 <= bytes_out <= MASK64
            and 0 <= error_kind < L.ERROR_KINDS
            and 0 <= ttfb_ns <= MASK64
        ):
            args = (route_id, status, start_ns, end_ns, bytes_in, bytes_out, error_kind, ttfb_ns)
            self._internal_error(invalid_arguments(bool(w[c + L.C_GRACEFUL]), args))
            return False
        duration = end_ns - start_ns
        is_error = error_kind != 0 or status >= 500
        slow = duration >= w[c + L.C_SLOW_NS]

        g = self._live
        seq = w[g + L.G_SEQ]
        w[g + L.G_SEQ] = seq + 1
        try:
            r = g + L.ROUTE_HEADERS_START + route_id * L.ROUTE_HEADER_WORDS
            w[r + L.R_COUNT] += 1
            if is_error:
                w[r + L.R_ERRORS] += 1
            if slow:
                w[r + L.R_SLOW] += 1
            w[r + L.R_SUM_NS] = (w[r + L.R_SUM_NS] + duration) & MASK64
            w[r + L.R_MAX_NS] = max(w[r + L.R_MAX_NS], duration)
            if duration < w[r + L.R_MIN_NS] or w[r + L.R_COUNT] == 1:
                w[r + L.R_MIN_NS] = duration
            w[r + L.R_BYTES_IN] = (w[r + L.R_BYTES_IN] + bytes_in) & MASK64
            w[r + L.R_BYTES_OUT] = (w[r + L.R_BYTES_OUT] + bytes_out) & MASK64
            w[r + L.R_TTFB_SUM_NS] = (w[r + L.R_TTFB_SUM_NS] + ttfb_ns) & MASK64
            w[r + L.R_STATUS_CLASSES + (status // 100 if 100 <= status < 600 else 0)] += 1
            if error_kind:
                w[r + L.R_ERROR_KINDS + error_kind] += 1
            w[g + self._hists + route_id * L.HIST_BUCKETS + L.bucket_index(duration)] += 1
            self._dirty[route_id] = 1

            capacity = w[c + L.C_RING_CAPACITY]
            if capacity == 0 or capacity > self._ring_capacity:
                capacity = self._ring_capacity
            slot = w[g + L.G_RING_CURSOR]
            if slot >= capacity:
                slot = 0
            index = w[g + L.G_NEXT_INDEX]
            rec = self._ring + slot * L.RECORD_WORDS
            w[rec + L.REC_SEQ] = (2 * index + 1) & MASK64
            w[rec + L.REC_WALL_NS] = (end_ns + self._mono_offset_ns) & MASK64
            w[rec + L.REC_DURATION_NS] = duration
            w[rec + L.REC_BYTES_IN] = bytes_in
            w[rec + L.REC_BYTES_OUT] = bytes_out
            w[rec + L.REC_TTFB_NS] = ttfb_ns
            w[rec + L.REC_PACKED] = L.pack_record_word(
                route_id, status, error_kind, (L.FLAG_SLOW if slow else 0) | (L.FLAG_ERROR if is_error else 0)
            )
            w[rec + L.REC_SEQ] = (2 * index + 2) & MASK64
            w[g + L.G_RING_CURSOR] = slot + 1
            w[g + L.G_NEXT_INDEX] = index + 1
            w[g + L.G_CONSECUTIVE_ERRORS] = 0

            if timed:
                spent = time.monotonic_ns() - t0
                w[g + L.G_OVERHEAD_COUNT] += 1
                w[g + L.G_OVERHEAD_SUM_NS] = (w[g + L.G_OVERHEAD_SUM_NS] + spent) & MASK64
                w[g + L.G_OVERHEAD_MAX_NS] = max(w[g + L.G_OVERHEAD_MAX_NS], spent)
                w[g + L.OVERHEAD_HIST + L.bucket_index(spent)] += 1
                self._dirty[self._slots] = 1
        finally:
            # Even if a signal's exception interrupts the update, the counter
            # must end even: that request may stay half-applied, nothing more.
            w[g + L.G_SEQ] = seq + 2

        if w[c + L.C_PUBLISH_REQUEST] != self._publish_ack:
            self._publish()
        return slow and bool(w[c + L.C_LOG_SLOW])

    def _count(self, word: int) -> None:
        if self._nested:
            self._pending.append((self._count, (word,)))
            return
        w = self._words
        g = self._live
        seq = w[g + L.G_SEQ]  # type: ignore[index]
        w[g + L.G_SEQ] = seq + 1  # type: ignore[index]
        try:
            w[g + word] += 1  # type: ignore[index]
        finally:
            w[g + L.G_SEQ] = seq + 2  # type: ignore[index]
        if w[self._ctl + L.C_PUBLISH_REQUEST] != self._publish_ack:  # type: ignore[index]
            self._publish()

    def _publish(self) -> None:
        """Copy what changed since the last copy into the published area."""
        w = self._words
        buf: Any = w.obj  # type: ignore[union-attr]
        live = self._live * L.WORD
        pub = self._pub * L.WORD
        request = w[self._ctl + L.C_PUBLISH_REQUEST]  # type: ignore[index]
        seq = w[self._pub + L.G_SEQ]  # type: ignore[index]
        w[self._pub + L.G_SEQ] = seq + 1  # type: ignore[index]
        try:
            start, end = L.WORD, L.GLOBAL_WORDS * L.WORD
            buf[pub + start : pub + end] = buf[live + start : live + end]
            dirty = self._dirty
            if dirty[self._slots]:
                start, end = end, end + L.HIST_BUCKETS * L.WORD
                buf[pub + start : pub + end] = buf[live + start : live + end]
                dirty[self._slots] = 0
            for route_id in range(self._slots):
                if dirty[route_id]:
                    for start, size in (
                        (L.ROUTE_HEADERS_START + route_id * L.ROUTE_HEADER_WORDS, L.ROUTE_HEADER_WORDS),
                        (self._hists + route_id * L.HIST_BUCKETS, L.HIST_BUCKETS),
                    ):
                        start, end = start * L.WORD, (start + size) * L.WORD
                        buf[pub + start : pub + end] = buf[live + start : live + end]
                    dirty[route_id] = 0
            w[self._pub + L.G_PUBLISH_ACK] = request  # type: ignore[index]
            self._publish_ack = request
        finally:
            w[self._pub + L.G_SEQ] = seq + 2  # type: ignore[index]

    # -- errors -------------------------------------------------------------

    def internal_error(self, exc: BaseException) -> None:
        """Count an error inside netprof (a hook's, say); auto-disable after too
        many in a row. Re-raises ``exc`` when graceful degradation is off."""
        with self._lock:
            if self._busy:  # a signal handler's (see record): counted after the update
                self._pending.append((self._count_error_later, (exc,)))
                w = self._words
                if w is not None and not w[self._ctl + L.C_GRACEFUL]:
                    raise exc
                return
            self._busy = True
            try:
                self._internal_error(exc)
            finally:
                self._busy = False
            if self._pending:
                self._run_pending()

    def _internal_error(self, exc: BaseException) -> None:
        w = self._words
        if w is None:
            return
        c = self._ctl
        g = self._live
        disable = False
        seq = w[g + L.G_SEQ]
        w[g + L.G_SEQ] = seq + 1
        try:
            w[g + L.G_INTERNAL_ERRORS] += 1
            if w[c + L.C_RESET_ERRORS_REQUEST] != w[g + L.G_RESET_ACK]:
                w[g + L.G_RESET_ACK] = w[c + L.C_RESET_ERRORS_REQUEST]
                w[g + L.G_CONSECUTIVE_ERRORS] = 0
            w[g + L.G_CONSECUTIVE_ERRORS] += 1
            disable = bool(
                w[g + L.G_CONSECUTIVE_ERRORS] > L.MAX_CONSECUTIVE_ERRORS
                and w[c + L.C_AUTO_DISABLE_ON_ERROR]
                and not w[c + L.C_AUTO_DISABLED]
            )
            if disable:
                w[g + L.G_AUTO_DISABLE_EVENTS] += 1
        finally:
            w[g + L.G_SEQ] = seq + 2
        if disable:
            w[c + L.C_AUTO_DISABLED] = 1
        if w[c + L.C_PUBLISH_REQUEST] != self._publish_ack:
            self._publish()
        if not w[c + L.C_GRACEFUL]:
            raise exc

    def _log_slow(self, route_id: int, duration_ns: int, status: int, now_ns: int) -> None:
        if now_ns - self._last_slow_log_ns < L.SLOW_LOG_INTERVAL_NS:
            self._slow_suppressed += 1
            return
        suppressed, self._slow_suppressed = self._slow_suppressed, 0
        self._last_slow_log_ns = now_ns
        self._on_slow(route_id, duration_ns, status, suppressed)  # type: ignore[misc]


# -- bucket arithmetic for readers (histograms summed over processes) ----------
# The counts, read as one little-endian integer, are 64-bit lanes: adding two
# such integers adds every bucket at once, at C speed, when no lane can carry
# into the next. Sums over processes never wrap: an addition that would pass
# 2**64 - 1 is refused (a wrapped counter goes backwards), as a subtraction
# below zero is.


def add_counts(into: array[int], values: array[int] | memoryview) -> bool:
    """``into[i] += values[i]`` for every i (two u64 arrays of one length), if
    no count would pass 2**64 - 1; else leaves ``into`` unchanged and returns False."""
    if len(into) != len(values):
        raise ValueError(f"cannot add {len(values)} counts to {len(into)}")
    if max(into, default=0) + max(values, default=0) > MASK64 and any(
        a + b > MASK64 for a, b in zip(into, values)
    ):
        return False
    total = int.from_bytes(into.tobytes(), "little") + int.from_bytes(values.tobytes(), "little")
    into[:] = array("Q", total.to_bytes(8 * len(into), "little"))
    return True


def subtract_counts(into: array[int], values: array[int] | memoryview) -> bool:
    """``into[i] -= values[i]`` for every i, if no count would go below zero;
    else leaves ``into`` unchanged and returns False."""
    if len(into) != len(values):
        raise ValueError(f"cannot subtract {len(values)} counts from {len(into)}")
    if any(a < b for a, b in zip(into, values)):
        return False
    rest = int.from_bytes(into.tobytes(), "little") - int.from_bytes(values.tobytes(), "little")
    into[:] = array("Q", rest.to_bytes(8 * len(into), "little"))
    return True


# -- packed words: the twins of _recorder_c's (same bytes, same errors) -------
# Format (little-endian): u32 n, u32 0, the n nonzero values (u64), then
# their n indexes (u16) within the packed range.

PACKED_MAX_WORDS = 65536
_PACKED_HEAD = struct.Struct("<II")


def pack_words(source: object, start: int, count: int) -> bytes:
    """The nonzero words of ``source[start:start + count]`` (``source``: any
    buffer of u64 words, from word 0), packed."""
    if start < 0 or not 0 <= count <= PACKED_MAX_WORDS:
        raise ValueError(f"cannot pack {count} words from word {start}")
    raw = memoryview(source).cast("B")  # type: ignore[arg-type]
    if (start + count) * 8 > len(raw):
        raise ValueError(f"cannot pack {count} words from word {start} of {len(raw) // 8}")
    words = raw[start * 8 : (start + count) * 8].cast("Q").tolist()
    idx = array("H", compress(range(count), words))  # C-speed loops: most words are zero
    vals = array("Q", filter(None, words))
    return _PACKED_HEAD.pack(len(idx), 0) + vals.tobytes() + idx.tobytes()


def _unpack(packed: object, limit: int) -> tuple[array[int], array[int]]:
    data = memoryview(packed).cast("B")  # type: ignore[arg-type]
    if len(data) < 8:
        raise ValueError("not packed words: shorter than the header")
    n, zero = _PACKED_HEAD.unpack_from(data)
    if zero != 0 or len(data) != 8 + 10 * n:
        raise ValueError(f"not packed words: {len(data)} bytes for {n} words")
    vals, idx = array("Q"), array("H")
    vals.frombytes(data[8 : 8 + 8 * n])
    idx.frombytes(data[8 + 8 * n :])
    for i in idx:
        if i >= limit:
            raise ValueError(f"packed word index {i} out of range for {limit} counts")
    return idx, vals


def _words(packed: object, limit: int) -> dict[int, int]:
    """Packed words by index. Words packed elsewhere may repeat an index:
    its values are summed (ValueError if they add past 2**64 - 1)."""
    idx, vals = _unpack(packed, limit)
    if all(a < b for a, b in pairwise(idx)):  # as pack_words makes them
        return dict(zip(idx, vals))
    words: dict[int, int] = {}
    for i, v in zip(idx, vals):
        total = words[i] = words.get(i, 0) + v
        if total > MASK64:
            raise ValueError(f"not packed words: the values at index {i} add past 2**64 - 1")
    return {i: words[i] for i in sorted(words) if words[i]}  # ascending, as the C twin's


# Why a swap of packed words was refused (None: done), as the C twin names it.
REFUSALS = (None, "unsubtractable", "backwards", "overflow")


def _swap(into: Any, then: object, now: object, monotone: bool, exempt: int = -1) -> str | None:
    """``into -= then; into += now`` (packed words, None: none), every word
    checked first, in index order: None when done, else why it was refused,
    ``into`` unchanged: a word would go below zero ("unsubtractable": then was
    never added), or (``monotone``) is less now than then ("backwards"; the
    word at ``exempt`` may be), or would pass 2**64 - 1 ("overflow")."""
    limit = len(into)
    old = _words(then, limit) if then is not None else {}
    new = _words(now, limit) if now is not None else {}
    done = []
    for k in sorted(old.keys() | new.keys()) if old and new else (old or new):  # (each ascends)
        a, b, x = old.get(k, 0), new.get(k, 0), into[k]
        if x < a:
            return "unsubtractable"
        if monotone and b < a and k != exempt:
            return "backwards"
        if x - a + b > MASK64:
            return "overflow"
        done.append((k, x - a + b))
    for k, value in done:
        into[k] = value
    return None


def add_packed(into: array[int], packed: object) -> bool:
    """``into[i] += v`` for each packed word (``into``: a writable u64 array),
    if no count would pass 2**64 - 1; else leaves ``into`` unchanged and
    returns False."""
    return _swap(into, None, packed, False) is None


def subtract_packed(into: array[int], packed: object) -> bool:
    """``into[i] -= v`` for each packed word, if no count would go below zero;
    else leaves ``into`` unchanged and returns False."""
    return _swap(into, packed, None, False) is None


def replace_packed(into: array[int], then: object, now: object, monotone: bool = True) -> str | None:
    """``into -= then; into += now`` (packed words; None: none), checked word
    by word first: None when done, else why it was refused ("unsubtractable":
    ``then`` was never added; "overflow": a word would pass 2**64 - 1;
    "backwards", when ``monotone``: a word is less in ``now`` than in
    ``then``), ``into`` unchanged."""
    return _swap(into, then, now, monotone)


# -- route blocks kept packed, and their sums over processes -------------------
# What netprofd does for each process at every tick, in one call each: pack
# the blocks of the routes that moved, and swap them in the running sums.


class PackedBlock:
    """A route block (counters, then histogram buckets: see ``_layout``) as
    one snapshot read it, kept packed: its nonzero words only, a few hundred
    bytes where the block is 17 KB (most buckets of a route are empty)."""

    __slots__ = ("count", "max_ns", "packed")

    def __init__(self, count: int, max_ns: int, packed: bytes) -> None:
        if not isinstance(packed, bytes):  # as the C twin's typed attribute
            raise TypeError(f"packed must be bytes, not {type(packed).__name__}")
        if not (0 <= count <= MASK64 and 0 <= max_ns <= MASK64):
            raise OverflowError("count and max_ns are u64")
        self.count = count
        self.max_ns = max_ns
        self.packed = packed

    @classmethod
    def read(cls, words: object, start: int) -> PackedBlock:
        """The block at word ``start`` of ``words`` (any buffer of u64 words)."""
        if start < 0:
            raise ValueError(f"no route block at word {start}")
        raw = memoryview(words).cast("B")  # type: ignore[arg-type]
        if (start + L.ROUTE_BLOCK_WORDS) * 8 > len(raw):
            raise ValueError(f"no route block at word {start} of {len(raw) // 8}")
        block = raw[start * 8 : (start + L.ROUTE_BLOCK_WORDS) * 8].cast("Q")
        return _packed_block(block[: L.ROUTE_HEADER_WORDS], block[L.ROUTE_HEADER_WORDS :])

    def words(self) -> array[int]:
        """The whole block, unpacked (an array of u64)."""
        words = array("Q", bytes(L.ROUTE_BLOCK_WORDS * L.WORD))
        add_packed(words, self.packed)
        return words


def _packed_block(header: memoryview, histogram: memoryview) -> PackedBlock:
    """A route block from its header's and its histogram's u64 words."""
    return PackedBlock(
        header[L.R_COUNT],
        header[L.R_MAX_NS],
        pack_words(array("Q", header) + array("Q", histogram), 0, L.ROUTE_BLOCK_WORDS),
    )


def pack_blocks(
    words: object, route_slots: int, route_count: int, then: tuple[PackedBlock, ...]
) -> tuple[PackedBlock, ...]:
    """The first ``route_count`` route blocks of a statistics area of
    ``route_slots`` routes (``words``: any buffer of u64 words, from the
    area's first word, up to ``stats_prefix_words`` at least), packed: the
    block of ``then`` (an earlier reading, by route id) where the count has
    not moved, else the block read now. A block changes only with its count."""
    if not isinstance(then, tuple):
        raise TypeError(f"then must be a tuple, not {type(then).__name__}")
    if not 0 <= route_count <= route_slots:
        raise ValueError(f"cannot pack {route_count} route blocks of {route_slots}")
    raw = memoryview(words).cast("B")  # type: ignore[arg-type]
    histograms = L.route_histograms_start(route_slots)
    if (histograms + route_count * L.HIST_BUCKETS) * 8 > len(raw):
        raise ValueError(f"{route_count} route blocks do not fit in {len(raw) // 8} words")
    w = raw.cast("Q")
    out = []
    for r in range(route_count):
        header = L.ROUTE_HEADERS_START + r * L.ROUTE_HEADER_WORDS
        if r < len(then):
            old = then[r]
            if not isinstance(old, PackedBlock):
                raise TypeError(f"then[{r}] is not a PackedBlock")
            if old.count == w[header + L.R_COUNT]:
                out.append(old)
                continue
        histogram = histograms + r * L.HIST_BUCKETS
        out.append(
            _packed_block(
                w[header : header + L.ROUTE_HEADER_WORDS], w[histogram : histogram + L.HIST_BUCKETS]
            )
        )
    return tuple(out)


def replace_blocks(
    then: tuple[PackedBlock, ...], now: tuple[PackedBlock, ...], sums: Any
) -> tuple[int, str] | None:
    """Swap one process's route blocks ``then`` for ``now`` (PackedBlocks by
    route id; a missing one counts as empty) in ``sums`` (by route id, objects
    with ``words``, a u64 array of a route block, and ``max_ns``): for each
    route whose count moved, its block then is subtracted and its block now
    added; the maximum only grows. All or nothing: None when done, else
    ``(route id, why)`` and ``sums`` unchanged, when a route's block then was
    never added ("unsubtractable"), a word would pass 2**64 - 1 ("overflow"),
    or a word of a route that has both blocks is less now than then
    ("backwards": a counter of one writer going down; its minimum may)."""
    if not isinstance(then, tuple) or not isinstance(now, tuple):
        raise TypeError("then and now must be tuples")
    n = max(len(then), len(now))
    if len(sums) < n:
        raise ValueError(f"{len(sums)} route sums for {n} routes")
    for r in range(n):
        refused = _swap_blocks(then, now, sums, r, undo=False)
        if refused is not None:
            for back in range(r - 1, -1, -1):  # undo, as it was done: it cannot be refused
                if _swap_blocks(now, then, sums, back, undo=True) is not None:
                    raise SystemError("replace_blocks: undoing a swap was refused")
            return r, refused
    for r in range(min(n, len(now))):
        new = now[r]
        if new is not None and new.max_ns > sums[r].max_ns:
            sums[r].max_ns = new.max_ns
    return None


def _swap_blocks(
    then: tuple[PackedBlock, ...], now: tuple[PackedBlock, ...], sums: Any, r: int, *, undo: bool
) -> str | None:
    """replace_blocks for route ``r``. ``undo``: ``then`` and ``now`` swapped
    back, not checked for counters going backwards."""
    old = then[r] if r < len(then) else None
    new = now[r] if r < len(now) else None
    for block in (old, new):
        if block is not None and not isinstance(block, PackedBlock):
            raise TypeError(f"route {r}: not a PackedBlock")
    if old is new or (old is not None and new is not None and old.count == new.count):
        return None
    return _swap(
        sums[r].words,
        old.packed if old is not None else None,
        new.packed if new is not None else None,
        old is not None and new is not None and not undo,
        L.R_MIN_NS,
    )


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ValueError(f"truncated while being read: {len(data)} of {size} bytes at {offset}")
    return data


def read_blocks(
    fd: int, offset: int, route_slots: int, route_count: int, then: tuple[PackedBlock, ...]
) -> tuple[PackedBlock, ...]:
    """What ``pack_blocks`` gives for the statistics area of ``route_slots``
    routes at byte ``offset`` of the file ``fd``, reading only what it
    needs: the routes' counters (side by side: one read), then, for a route
    whose count moved since ``then``, its histogram from the bucket of its
    minimum to the bucket of its maximum (the others are empty: each
    duration counted lies between the two). Consistent only between two
    equal reads of the sequence counter, as any read of the area. ValueError
    if the file is shorter."""
    if not isinstance(then, tuple):
        raise TypeError(f"then must be a tuple, not {type(then).__name__}")
    if offset < 0 or not 0 <= route_count <= route_slots:
        raise ValueError(f"cannot read {route_count} route blocks of {route_slots} at {offset}")
    header_bytes = L.ROUTE_HEADER_WORDS * L.WORD
    headers = _pread_exact(fd, route_count * header_bytes, offset + L.ROUTE_HEADERS_START * L.WORD)
    histograms = offset + L.route_histograms_start(route_slots) * L.WORD
    out = []
    for r in range(route_count):
        old = then[r] if r < len(then) else None
        if old is not None and not isinstance(old, PackedBlock):
            raise TypeError(f"then[{r}] is not a PackedBlock")
        data = headers[r * header_bytes : (r + 1) * header_bytes]
        count, max_ns, min_ns = (
            L.U64.unpack_from(data, word * L.WORD)[0] for word in (L.R_COUNT, L.R_MAX_NS, L.R_MIN_NS)
        )
        if old is not None and old.count == count:
            out.append(old)
            continue
        # No record, no bucket: a route never used (the overflow route, mostly) is its counters.
        top = L.ROUTE_HEADER_WORDS
        if count:
            top += L.bucket_index(max_ns) + 1
            low = L.ROUTE_HEADER_WORDS + L.bucket_index(min_ns)
            if low >= top:  # a minimum above the maximum: not read whole, so not trusted
                low = L.ROUTE_HEADER_WORDS
            data += bytes((low - L.ROUTE_HEADER_WORDS) * L.WORD)
            data += _pread_exact(
                fd,
                (top - low) * L.WORD,
                histograms + (r * L.HIST_BUCKETS + low - L.ROUTE_HEADER_WORDS) * L.WORD,
            )
        out.append(PackedBlock(count, max_ns, pack_words(data, 0, top)))
    return tuple(out)


_GLOBALS = struct.Struct(f"<{L.GLOBAL_WORDS}Q")
# The overhead histogram's buckets read with the global words, in one read:
# up to 2**12 ns (a record's own cost is well under that); more when needed.
OVERHEAD_HEAD_BUCKETS = 256


def read_live(
    fd: int,
    offset: int,
    seq: int,
    route_slots: int,
    route_count: int,
    then: tuple[PackedBlock, ...],
    overhead_count_then: int | None = None,
) -> tuple[tuple[int, ...], tuple[PackedBlock, ...], bytes | None] | None:
    """The global words (a tuple), the route blocks (``read_blocks``) and the
    overhead histogram, packed (None when its count is still
    ``overhead_count_then``), of the statistics area at byte ``offset`` of
    the file ``fd`` (an area of ``route_slots`` routes), if its sequence
    counter, ``seq`` when read before (even), is still ``seq`` after reading
    them; else None. The overhead histogram is read up to the bucket of its
    maximum."""
    if not 0 <= seq <= MASK64:
        raise OverflowError("seq is u64")
    if overhead_count_then is not None and not 0 <= overhead_count_then <= MASK64:
        raise OverflowError("overhead_count_then is u64")
    head = _pread_exact(fd, (L.GLOBAL_WORDS + OVERHEAD_HEAD_BUCKETS) * L.WORD, offset)
    globals_ = _GLOBALS.unpack_from(head)
    overhead = None
    if overhead_count_then is None or globals_[L.G_OVERHEAD_COUNT] != overhead_count_then:
        buckets = L.bucket_index(globals_[L.G_OVERHEAD_MAX_NS]) + 1
        have = min(buckets, OVERHEAD_HEAD_BUCKETS)
        words = head[_GLOBALS.size : _GLOBALS.size + have * L.WORD]
        if buckets > have:
            words += _pread_exact(fd, (buckets - have) * L.WORD, offset + (L.OVERHEAD_HIST + have) * L.WORD)
        overhead = pack_words(words, 0, buckets)
    blocks = read_blocks(fd, offset, route_slots, route_count, then)
    if L.U64.unpack(_pread_exact(fd, L.WORD, offset + L.G_SEQ * L.WORD))[0] != seq:
        return None
    return globals_, blocks, overhead


# -- opening a segment: what a reader does first, for each segment it finds ----


def open_segment(path: str, head_size: int) -> tuple[int, bool, int, bytes]:
    """Open the file at ``path`` to read and write it, else (no permission
    to write) to read it, without blocking (a FIFO named like a segment must
    not hang the caller), without following a symlink (one named like a
    segment must not lead the reader to another file), close-on-exec, and
    read its first ``head_size``
    bytes: ``(fd, writable, size, head)``, ``size`` -1 (and ``head`` empty)
    if it is not a regular file, ``head`` shorter if the file is. OSError if
    it cannot be opened or read (then nothing is left open)."""
    if not 0 <= head_size <= 65536:
        raise ValueError(f"cannot read a head of {head_size} bytes")
    flags = os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd, writable = os.open(path, os.O_RDWR | flags), True
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        fd, writable = os.open(path, os.O_RDONLY | flags), False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return fd, writable, -1, b""
        return fd, writable, info.st_size, os.pread(fd, head_size, 0)
    except OSError as exc:  # named by its path, as the C twin's
        os.close(fd)
        raise OSError(exc.errno, exc.strerror, path) from None
    except BaseException:
        os.close(fd)
        raise


# -- liveness of a writer: what the daemon asks of each idle process per tick --


def proc_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (/proc), None if
    it is gone or a zombie (it has ended; only its exit status waits)."""
    if not 0 <= pid < 2**63:
        return None
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name may hold spaces and parentheses: fields follow the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


# The writer holds a read lock on its whole segment file for as long as it
# has the file open: an open file description lock (F_OFD_*), which belongs
# to the open file, not to the process, so neither a reader in the writer's
# own process nor a forked child that closes its copy can drop it, and the
# kernel drops it when the writer ends, however it ends.
FLOCK_STRUCT = struct.Struct("hhqqi")  # struct flock (64-bit offsets), natively aligned
_WRITE_LOCK_PROBE = FLOCK_STRUCT.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
_OFD_GETLK: int | None = getattr(fcntl, "F_OFD_GETLK", None)  # Linux only


def segment_locked(fd: int) -> bool:
    """True if some open file holds a lock on the segment open at ``fd``
    (then its writer is alive); False if none does, or if the file system
    cannot tell (then ask /proc: see ``segment.process_alive``)."""
    if _OFD_GETLK is None:
        return False
    try:
        found = fcntl.fcntl(fd, _OFD_GETLK, _WRITE_LOCK_PROBE)
    except OSError:
        return False
    return FLOCK_STRUCT.unpack(found)[0] != fcntl.F_UNLCK


# -- objects the daemon makes for every process it reads -----------------------


def new_frozen(cls: Any, names: tuple[str, ...], values: tuple[Any, ...]) -> Any:
    """An instance of ``cls`` made by ``object.__new__``, with each attribute
    of ``names`` set to the value at its position by ``object.__setattr__``
    (what the ``__init__`` of a frozen dataclass without defaults to fill or
    ``__post_init__`` does, in one call: the daemon makes a few of them per
    process that it reads)."""
    if not isinstance(names, tuple) or not isinstance(values, tuple):
        raise TypeError("names and values must be tuples")
    if len(values) != len(names):
        raise ValueError(f"{len(values)} values for {len(names)} attributes")
    obj = object.__new__(cls)
    for name, value in zip(names, values):
        object.__setattr__(obj, name, value)
    return obj
