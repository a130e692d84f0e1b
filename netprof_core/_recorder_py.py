"""The pure-Python recorder core: the twin of ``_recorder_c.pyx``.

Both apply the same updates, in the same order, to the segment described in
``_layout``; a test proves they leave byte-identical segments. Keep them in step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from . import _layout as L

MASK64 = (1 << 64) - 1
# Time one record in this many when performance monitoring is on.
OVERHEAD_SAMPLE_MASK = 63
MAX_CONSECUTIVE_ERRORS = 3
SLOW_LOG_INTERVAL_NS = 1_000_000_000

SlowCallback = Callable[[int, int, int, int], None]


def seed_for(pid: int, created_ns: int) -> int:
    """The sampling generator's seed; never 0, which xorshift cannot leave."""
    return ((pid << 32) ^ created_ns ^ 0x9E3779B97F4A7C15) & MASK64 or 1


class RecorderCore:
    """Applies one request to a segment.

    Thread-safe through a lock (the Cython core relies on the GIL instead);
    never blocked by a reader. ``on_slow(route_id, duration_ns, status,
    suppressed)`` is called, outside the update, for slow requests when slow
    logging is on, at most once a second.
    """

    def __init__(self, buf: object, layout: L.SegmentLayout, seed: int, on_slow: SlowCallback | None = None) -> None:
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
        self.release()
        self._words = memoryview(buf).cast("Q")  # type: ignore[arg-type]
        self._mono_offset_ns = L.read_header_field(buf, "mono_offset_ns")
        self._rng = seed
        self._calls = 0
        self._dirty = bytearray(self._slots + 1)  # route blocks, then the overhead histogram
        self._last_slow_log_ns = -SLOW_LOG_INTERVAL_NS
        self._slow_suppressed = 0

    def release(self) -> None:
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
        g = self._live
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
        if not (
            isinstance(route_id, int)
            and isinstance(status, int)
            and isinstance(start_ns, int)
            and isinstance(end_ns, int)
            and isinstance(bytes_in, int)
            and isinstance(bytes_out, int)
            and isinstance(error_kind, int)
            and isinstance(ttfb_ns, int)
            and 0 <= route_id < w[L.ROUTE_COUNT_WORD]
            and 0 <= status <= 0xFFFF
            and 0 <= start_ns <= end_ns <= 0x7FFFFFFFFFFFFFFF
            and 0 <= bytes_in <= MASK64
            and 0 <= bytes_out <= MASK64
            and 0 <= error_kind < L.ERROR_KINDS
            and 0 <= ttfb_ns <= MASK64
        ):
            self._internal_error(
                ValueError(
                    "netprof: record() takes non-negative ints within range and end_ns >= start_ns; got "
                    f"{(route_id, status, start_ns, end_ns, bytes_in, bytes_out, error_kind, ttfb_ns)!r}"
                )
            )
            return False
        timed = w[c + L.C_PERF_MONITORING] and not self._calls & OVERHEAD_SAMPLE_MASK
        self._calls += 1
        if timed:
            t0 = time.monotonic_ns()
        duration = end_ns - start_ns
        is_error = error_kind != 0 or status >= 500
        slow = duration >= w[c + L.C_SLOW_NS]

        w[g + L.G_SEQ] += 1
        r = g + self._layout.route_block(route_id)
        w[r + L.R_COUNT] += 1
        if is_error:
            w[r + L.R_ERRORS] += 1
        if slow:
            w[r + L.R_SLOW] += 1
        w[r + L.R_SUM_NS] = (w[r + L.R_SUM_NS] + duration) & MASK64
        if duration > w[r + L.R_MAX_NS]:
            w[r + L.R_MAX_NS] = duration
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

        if timed:
            spent = time.monotonic_ns() - t0
            w[g + L.G_OVERHEAD_COUNT] += 1
            w[g + L.G_OVERHEAD_SUM_NS] = (w[g + L.G_OVERHEAD_SUM_NS] + spent) & MASK64
            if spent > w[g + L.G_OVERHEAD_MAX_NS]:
                w[g + L.G_OVERHEAD_MAX_NS] = spent
            w[g + L.OVERHEAD_HIST + L.bucket_index(spent)] += 1
            self._dirty[self._slots] = 1
        w[g + L.G_SEQ] += 1

        if w[c + L.C_CONSECUTIVE_ERRORS]:
            w[c + L.C_CONSECUTIVE_ERRORS] = 0
        if w[c + L.C_PUBLISH_REQUEST] != w[self._pub + L.G_PUBLISH_ACK]:
            self._publish()
        return slow and bool(w[c + L.C_LOG_SLOW])

    def _count(self, word: int) -> None:
        w = self._words
        g = self._live
        w[g + L.G_SEQ] += 1
        w[g + word] += 1
        w[g + L.G_SEQ] += 1
        if w[self._ctl + L.C_PUBLISH_REQUEST] != w[self._pub + L.G_PUBLISH_ACK]:
            self._publish()

    def _publish(self) -> None:
        """Copy what changed since the last copy into the published area."""
        w = self._words
        buf = w.obj  # type: ignore[union-attr]
        live = self._live * L.WORD
        pub = self._pub * L.WORD
        w[self._pub + L.G_SEQ] += 1
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
                start = self._layout.route_block(route_id) * L.WORD
                buf[pub + start : pub + start + block] = buf[live + start : live + start + block]
                dirty[route_id] = 0
        w[self._pub + L.G_PUBLISH_ACK] = w[self._ctl + L.C_PUBLISH_REQUEST]
        w[self._pub + L.G_SEQ] += 1

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
        self._count(L.G_INTERNAL_ERRORS)
        errors = w[c + L.C_CONSECUTIVE_ERRORS] + 1
        w[c + L.C_CONSECUTIVE_ERRORS] = errors
        if errors > MAX_CONSECUTIVE_ERRORS and w[c + L.C_AUTO_DISABLE_ON_ERROR] and not w[c + L.C_AUTO_DISABLED]:
            w[c + L.C_AUTO_DISABLED] = 1
            self._count(L.G_AUTO_DISABLE_EVENTS)
        if not w[c + L.C_GRACEFUL]:
            raise exc

    def _log_slow(self, route_id: int, duration_ns: int, status: int, now_ns: int) -> None:
        if now_ns - self._last_slow_log_ns < SLOW_LOG_INTERVAL_NS:
            self._slow_suppressed += 1
            return
        suppressed, self._slow_suppressed = self._slow_suppressed, 0
        self._last_slow_log_ns = now_ns
        self._on_slow(route_id, duration_ns, status, suppressed)  # type: ignore[misc]
