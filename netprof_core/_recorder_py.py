"""The pure-Python recorder core: the twin of ``_recorder_c.pyx``.

Both apply the same updates, in the same order, to the segment described in
``_layout``; a test proves they leave byte-identical segments. Keep them in step.
"""

from __future__ import annotations

import struct
import threading
import time
from array import array
from collections.abc import Callable
from itertools import compress
from typing import Any

from . import _layout as L

MASK64 = (1 << 64) - 1

SlowCallback = Callable[[int, int, int, int], None]


def invalid_arguments(graceful: bool, args: tuple[object, ...]) -> ValueError:
    """The error for a bad record() call. Its message shows the values only
    when it will be raised: a repr can be costly, or raise itself."""
    message = "netprof: record() takes non-negative ints within range, a route id from route_id() and end_ns >= start_ns"
    if graceful:
        return ValueError(f"{message}; got types {tuple(type(arg).__name__ for arg in args)}")
    try:
        return ValueError(f"{message}; got {args!r}")
    except Exception:
        return ValueError(message)


class RecorderCore:
    """Applies one request to a segment.

    Thread-safe through a lock (the Cython core relies on the GIL instead);
    never blocked by a reader. ``on_slow(route_id, duration_ns, status,
    suppressed)`` is called, outside the update, for slow requests when slow
    logging is on, at most once a second.
    """

    def __init__(
        self, buf: object, layout: L.SegmentLayout, seed: int, on_slow: SlowCallback | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._layout = layout
        self._slots = layout.route_slots
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
            self._release()

    def _release(self) -> None:
        if self._words is not None:
            self._words.release()
            self._words = None

    def reset_lock(self) -> None:
        """In a forked child: the parent's lock may have been held by a thread
        that does not exist here."""
        self._lock = threading.Lock()

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
            slow = self._record(route_id, status, start_ns, end_ns, bytes_in, bytes_out, error_kind, ttfb_ns)
        if slow and self._on_slow is not None:
            self._log_slow(route_id, end_ns - start_ns, status, end_ns)

    def _record(
        self,
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
        if not w[c + L.C_ENABLED] or not w[c + L.C_FEATURE_FLAG] or w[c + L.C_AUTO_DISABLED]:
            self._count(L.G_DISABLED_CALLS)
            return False
        threshold = w[c + L.C_SAMPLE_THRESHOLD]
        if threshold < L.SAMPLE_ALL:
            x = self._rng
            x ^= x >> 12
            x ^= (x << 25) & MASK64
            x ^= x >> 27
            self._rng = x
            if ((x * 0x2545F4914F6CDD1D) & MASK64) >> 32 >= threshold:
                self._count(L.G_SAMPLED_OUT)
                return False
        timed = w[c + L.C_PERF_MONITORING] and not self._calls & L.OVERHEAD_SAMPLE_MASK
        self._calls += 1
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
            r = g + L.ROUTES_START + route_id * L.ROUTE_BLOCK_WORDS
            w[r + L.R_COUNT] += 1
            if is_error:
                w[r + L.R_ERRORS] += 1
            if slow:
                w[r + L.R_SLOW] += 1
            w[r + L.R_SUM_NS] = (w[r + L.R_SUM_NS] + duration) & MASK64
            w[r + L.R_MAX_NS] = max(w[r + L.R_MAX_NS], duration)
            w[r + L.R_BYTES_IN] = (w[r + L.R_BYTES_IN] + bytes_in) & MASK64
            w[r + L.R_BYTES_OUT] = (w[r + L.R_BYTES_OUT] + bytes_out) & MASK64
            w[r + L.R_TTFB_SUM_NS] = (w[r + L.R_TTFB_SUM_NS] + ttfb_ns) & MASK64
            w[r + L.R_STATUS_CLASSES + (status // 100 if 100 <= status < 600 else 0)] += 1
            if error_kind:
                w[r + L.R_ERROR_KINDS + error_kind] += 1
            w[r + L.ROUTE_HEADER_WORDS + L.bucket_index(duration)] += 1
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
            block = L.ROUTE_BLOCK_WORDS * L.WORD
            for route_id in range(self._slots):
                if dirty[route_id]:
                    start = (L.ROUTES_START + route_id * L.ROUTE_BLOCK_WORDS) * L.WORD
                    buf[pub + start : pub + start + block] = buf[live + start : live + start + block]
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
            self._internal_error(exc)

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
# such integers adds every bucket at once, at C speed (no count comes near
# 2**64, so no carry crosses lanes).


def add_counts(into: array[int], values: array[int] | memoryview) -> None:
    """``into[i] += values[i]`` for every i (two u64 arrays of one length)."""
    if len(into) != len(values):
        raise ValueError(f"cannot add {len(values)} counts to {len(into)}")
    total = int.from_bytes(into.tobytes(), "little") + int.from_bytes(values.tobytes(), "little")
    into[:] = array("Q", total.to_bytes(8 * len(into), "little"))


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


def add_packed(into: array[int], packed: object) -> None:
    """``into[i] += v`` for each packed word (``into``: a writable u64 array;
    wraps at 2**64 as the C twin does)."""
    for i, v in zip(*_unpack(packed, len(into))):
        into[i] = (into[i] + v) & MASK64


def subtract_packed(into: array[int], packed: object) -> bool:
    """``into[i] -= v`` for each packed word, if no count would go below zero;
    else leaves ``into`` unchanged and returns False."""
    idx, vals = _unpack(packed, len(into))
    if any(into[i] < v for i, v in zip(idx, vals)):
        return False
    for i, v in zip(idx, vals):
        into[i] -= v
    return True
