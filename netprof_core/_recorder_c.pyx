# cython: language_level=3, embedsignature=True, boundscheck=False, wraparound=False, cdivision=True
"""The Cython recorder core: the twin of ``_recorder_py.py``.

Both apply the same updates, in the same order, to the segment described in
``_layout``; a test proves they leave byte-identical segments. Keep them in step.

A good record runs without calling Python code, so it cannot release the GIL
midway: threads of one process never interleave inside an update, and no lock
is needed. (Python code runs only outside the updates: building the error of
a bad call, and the slow-request callback.)
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from cpython.long cimport PyLong_Check

from netprof_core._cdefs cimport np_bit_length, np_monotonic_ns, np_release_fence

from netprof_core import _layout as L

# The layout is defined once, in _layout; these are its values as C globals.
cdef Py_ssize_t WORD = L.WORD
cdef Py_ssize_t ROUTE_COUNT_WORD = L.ROUTE_COUNT_WORD
cdef Py_ssize_t C_ENABLED = L.C_ENABLED
cdef Py_ssize_t C_FEATURE_FLAG = L.C_FEATURE_FLAG
cdef Py_ssize_t C_AUTO_DISABLED = L.C_AUTO_DISABLED
cdef Py_ssize_t C_LOG_SLOW = L.C_LOG_SLOW
cdef Py_ssize_t C_PERF_MONITORING = L.C_PERF_MONITORING
cdef Py_ssize_t C_AUTO_DISABLE_ON_ERROR = L.C_AUTO_DISABLE_ON_ERROR
cdef Py_ssize_t C_GRACEFUL = L.C_GRACEFUL
cdef Py_ssize_t C_SAMPLE_THRESHOLD = L.C_SAMPLE_THRESHOLD
cdef Py_ssize_t C_SLOW_NS = L.C_SLOW_NS
cdef Py_ssize_t C_RING_CAPACITY = L.C_RING_CAPACITY
cdef Py_ssize_t C_PUBLISH_REQUEST = L.C_PUBLISH_REQUEST
cdef Py_ssize_t C_RESET_ERRORS_REQUEST = L.C_RESET_ERRORS_REQUEST
cdef uint64_t SAMPLE_ALL = L.SAMPLE_ALL
cdef Py_ssize_t G_SEQ = L.G_SEQ
cdef Py_ssize_t G_SAMPLED_OUT = L.G_SAMPLED_OUT
cdef Py_ssize_t G_DISABLED_CALLS = L.G_DISABLED_CALLS
cdef Py_ssize_t G_INTERNAL_ERRORS = L.G_INTERNAL_ERRORS
cdef Py_ssize_t G_AUTO_DISABLE_EVENTS = L.G_AUTO_DISABLE_EVENTS
cdef Py_ssize_t G_NEXT_INDEX = L.G_NEXT_INDEX
cdef Py_ssize_t G_RING_CURSOR = L.G_RING_CURSOR
cdef Py_ssize_t G_OVERHEAD_COUNT = L.G_OVERHEAD_COUNT
cdef Py_ssize_t G_OVERHEAD_SUM_NS = L.G_OVERHEAD_SUM_NS
cdef Py_ssize_t G_OVERHEAD_MAX_NS = L.G_OVERHEAD_MAX_NS
cdef Py_ssize_t G_PUBLISH_ACK = L.G_PUBLISH_ACK
cdef Py_ssize_t G_CONSECUTIVE_ERRORS = L.G_CONSECUTIVE_ERRORS
cdef Py_ssize_t G_RESET_ACK = L.G_RESET_ACK
cdef Py_ssize_t GLOBAL_WORDS = L.GLOBAL_WORDS
cdef Py_ssize_t OVERHEAD_HIST = L.OVERHEAD_HIST
cdef Py_ssize_t R_COUNT = L.R_COUNT
cdef Py_ssize_t R_ERRORS = L.R_ERRORS
cdef Py_ssize_t R_SLOW = L.R_SLOW
cdef Py_ssize_t R_SUM_NS = L.R_SUM_NS
cdef Py_ssize_t R_MAX_NS = L.R_MAX_NS
cdef Py_ssize_t R_BYTES_IN = L.R_BYTES_IN
cdef Py_ssize_t R_BYTES_OUT = L.R_BYTES_OUT
cdef Py_ssize_t R_TTFB_SUM_NS = L.R_TTFB_SUM_NS
cdef Py_ssize_t R_STATUS_CLASSES = L.R_STATUS_CLASSES
cdef Py_ssize_t R_ERROR_KINDS = L.R_ERROR_KINDS
cdef Py_ssize_t ROUTE_HEADER_WORDS = L.ROUTE_HEADER_WORDS
cdef Py_ssize_t ROUTE_BLOCK_WORDS = L.ROUTE_BLOCK_WORDS
cdef Py_ssize_t ROUTES_START = L.ROUTES_START
cdef uint64_t ERROR_KINDS = L.ERROR_KINDS
cdef Py_ssize_t RECORD_WORDS = L.RECORD_WORDS
cdef Py_ssize_t REC_SEQ = L.REC_SEQ
cdef Py_ssize_t REC_WALL_NS = L.REC_WALL_NS
cdef Py_ssize_t REC_DURATION_NS = L.REC_DURATION_NS
cdef Py_ssize_t REC_BYTES_IN = L.REC_BYTES_IN
cdef Py_ssize_t REC_BYTES_OUT = L.REC_BYTES_OUT
cdef Py_ssize_t REC_TTFB_NS = L.REC_TTFB_NS
cdef Py_ssize_t REC_PACKED = L.REC_PACKED
cdef uint64_t FLAG_SLOW = L.FLAG_SLOW
cdef uint64_t FLAG_ERROR = L.FLAG_ERROR
cdef int HIST_SUB_BITS = L.HIST_SUB_BITS
cdef int HIST_LINEAR_BITS = L.HIST_LINEAR_BITS
cdef int HIST_MAX_BITS = L.HIST_MAX_BITS
cdef uint64_t HIST_LINEAR_BUCKETS = L.HIST_LINEAR_BUCKETS
cdef uint64_t HIST_BUCKETS = L.HIST_BUCKETS

cdef uint64_t MAX_CONSECUTIVE_ERRORS = L.MAX_CONSECUTIVE_ERRORS
cdef uint64_t OVERHEAD_SAMPLE_MASK = L.OVERHEAD_SAMPLE_MASK
cdef int64_t SLOW_LOG_INTERVAL_NS = L.SLOW_LOG_INTERVAL_NS

from netprof_core._recorder_py import invalid_arguments


cdef inline uint64_t bucket_index(uint64_t duration_ns) noexcept nogil:
    cdef int top
    if duration_ns < (<uint64_t>1 << HIST_LINEAR_BITS):
        return duration_ns >> HIST_SUB_BITS
    top = np_bit_length(duration_ns) - 1
    if top >= HIST_MAX_BITS:
        return HIST_BUCKETS - 1
    return (HIST_LINEAR_BUCKETS
            + (<uint64_t>(top - HIST_LINEAR_BITS) << HIST_SUB_BITS)
            + ((duration_ns >> (top - HIST_SUB_BITS)) & ((<uint64_t>1 << HIST_SUB_BITS) - 1)))


cdef class RecorderCore:
    """Applies one request to a segment; see the Python twin for the contract."""

    def __cinit__(self):
        self._has_view = False
        self._w = NULL

    def __init__(self, buf, layout, uint64_t seed, on_slow=None):
        self._slots = layout.route_slots
        self._ctl = L.CONTROL_OFFSET // WORD
        self._live = layout.live_offset // WORD
        self._pub = layout.published_offset // WORD
        self._ring = layout.ring_offset // WORD
        self._ring_capacity = layout.ring_capacity
        self._on_slow = on_slow
        self.rebind(buf, seed)

    def rebind(self, buf, uint64_t seed):
        """Write into another segment of the same layout (a forked child's)."""
        self.release()
        PyObject_GetBuffer(buf, &self._view, PyBUF_WRITABLE)
        self._has_view = True
        self._w = <uint64_t*>self._view.buf
        self._mono_offset_ns = L.read_header_field(buf, "mono_offset_ns")
        self._rng = seed
        self._calls = 0
        self._publish_ack = 0
        self._dirty = bytearray(self._slots + 1)
        self._last_slow_log_ns = -SLOW_LOG_INTERVAL_NS
        self._slow_suppressed = 0

    def release(self):
        """Stop writing; record() becomes a no-op."""
        self._w = NULL
        if self._has_view:
            PyBuffer_Release(&self._view)
            self._has_view = False

    def reset_lock(self):
        """Nothing to reset: this core holds no lock."""

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)

    def record(self, route_id, status, start_ns, end_ns, bytes_in=0, bytes_out=0, error_kind=0, ttfb_ns=0):
        cdef uint64_t* w = self._w
        if w == NULL:
            return
        cdef uint64_t* c = w + self._ctl
        cdef uint64_t x
        if not c[C_ENABLED] or not c[C_FEATURE_FLAG] or c[C_AUTO_DISABLED]:
            self._count(G_DISABLED_CALLS)
            return
        cdef uint64_t threshold = c[C_SAMPLE_THRESHOLD]
        if threshold < SAMPLE_ALL:
            x = self._rng
            x ^= x >> 12
            x ^= x << 25
            x ^= x >> 27
            self._rng = x
            if (x * <uint64_t>0x2545F4914F6CDD1D) >> 32 >= threshold:
                self._count(G_SAMPLED_OUT)
                return
        cdef bint timed = c[C_PERF_MONITORING] != 0 and (self._calls & OVERHEAD_SAMPLE_MASK) == 0
        self._calls += 1
        cdef int64_t t0 = np_monotonic_ns() if timed else 0
        cdef uint64_t rid, st, bi, bo, ek, tt
        cdef int64_t s, e
        # Ints only (an IntEnum is one): Cython's conversion alone would take floats.
        cdef bint valid = (PyLong_Check(route_id) and PyLong_Check(status) and PyLong_Check(start_ns)
                           and PyLong_Check(end_ns) and PyLong_Check(bytes_in) and PyLong_Check(bytes_out)
                           and PyLong_Check(error_kind) and PyLong_Check(ttfb_ns))
        if valid:
            try:  # one try for all: it costs a few ns, the conversions less
                rid = route_id
                st = status
                s = start_ns
                e = end_ns
                bi = bytes_in
                bo = bytes_out
                ek = error_kind
                tt = ttfb_ns
            except OverflowError:
                valid = False
        # The route count is shared memory: trust it no further than the layout.
        if not (valid and rid < w[ROUTE_COUNT_WORD] and rid < self._slots and st <= 0xFFFF
                and 0 <= s <= e and ek < ERROR_KINDS):
            self._internal_error(invalid_arguments(
                c[C_GRACEFUL] != 0, (route_id, status, start_ns, end_ns, bytes_in, bytes_out, error_kind, ttfb_ns)
            ))
            return
        if self._apply(rid, st, s, e, bi, bo, ek, tt, timed, t0) and self._on_slow is not None:
            self._log_slow(rid, <uint64_t>(e - s), st, e)

    cdef bint _apply(self, uint64_t route_id, uint64_t status, int64_t start_ns, int64_t end_ns,
                     uint64_t bytes_in, uint64_t bytes_out, uint64_t error_kind, uint64_t ttfb_ns,
                     bint timed, int64_t t0):
        cdef uint64_t* w = self._w
        cdef uint64_t* c = w + self._ctl
        cdef uint64_t* g = w + self._live
        cdef uint64_t spent
        cdef uint64_t duration = <uint64_t>(end_ns - start_ns)
        cdef bint is_error = error_kind != 0 or status >= 500
        cdef bint slow = duration >= c[C_SLOW_NS]

        g[G_SEQ] += 1
        np_release_fence()
        cdef uint64_t* r = g + ROUTES_START + route_id * ROUTE_BLOCK_WORDS
        r[R_COUNT] += 1
        if is_error:
            r[R_ERRORS] += 1
        if slow:
            r[R_SLOW] += 1
        r[R_SUM_NS] += duration
        if duration > r[R_MAX_NS]:
            r[R_MAX_NS] = duration
        r[R_BYTES_IN] += bytes_in
        r[R_BYTES_OUT] += bytes_out
        r[R_TTFB_SUM_NS] += ttfb_ns
        r[R_STATUS_CLASSES + (status // 100 if 100 <= status < 600 else 0)] += 1
        if error_kind:
            r[R_ERROR_KINDS + error_kind] += 1
        r[ROUTE_HEADER_WORDS + bucket_index(duration)] += 1
        (<unsigned char*>self._dirty)[route_id] = 1

        cdef uint64_t capacity = c[C_RING_CAPACITY]
        if capacity == 0 or capacity > self._ring_capacity:
            capacity = self._ring_capacity
        cdef uint64_t slot = g[G_RING_CURSOR]
        if slot >= capacity:
            slot = 0
        cdef uint64_t index = g[G_NEXT_INDEX]
        cdef uint64_t* rec = w + self._ring + slot * RECORD_WORDS
        rec[REC_SEQ] = 2 * index + 1
        np_release_fence()
        rec[REC_WALL_NS] = <uint64_t>end_ns + <uint64_t>self._mono_offset_ns  # wraps, as the twin masks
        rec[REC_DURATION_NS] = duration
        rec[REC_BYTES_IN] = bytes_in
        rec[REC_BYTES_OUT] = bytes_out
        rec[REC_TTFB_NS] = ttfb_ns
        rec[REC_PACKED] = (route_id | status << 32 | error_kind << 48
                           | ((FLAG_SLOW if slow else 0) | (FLAG_ERROR if is_error else 0)) << 56)
        np_release_fence()
        rec[REC_SEQ] = 2 * index + 2
        g[G_RING_CURSOR] = slot + 1
        g[G_NEXT_INDEX] = index + 1
        g[G_CONSECUTIVE_ERRORS] = 0

        if timed:
            spent = <uint64_t>(np_monotonic_ns() - t0)
            g[G_OVERHEAD_COUNT] += 1
            g[G_OVERHEAD_SUM_NS] += spent
            if spent > g[G_OVERHEAD_MAX_NS]:
                g[G_OVERHEAD_MAX_NS] = spent
            g[OVERHEAD_HIST + bucket_index(spent)] += 1
            (<unsigned char*>self._dirty)[self._slots] = 1
        np_release_fence()
        g[G_SEQ] += 1

        if c[C_PUBLISH_REQUEST] != self._publish_ack:
            self._publish()
        return slow and c[C_LOG_SLOW] != 0

    cdef void _count(self, Py_ssize_t word):
        cdef uint64_t* w = self._w
        cdef uint64_t* g = w + self._live
        g[G_SEQ] += 1
        np_release_fence()
        g[word] += 1
        np_release_fence()
        g[G_SEQ] += 1
        if w[self._ctl + C_PUBLISH_REQUEST] != self._publish_ack:
            self._publish()

    cdef void _publish(self):
        """Copy what changed since the last copy into the published area."""
        cdef uint64_t* live = self._w + self._live
        cdef uint64_t* pub = self._w + self._pub
        cdef unsigned char* dirty = <unsigned char*>self._dirty
        cdef uint64_t route_id
        cdef Py_ssize_t start
        # The request answered is the one seen before copying, as in the twin:
        # a request made during the copy gets a copy of its own.
        cdef uint64_t request = self._w[self._ctl + C_PUBLISH_REQUEST]
        pub[G_SEQ] += 1
        np_release_fence()
        memcpy(pub + 1, live + 1, (GLOBAL_WORDS - 1) * WORD)
        if dirty[self._slots]:
            memcpy(pub + OVERHEAD_HIST, live + OVERHEAD_HIST, HIST_BUCKETS * WORD)
            dirty[self._slots] = 0
        for route_id in range(self._slots):
            if dirty[route_id]:
                start = ROUTES_START + route_id * ROUTE_BLOCK_WORDS
                memcpy(pub + start, live + start, ROUTE_BLOCK_WORDS * WORD)
                dirty[route_id] = 0
        self._publish_ack = request
        pub[G_PUBLISH_ACK] = request
        np_release_fence()
        pub[G_SEQ] += 1

    def internal_error(self, exc):
        """Count an error inside netprof (a hook's, say); auto-disable after too
        many in a row. Re-raises ``exc`` when graceful degradation is off."""
        self._internal_error(exc)

    cdef _internal_error(self, exc):
        cdef uint64_t* w = self._w
        if w == NULL:
            return
        cdef uint64_t* c = w + self._ctl
        cdef uint64_t* g = w + self._live
        g[G_SEQ] += 1
        np_release_fence()
        g[G_INTERNAL_ERRORS] += 1
        if c[C_RESET_ERRORS_REQUEST] != g[G_RESET_ACK]:
            g[G_RESET_ACK] = c[C_RESET_ERRORS_REQUEST]
            g[G_CONSECUTIVE_ERRORS] = 0
        g[G_CONSECUTIVE_ERRORS] += 1
        cdef bint disable = (g[G_CONSECUTIVE_ERRORS] > MAX_CONSECUTIVE_ERRORS
                             and c[C_AUTO_DISABLE_ON_ERROR] != 0 and c[C_AUTO_DISABLED] == 0)
        if disable:
            g[G_AUTO_DISABLE_EVENTS] += 1
        np_release_fence()
        g[G_SEQ] += 1
        if disable:
            c[C_AUTO_DISABLED] = 1
        if c[C_PUBLISH_REQUEST] != self._publish_ack:
            self._publish()
        if not c[C_GRACEFUL]:
            raise exc

    cdef _log_slow(self, uint64_t route_id, uint64_t duration_ns, uint64_t status, int64_t now_ns):
        if now_ns - self._last_slow_log_ns < SLOW_LOG_INTERVAL_NS:
            self._slow_suppressed += 1
            return
        cdef uint64_t suppressed = self._slow_suppressed
        self._slow_suppressed = 0
        self._last_slow_log_ns = now_ns
        self._on_slow(route_id, duration_ns, status, suppressed)


cdef class EmptyRecorder:
    """A record() that does nothing, with the same arguments: the benchmarks' floor."""

    def record(self, route_id, status, start_ns, end_ns, bytes_in=0, bytes_out=0, error_kind=0, ttfb_ns=0):
        pass


# -- bucket arithmetic for readers: the twins of _recorder_py's ----------------


def add_counts(uint64_t[::1] into not None, const uint64_t[::1] values not None) -> None:
    """``into[i] += values[i]`` for every i (two u64 arrays of one length)."""
    cdef Py_ssize_t i, n = into.shape[0]
    if values.shape[0] != n:
        raise ValueError(f"cannot add {values.shape[0]} counts to {n}")
    for i in range(n):
        into[i] += values[i]


def subtract_counts(uint64_t[::1] into not None, const uint64_t[::1] values not None) -> bool:
    """``into[i] -= values[i]`` for every i, if no count would go below zero;
    else leaves ``into`` unchanged and returns False."""
    cdef Py_ssize_t i, n = into.shape[0]
    if values.shape[0] != n:
        raise ValueError(f"cannot subtract {values.shape[0]} counts from {n}")
    for i in range(n):
        if into[i] < values[i]:
            return False
    for i in range(n):
        into[i] -= values[i]
    return True


# -- packed words: the nonzero words of a route block or histogram ------------
# A kept route block is mostly zero buckets: readers keep the nonzero words
# only. Format (little-endian): u32 n, u32 0, the n values (u64), then their
# n indexes (u16) within the packed range. The twins build identical bytes.

cdef Py_ssize_t PACKED_MAX_WORDS = 65536


def pack_words(source, Py_ssize_t start, Py_ssize_t count) -> bytes:
    """The nonzero words of ``source[start:start + count]`` (``source``: any
    buffer of u64 words, from word 0), packed."""
    cdef Py_buffer view
    cdef const uint64_t* w
    cdef Py_ssize_t i, k, n = 0
    cdef uint64_t* vals
    cdef uint16_t* idx
    cdef uint64_t v
    cdef bytes out
    cdef char* p
    cdef uint32_t head[2]
    if start < 0 or not 0 <= count <= PACKED_MAX_WORDS:
        raise ValueError(f"cannot pack {count} words from word {start}")
    PyObject_GetBuffer(source, &view, PyBUF_SIMPLE)
    vals = NULL
    try:
        if (start + count) * 8 > view.len:
            raise ValueError(f"cannot pack {count} words from word {start} of {view.len // 8}")
        w = <const uint64_t*>(<const char*>view.buf + start * 8)
        vals = <uint64_t*>PyMem_Malloc(count * 10 + 16)
        if vals == NULL:
            raise MemoryError()
        idx = <uint16_t*>(vals + count + 1)
        i = 0
        while i < count:
            # Zero runs (most of a histogram) four words at a time; within
            # the others no branch on the data: a word is written, and kept
            # if it is nonzero (the pattern is too irregular to predict).
            if i + 4 <= count and not (w[i] | w[i + 1] | w[i + 2] | w[i + 3]):
                i += 4
                continue
            k = i + 4 if i + 4 <= count else count
            while i < k:
                v = w[i]
                vals[n] = v
                idx[n] = <uint16_t>i
                n += v != 0
                i += 1
        out = PyBytes_FromStringAndSize(NULL, 8 + 10 * n)
        p = PyBytes_AS_STRING(out)
        head[0] = <uint32_t>n
        head[1] = 0
        memcpy(p, head, 8)
        memcpy(p + 8, vals, 8 * n)
        memcpy(p + 8 + 8 * n, idx, 2 * n)
        return out
    finally:
        PyMem_Free(vals)
        PyBuffer_Release(&view)


cdef Py_ssize_t _packed_count(const Py_buffer* packed, Py_ssize_t limit) except -1:
    """The number of packed words, after checking the format and that every
    index is below ``limit``."""
    cdef uint32_t head[2]
    cdef Py_ssize_t i, n
    cdef const uint16_t* idx
    if packed.len < 8:
        raise ValueError("not packed words: shorter than the header")
    memcpy(head, packed.buf, 8)
    n = head[0]
    if head[1] != 0 or packed.len != 8 + 10 * n:
        raise ValueError(f"not packed words: {packed.len} bytes for {n} words")
    idx = <const uint16_t*>(<const char*>packed.buf + 8 + 8 * n)
    for i in range(n):
        if idx[i] >= limit:
            raise ValueError(f"packed word index {idx[i]} out of range for {limit} counts")
    return n


cdef int _apply_packed(into, packed, bint subtract) except -1:
    """``into[i] += / -= value`` for each packed word; 0 when a subtraction
    would go below zero (``into`` unchanged), else 1."""
    cdef Py_buffer dst, src
    cdef Py_ssize_t i, n
    cdef uint64_t* w
    cdef const uint16_t* idx
    cdef const char* vals
    cdef uint64_t v
    PyObject_GetBuffer(into, &dst, PyBUF_WRITABLE)
    try:
        PyObject_GetBuffer(packed, &src, PyBUF_SIMPLE)
        try:
            n = _packed_count(&src, dst.len // 8)
            w = <uint64_t*>dst.buf
            vals = <const char*>src.buf + 8
            idx = <const uint16_t*>(vals + 8 * n)
            if subtract:
                for i in range(n):
                    memcpy(&v, vals + 8 * i, 8)
                    if w[idx[i]] < v:
                        return 0
                for i in range(n):
                    memcpy(&v, vals + 8 * i, 8)
                    w[idx[i]] -= v
            else:
                for i in range(n):
                    memcpy(&v, vals + 8 * i, 8)
                    w[idx[i]] += v
            return 1
        finally:
            PyBuffer_Release(&src)
    finally:
        PyBuffer_Release(&dst)


def add_packed(into, packed) -> None:
    """``into[i] += v`` for each packed word (``into``: a writable u64 array)."""
    _apply_packed(into, packed, False)


def subtract_packed(into, packed) -> bool:
    """``into[i] -= v`` for each packed word, if no count would go below zero;
    else leaves ``into`` unchanged and returns False."""
    return _apply_packed(into, packed, True) == 1
