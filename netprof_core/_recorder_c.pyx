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
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.stdint cimport UINT64_MAX, int64_t, uint16_t, uint32_t, uint64_t
from libc.errno cimport EINTR, errno
from libc cimport errno as libc_errno
from libc.string cimport memcpy, memset
from posix.types cimport off_t
from posix.fcntl cimport F_UNLCK, F_WRLCK, O_CLOEXEC, O_NONBLOCK, O_RDONLY, O_RDWR, SEEK_SET
from posix.stat cimport S_ISREG, fstat as c_fstat, struct_stat
from libc.errno cimport EACCES, EPERM, EROFS
from posix.fcntl cimport fcntl as c_fcntl, flock as c_flock
from posix.fcntl cimport open as c_open
from posix.unistd cimport close as c_close
from posix.unistd cimport pread
from posix.unistd cimport read as c_read
from libc.stdio cimport snprintf
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno, PyErr_SetFromErrnoWithFilenameObject

from cpython.long cimport PyLong_Check

from netprof_core._cdefs cimport O_NOFOLLOW, np_bit_length, np_monotonic_ns, np_release_fence

import os
from array import array as _array

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
cdef Py_ssize_t R_MIN_NS = L.R_MIN_NS
cdef Py_ssize_t ROUTE_HEADER_WORDS = L.ROUTE_HEADER_WORDS
cdef Py_ssize_t ROUTE_BLOCK_WORDS = L.ROUTE_BLOCK_WORDS
cdef Py_ssize_t ROUTE_HEADERS_START = L.ROUTE_HEADERS_START
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


cdef enum:
    ADMIT_RECORD = 1
    ADMIT_TIMED = 2


cdef class RecorderCore:
    """Applies one request to a segment; see the Python twin for the contract."""

    def __cinit__(self):
        self._has_view = False
        self._w = NULL

    def __init__(self, buf, layout, uint64_t seed, on_slow=None):
        self._slots = layout.route_slots
        self._hists = layout.route_histograms_start
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
        if self._w == NULL:
            return
        cdef int admitted = _admit(self)
        if admitted:
            self._record_objects(admitted, route_id, status, start_ns, end_ns, bytes_in, bytes_out, error_kind,
                                 ttfb_ns)

    cpdef int admit(self) noexcept:
        """Whether to record the request that starts now: 0 when not (recording
        is off, or the request is sampled out; counted as such), else a token
        for ``record_admitted`` when it ends. A hook that asks first leaves a
        request it will not record alone, at the cost of this call."""
        return _admit(self) if self._w != NULL else 0

    def record_admitted(self, admitted, route_id, status, start_ns, end_ns, bytes_in=0, bytes_out=0,
                        error_kind=0, ttfb_ns=0):
        """``record`` for a request that ``admit`` let in when it started:
        ``admitted`` is what it returned (anything false records nothing)."""
        if self._w != NULL and admitted:
            self._record_objects(ADMIT_TIMED if admitted == ADMIT_TIMED else ADMIT_RECORD, route_id, status,
                                 start_ns, end_ns, bytes_in, bytes_out, error_kind, ttfb_ns)

    cdef _record_objects(self, int admitted, route_id, status, start_ns, end_ns, bytes_in, bytes_out,
                         error_kind, ttfb_ns):
        cdef int64_t t0 = np_monotonic_ns() if admitted == ADMIT_TIMED else 0
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
        if not (valid and _in_range(self, rid, st, s, e, ek)):
            self._reject((route_id, status, start_ns, end_ns, bytes_in, bytes_out, error_kind, ttfb_ns))
            return
        if self._apply(rid, st, s, e, bi, bo, ek, tt, admitted == ADMIT_TIMED, t0) and self._on_slow is not None:
            self._log_slow(rid, <uint64_t>(e - s), st, e)

    cpdef record_ints(self, Py_ssize_t route_id, Py_ssize_t status, int64_t start_ns, int64_t end_ns,
                      int64_t bytes_in, int64_t bytes_out, Py_ssize_t error_kind, int64_t ttfb_ns):
        """``record`` for the compiled hooks, which hold their numbers as C
        integers: called from C, nothing is boxed and no argument parsed."""
        if self._w == NULL:
            return
        cdef int admitted = _admit(self)
        if admitted:
            self.record_admitted_ints(admitted, route_id, status, start_ns, end_ns, bytes_in, bytes_out,
                                      error_kind, ttfb_ns)

    cpdef record_admitted_ints(self, int admitted, Py_ssize_t route_id, Py_ssize_t status, int64_t start_ns,
                               int64_t end_ns, int64_t bytes_in, int64_t bytes_out, Py_ssize_t error_kind,
                               int64_t ttfb_ns):
        """``record_admitted`` with C integers, for the compiled hooks."""
        if self._w == NULL or not admitted:
            return
        cdef int64_t t0 = np_monotonic_ns() if admitted == ADMIT_TIMED else 0
        if not (route_id >= 0 and status >= 0 and bytes_in >= 0 and bytes_out >= 0 and error_kind >= 0
                and ttfb_ns >= 0 and _in_range(self, route_id, status, start_ns, end_ns, error_kind)):
            self._reject((route_id, status, start_ns, end_ns, bytes_in, bytes_out, error_kind, ttfb_ns))
            return
        if (self._apply(route_id, status, start_ns, end_ns, bytes_in, bytes_out, error_kind, ttfb_ns,
                        admitted == ADMIT_TIMED, t0) and self._on_slow is not None):
            self._log_slow(route_id, <uint64_t>(end_ns - start_ns), status, end_ns)

    cdef _reject(self, tuple arguments):
        self._internal_error(invalid_arguments((self._w + self._ctl)[C_GRACEFUL] != 0, arguments))

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
        cdef uint64_t* r = g + ROUTE_HEADERS_START + route_id * ROUTE_HEADER_WORDS
        r[R_COUNT] += 1
        if is_error:
            r[R_ERRORS] += 1
        if slow:
            r[R_SLOW] += 1
        r[R_SUM_NS] += duration
        if duration > r[R_MAX_NS]:
            r[R_MAX_NS] = duration
        if duration < r[R_MIN_NS] or r[R_COUNT] == 1:
            r[R_MIN_NS] = duration
        r[R_BYTES_IN] += bytes_in
        r[R_BYTES_OUT] += bytes_out
        r[R_TTFB_SUM_NS] += ttfb_ns
        r[R_STATUS_CLASSES + (status // 100 if 100 <= status < 600 else 0)] += 1
        if error_kind:
            r[R_ERROR_KINDS + error_kind] += 1
        g[self._hists + route_id * HIST_BUCKETS + bucket_index(duration)] += 1
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
                start = ROUTE_HEADERS_START + route_id * ROUTE_HEADER_WORDS
                memcpy(pub + start, live + start, ROUTE_HEADER_WORDS * WORD)
                start = self._hists + route_id * HIST_BUCKETS
                memcpy(pub + start, live + start, HIST_BUCKETS * WORD)
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


cdef inline int _admit(RecorderCore self):
    """Whether to record this call: 0 not (disabled or sampled out, and
    counted as such), ADMIT_RECORD, or ADMIT_TIMED (record, and time the
    update for the overhead histogram)."""
    cdef uint64_t* w = self._w
    cdef uint64_t* c = w + self._ctl
    cdef uint64_t x
    if not c[C_ENABLED] or not c[C_FEATURE_FLAG] or c[C_AUTO_DISABLED]:
        self._count(G_DISABLED_CALLS)
        return 0
    cdef uint64_t threshold = c[C_SAMPLE_THRESHOLD]
    if threshold < SAMPLE_ALL:
        x = self._rng
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        self._rng = x
        if (x * <uint64_t>0x2545F4914F6CDD1D) >> 32 >= threshold:
            self._count(G_SAMPLED_OUT)
            return 0
    cdef bint timed = c[C_PERF_MONITORING] != 0 and (self._calls & OVERHEAD_SAMPLE_MASK) == 0
    self._calls += 1
    return ADMIT_TIMED if timed else ADMIT_RECORD

cdef inline bint _in_range(RecorderCore self, uint64_t rid, uint64_t st, int64_t s, int64_t e, uint64_t ek):
    # The route count is shared memory: trust it no further than the layout.
    cdef uint64_t* w = self._w
    return rid < w[ROUTE_COUNT_WORD] and rid < self._slots and st <= 0xFFFF and 0 <= s <= e and ek < ERROR_KINDS


cdef class EmptyRecorder:
    """A record() that does nothing, with the same arguments: the benchmarks' floor."""

    def record(self, route_id, status, start_ns, end_ns, bytes_in=0, bytes_out=0, error_kind=0, ttfb_ns=0):
        pass


# -- bucket arithmetic for readers: the twins of _recorder_py's ----------------
# Sums over processes never wrap: an addition that would carry past 2**64 - 1
# is refused (a wrapped counter goes backwards), as a subtraction below zero is.


def add_counts(uint64_t[::1] into not None, const uint64_t[::1] values not None) -> bool:
    """``into[i] += values[i]`` for every i (two u64 arrays of one length), if
    no count would pass 2**64 - 1; else leaves ``into`` unchanged and returns False."""
    cdef Py_ssize_t i, n = into.shape[0]
    if values.shape[0] != n:
        raise ValueError(f"cannot add {values.shape[0]} counts to {n}")
    for i in range(n):
        if into[i] > UINT64_MAX - values[i]:
            return False
    for i in range(n):
        into[i] += values[i]
    return True


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


# Where a block is packed before its exact-size bytes are made: the GIL is
# held throughout, so one buffer serves every call (no malloc per block).
cdef uint64_t _pack_vals[65536]
cdef uint16_t _pack_idx[65536]


cdef Py_ssize_t _gather(const uint64_t* w, Py_ssize_t i, Py_ssize_t end, Py_ssize_t n) noexcept:
    """Append the nonzero words of ``w[i:end]``, with their indexes, to the
    packing buffers, which hold ``n`` words; returns how many they hold then."""
    cdef Py_ssize_t j
    cdef uint64_t v
    while i + 8 <= end:
        # Zero runs (most of a histogram) eight words at a time; within the
        # others no branch on the data: a word is written, and kept if it is
        # nonzero (the pattern is too irregular to predict). A fixed count of
        # eight, which the compiler unrolls.
        if w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]:
            for j in range(8):
                v = w[i + j]
                _pack_vals[n] = v
                _pack_idx[n] = <uint16_t>(i + j)
                n += v != 0
        i += 8
    while i < end:
        v = w[i]
        _pack_vals[n] = v
        _pack_idx[n] = <uint16_t>i
        n += v != 0
        i += 1
    return n


cdef bytes _packed(Py_ssize_t n):
    """The ``n`` words in the packing buffers, as packed words."""
    cdef uint32_t head[2]
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 8 + 10 * n)
    cdef char* p = PyBytes_AS_STRING(out)
    head[0] = <uint32_t>n
    head[1] = 0
    memcpy(p, head, 8)
    memcpy(p + 8, _pack_vals, 8 * n)
    memcpy(p + 8 + 8 * n, _pack_idx, 2 * n)
    return out


cdef bytes _pack(const uint64_t* w, Py_ssize_t count):
    """The nonzero words of ``w[:count]`` (count <= PACKED_MAX_WORDS), packed."""
    return _packed(_gather(w, 0, count, 0))


def pack_words(source, Py_ssize_t start, Py_ssize_t count) -> bytes:
    """The nonzero words of ``source[start:start + count]`` (``source``: any
    buffer of u64 words, from word 0), packed."""
    cdef Py_buffer view
    if start < 0 or not 0 <= count <= PACKED_MAX_WORDS:
        raise ValueError(f"cannot pack {count} words from word {start}")
    PyObject_GetBuffer(source, &view, PyBUF_SIMPLE)
    try:
        if (start + count) * 8 > view.len:
            raise ValueError(f"cannot pack {count} words from word {start} of {view.len // 8}")
        return _pack(<const uint64_t*>(<const char*>view.buf + start * 8), count)
    finally:
        PyBuffer_Release(&view)


cdef Py_ssize_t _packed_count(const char* p, Py_ssize_t size, Py_ssize_t limit, bint* ascending) except -1:
    """The number of packed words in the ``size`` bytes at ``p``, after
    checking the format and that every index is below ``limit``; whether the
    indexes ascend, each once (as pack_words makes them)."""
    cdef uint32_t head[2]
    cdef Py_ssize_t i, n
    cdef const uint16_t* idx
    if size < 8:
        raise ValueError("not packed words: shorter than the header")
    memcpy(head, p, 8)
    n = head[0]
    if head[1] != 0 or size != 8 + 10 * n:
        raise ValueError(f"not packed words: {size} bytes for {n} words")
    idx = <const uint16_t*>(p + 8 + 8 * n)
    ascending[0] = True
    for i in range(n):
        if idx[i] >= limit:
            raise ValueError(f"packed word index {idx[i]} out of range for {limit} counts")
        if i and idx[i] <= idx[i - 1]:
            ascending[0] = False
    return n


# Why a swap of packed words was refused (0: done), and the names the
# Python twin gives them.
cdef enum:
    SWAP_DONE = 0
    SWAP_UNSUBTRACTABLE = 1
    SWAP_BACKWARDS = 2
    SWAP_OVERFLOW = 3

REFUSALS = (None, "unsubtractable", "backwards", "overflow")


cdef struct Words:
    # Packed words ready for _swap_ascending: values (unaligned) and their
    # ascending indexes; ``owned``: a buffer of ours to free.
    const char* vals
    const uint16_t* idx
    Py_ssize_t n
    void* owned


cdef int _words(Words* out, const char* p, Py_ssize_t size, Py_ssize_t limit, bint trusted) except -1:
    """Packed words as _swap_ascending takes them. ``trusted``: packed here
    (well-formed, ascending), so not checked again. Words packed elsewhere
    whose indexes do not ascend are summed by index into a buffer of ours
    (ValueError if one index's values add past 2**64 - 1)."""
    cdef bint ascending = True
    cdef Py_ssize_t i, m, n
    cdef uint64_t v
    cdef uint64_t* dense
    cdef char* buf
    out.owned = NULL
    if trusted:
        n = (size - 8) // 10
    else:
        n = _packed_count(p, size, limit, &ascending)
    out.vals = p + 8
    out.idx = <const uint16_t*>(p + 8 + 8 * n)
    out.n = n
    if ascending:
        return 0
    limit = min(limit, 65536)  # indexes are u16
    dense = <uint64_t*>PyMem_Calloc(limit, 8)
    if dense == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            memcpy(&v, out.vals + 8 * i, 8)
            if dense[out.idx[i]] > UINT64_MAX - v:
                raise ValueError(f"not packed words: the values at index {out.idx[i]} add past 2**64 - 1")
            dense[out.idx[i]] += v
        m = 0
        for i in range(limit):
            m += dense[i] != 0
        buf = <char*>PyMem_Malloc(max(m, 1) * 10)
        if buf == NULL:
            raise MemoryError()
        out.owned = buf
        out.vals = buf
        out.idx = <const uint16_t*>(buf + 8 * m)
        out.n = m
        m = 0
        for i in range(limit):
            if dense[i]:
                memcpy(buf + 8 * m, &dense[i], 8)
                (<uint16_t*>(buf + 8 * out.n))[m] = <uint16_t>i
                m += 1
    finally:
        PyMem_Free(dense)
    return 0


cdef int _swap_ascending(uint64_t* w, const Words* old, const Words* new, bint monotone,
                         Py_ssize_t exempt) noexcept:
    """``w -= old`` then ``w += new``, word by word in one walk through both
    (their indexes ascend), each word checked before it changes: refused,
    ``w`` unchanged, if a word would go below zero (old was never added),
    pass 2**64 - 1, or (``monotone``) be less in ``new`` than in ``old`` (a
    counter going backwards; the word at ``exempt`` may). Returns SWAP_*."""
    cdef Py_ssize_t i = 0, j = 0, step_i, step_j
    cdef uint16_t k
    cdef uint64_t a, b, x
    cdef int refused = SWAP_DONE
    while i < old.n or j < new.n:
        step_i, step_j = i, j
        a = b = 0
        if j >= new.n or (i < old.n and old.idx[i] <= new.idx[j]):
            k = old.idx[i]
            memcpy(&a, old.vals + 8 * i, 8)
            i += 1
            if j < new.n and new.idx[j] == k:
                memcpy(&b, new.vals + 8 * j, 8)
                j += 1
        else:
            k = new.idx[j]
            memcpy(&b, new.vals + 8 * j, 8)
            j += 1
        x = w[k]
        if x < a:
            refused = SWAP_UNSUBTRACTABLE
        elif monotone and b < a and k != exempt:
            refused = SWAP_BACKWARDS
        elif x - a > UINT64_MAX - b:
            refused = SWAP_OVERFLOW
        if refused:
            # Undo the words done (exact: none of them wrapped).
            while step_i > 0:
                step_i -= 1
                memcpy(&a, old.vals + 8 * step_i, 8)
                w[old.idx[step_i]] += a
            while step_j > 0:
                step_j -= 1
                memcpy(&b, new.vals + 8 * step_j, 8)
                w[new.idx[step_j]] -= b
            return refused
        w[k] = x - a + b
    return SWAP_DONE


cdef Words _NO_WORDS_VIEW  # no packed words (n = 0)


cdef int _swap(uint64_t* w, Py_ssize_t limit, const char* old, Py_ssize_t old_size, bint old_trusted,
               const char* new, Py_ssize_t new_size, bint new_trusted, bint monotone,
               Py_ssize_t exempt) except -1:
    """_swap_ascending of two packed words (NULL: none); SWAP_*."""
    cdef Words o = _NO_WORDS_VIEW, n = _NO_WORDS_VIEW
    try:
        if old != NULL:
            _words(&o, old, old_size, limit, old_trusted)
        if new != NULL:
            _words(&n, new, new_size, limit, new_trusted)
        return _swap_ascending(w, &o, &n, monotone, exempt)
    finally:
        PyMem_Free(o.owned)
        PyMem_Free(n.owned)


cdef int _apply_packed(into, old, new, bint monotone) except -1:
    """``into -= old; into += new`` (packed words, None: none) as _swap; SWAP_*."""
    cdef Py_buffer dst, o, n
    cdef bint has_o = False, has_n = False
    PyObject_GetBuffer(into, &dst, PyBUF_WRITABLE)
    try:
        if old is not None:
            PyObject_GetBuffer(old, &o, PyBUF_SIMPLE)
            has_o = True
        if new is not None:
            PyObject_GetBuffer(new, &n, PyBUF_SIMPLE)
            has_n = True
        return _swap(<uint64_t*>dst.buf, dst.len // 8,
                     <const char*>o.buf if has_o else NULL, o.len if has_o else 0, False,
                     <const char*>n.buf if has_n else NULL, n.len if has_n else 0, False,
                     monotone, -1)
    finally:
        if has_n:
            PyBuffer_Release(&n)
        if has_o:
            PyBuffer_Release(&o)
        PyBuffer_Release(&dst)


def add_packed(into, packed) -> bool:
    """``into[i] += v`` for each packed word (``into``: a writable u64 array),
    if no count would pass 2**64 - 1; else leaves ``into`` unchanged and
    returns False."""
    return _apply_packed(into, None, packed, False) == SWAP_DONE


def subtract_packed(into, packed) -> bool:
    """``into[i] -= v`` for each packed word, if no count would go below zero;
    else leaves ``into`` unchanged and returns False."""
    return _apply_packed(into, packed, None, False) == SWAP_DONE


def replace_packed(into, then, now, bint monotone=True):
    """``into -= then; into += now`` (packed words; None: none), checked word
    by word first: None when done, else why it was refused ("unsubtractable":
    ``then`` was never added; "overflow": a word would pass 2**64 - 1;
    "backwards", when ``monotone``: a word is less in ``now`` than in
    ``then``), ``into`` unchanged."""
    return REFUSALS[_apply_packed(into, then, now, monotone)]


# -- route blocks kept packed, and their sums over processes -------------------
# What netprofd does for each process at every tick, in one call each: pack
# the blocks of the routes that moved, and swap them in the running sums.


cdef class PackedBlock:
    """A route block (counters, then histogram buckets: see ``_layout``) as
    one snapshot read it, kept packed: its nonzero words only, a few hundred
    bytes where the block is 17 KB (most buckets of a route are empty)."""

    cdef readonly uint64_t count
    cdef readonly uint64_t max_ns
    cdef readonly bytes packed
    cdef bint _ours  # packed here: well-formed, its indexes ascend (not so when made from Python)

    def __init__(self, uint64_t count, uint64_t max_ns, bytes packed not None):
        self.count = count
        self.max_ns = max_ns
        self.packed = packed

    @classmethod
    def read(cls, words, Py_ssize_t start) -> PackedBlock:
        """The block at word ``start`` of ``words`` (any buffer of u64 words)."""
        cdef Py_buffer view
        cdef const uint64_t* w
        if start < 0:
            raise ValueError(f"no route block at word {start}")
        PyObject_GetBuffer(words, &view, PyBUF_SIMPLE)
        try:
            if (start + ROUTE_BLOCK_WORDS) * 8 > view.len:
                raise ValueError(f"no route block at word {start} of {view.len // 8}")
            w = <const uint64_t*>view.buf + start
            return _packed_block(w, w + ROUTE_HEADER_WORDS)
        finally:
            PyBuffer_Release(&view)

    def words(self):
        """The whole block, unpacked (an array of u64)."""
        words = _array("Q", bytes(ROUTE_BLOCK_WORDS * WORD))
        _apply_packed(words, None, self.packed, False)  # into zeros: cannot be refused
        return words


cdef PackedBlock _packed_block(const uint64_t* header, const uint64_t* histogram):
    """A route block from its header and its histogram, wherever they are."""
    cdef PackedBlock block = PackedBlock.__new__(PackedBlock)
    block.count = header[R_COUNT]
    block.max_ns = header[R_MAX_NS]
    # (The histogram's pointer is shifted so that its buckets get their indexes in the block.)
    block.packed = _packed(_gather(histogram - ROUTE_HEADER_WORDS, ROUTE_HEADER_WORDS, ROUTE_BLOCK_WORDS,
                                   _gather(header, 0, ROUTE_HEADER_WORDS, 0)))
    block._ours = True
    return block


def pack_blocks(words, Py_ssize_t route_slots, Py_ssize_t route_count, tuple then not None) -> tuple:
    """The first ``route_count`` route blocks of a statistics area of
    ``route_slots`` routes (``words``: any buffer of u64 words, from the
    area's first word, up to ``stats_prefix_words`` at least), packed: the
    block of ``then`` (an earlier reading, by route id) where the count has
    not moved, else the block read now. A block changes only with its count."""
    cdef Py_buffer view
    cdef const uint64_t* w
    cdef Py_ssize_t r, header, known = len(then), histograms = ROUTE_HEADERS_START + route_slots * ROUTE_HEADER_WORDS
    cdef PackedBlock old
    cdef list out
    if not 0 <= route_count <= route_slots:
        raise ValueError(f"cannot pack {route_count} route blocks of {route_slots}")
    PyObject_GetBuffer(words, &view, PyBUF_SIMPLE)
    try:
        if (histograms + route_count * <Py_ssize_t>HIST_BUCKETS) * 8 > view.len:
            raise ValueError(f"{route_count} route blocks do not fit in {view.len // 8} words")
        w = <const uint64_t*>view.buf
        out = [None] * route_count
        for r in range(route_count):
            header = ROUTE_HEADERS_START + r * ROUTE_HEADER_WORDS
            if r < known:
                old = <PackedBlock?>then[r]
                if old.count == w[header + R_COUNT]:
                    out[r] = old
                    continue
            out[r] = _packed_block(w + header, w + histograms + r * HIST_BUCKETS)
        return tuple(out)
    finally:
        PyBuffer_Release(&view)


def replace_blocks(tuple then not None, tuple now not None, sums not None):
    """Swap one process's route blocks ``then`` for ``now`` (PackedBlocks by
    route id; a missing one counts as empty) in ``sums`` (by route id, objects
    with ``words``, a u64 array of a route block, and ``max_ns``): for each
    route whose count moved, its block then is subtracted and its block now
    added; the maximum only grows. All or nothing: None when done, else
    ``(route id, why)`` and ``sums`` unchanged, when a route's block then was
    never added ("unsubtractable"), a word would pass 2**64 - 1 ("overflow"),
    or a word of a route that has both blocks is less now than then
    ("backwards": a counter of one writer going down; its minimum may)."""
    cdef Py_ssize_t r, back, n = max(len(then), len(now))
    cdef PackedBlock new
    cdef int refused
    if len(sums) < n:
        raise ValueError(f"{len(sums)} route sums for {n} routes")
    for r in range(n):
        refused = _swap_blocks(then, now, sums, r, False)
        if refused:
            for back in range(r - 1, -1, -1):  # undo, as it was done: it cannot be refused
                if _swap_blocks(now, then, sums, back, True):
                    raise SystemError("replace_blocks: undoing a swap was refused")
            return r, REFUSALS[refused]
    for r in range(min(n, len(now))):
        new = <PackedBlock?>now[r]
        if new is not None and new.max_ns > sums[r].max_ns:
            sums[r].max_ns = new.max_ns
    return None


cdef int _swap_blocks(tuple then, tuple now, sums, Py_ssize_t r, bint undo) except -1:
    """replace_blocks for route ``r``: SWAP_*. ``undo``: ``then`` and ``now``
    swapped back, not checked for counters going backwards."""
    cdef PackedBlock old = <PackedBlock?>then[r] if r < len(then) else None
    cdef PackedBlock new = <PackedBlock?>now[r] if r < len(now) else None
    cdef Py_buffer dst
    if old is new or (old is not None and new is not None and old.count == new.count):
        return SWAP_DONE
    target = sums[r]
    PyObject_GetBuffer(target.words, &dst, PyBUF_WRITABLE)
    try:
        return _swap(<uint64_t*>dst.buf, dst.len // 8,
                     PyBytes_AS_STRING(old.packed) if old is not None else NULL,
                     len(old.packed) if old is not None else 0,
                     old is not None and old._ours and dst.len // 8 >= ROUTE_BLOCK_WORDS,
                     PyBytes_AS_STRING(new.packed) if new is not None else NULL,
                     len(new.packed) if new is not None else 0,
                     new is not None and new._ours and dst.len // 8 >= ROUTE_BLOCK_WORDS,
                     old is not None and new is not None and not undo, R_MIN_NS)
    finally:
        PyBuffer_Release(&dst)


# Where read_blocks reads one route block (the GIL is held: one serves all).
cdef uint64_t _block_buf[4096]
cdef uint64_t _head_buf[4096]  # the global words and the head of the overhead histogram (read_live)
if ROUTE_BLOCK_WORDS > 4096:
    raise ImportError("a route block is larger than read_blocks' buffer")


cdef int _pread_exact(int fd, void* buf, Py_ssize_t size, Py_ssize_t offset) except -1:
    cdef ssize_t got
    while True:
        got = pread(fd, buf, <size_t>size, <off_t>offset)
        if got >= 0 or errno != EINTR:
            break
        PyErr_CheckSignals()  # as os.pread: a signal handler may raise
    if got < 0:
        PyErr_SetFromErrno(OSError)
        return -1
    if got != size:
        raise ValueError(f"truncated while being read: {got} of {size} bytes at {offset}")
    return 0


def read_blocks(int fd, Py_ssize_t offset, Py_ssize_t route_slots, Py_ssize_t route_count,
                tuple then not None) -> tuple:
    """What ``pack_blocks`` gives for the statistics area of ``route_slots``
    routes at byte ``offset`` of the file ``fd``, reading only what it
    needs: the routes' counters (side by side: one read), then, for a route
    whose count moved since ``then``, its histogram from the bucket of its
    minimum to the bucket of its maximum (the others are empty: each
    duration counted lies between the two). Consistent only between two
    equal reads of the sequence counter, as any read of the area. ValueError
    if the file is shorter."""
    cdef Py_ssize_t r, known = len(then)
    cdef Py_ssize_t histograms = offset + (ROUTE_HEADERS_START + route_slots * ROUTE_HEADER_WORDS) * WORD
    cdef uint64_t* headers
    cdef list out
    if offset < 0 or not 0 <= route_count <= route_slots:
        raise ValueError(f"cannot read {route_count} route blocks of {route_slots} at {offset}")
    out = [None] * route_count
    # This call's own buffer: objects made below may run a collection, and
    # finalizers that read segments too.
    headers = <uint64_t*>PyMem_Malloc(max(route_count, 1) * ROUTE_HEADER_WORDS * WORD)
    if headers == NULL:
        raise MemoryError()
    try:
        _pread_exact(fd, headers, route_count * ROUTE_HEADER_WORDS * WORD, offset + ROUTE_HEADERS_START * WORD)
        for r in range(route_count):
            _read_block(fd, histograms, r, headers + r * ROUTE_HEADER_WORDS, then, known, out)
    finally:
        PyMem_Free(headers)
    return tuple(out)


cdef int _read_block(int fd, Py_ssize_t histograms, Py_ssize_t r, const uint64_t* header, tuple then,
                     Py_ssize_t known, list out) except -1:
    """read_blocks for route ``r``, whose counters are at ``header``."""
    cdef Py_ssize_t low, top
    cdef uint64_t count = header[R_COUNT], max_ns
    cdef bytes packed
    cdef PackedBlock old, block
    old = <PackedBlock?>then[r] if r < known else None
    if old is not None and old.count == count:
        out[r] = old
        return 0
    max_ns = header[R_MAX_NS]
    # The block in _block_buf: the header, then the buckets read; those
    # below the minimum's were not read (they are empty) and are not packed.
    memcpy(_block_buf, header, ROUTE_HEADER_WORDS * WORD)
    top = low = ROUTE_HEADER_WORDS  # no record, no bucket: a route never used is its counters
    if count:
        top += <Py_ssize_t>bucket_index(max_ns) + 1
        low += <Py_ssize_t>bucket_index(header[R_MIN_NS])
        if low >= top:  # a minimum above the maximum: not read whole, so not trusted
            low = ROUTE_HEADER_WORDS
        _pread_exact(fd, _block_buf + low, (top - low) * WORD,
                     histograms + (r * HIST_BUCKETS + low - ROUTE_HEADER_WORDS) * WORD)
    # Everything taken from the shared buffers before an object is made
    # (making one may run a collection, and finalizers, that read too).
    packed = _packed(_gather(_block_buf, low, top, _gather(_block_buf, 0, ROUTE_HEADER_WORDS, 0)))
    block = PackedBlock.__new__(PackedBlock)
    block.count = count
    block.max_ns = max_ns
    block.packed = packed
    block._ours = True
    out[r] = block
    return 0


# The overhead histogram's buckets read with the global words, in one read:
# up to 2**12 ns (a record's own cost is well under that); more when needed.
cdef Py_ssize_t OVERHEAD_HEAD_BUCKETS = 256


def read_live(int fd, Py_ssize_t offset, uint64_t seq, Py_ssize_t route_slots, Py_ssize_t route_count,
              tuple then not None, overhead_count_then=None):
    """The global words (a tuple), the route blocks (``read_blocks``) and the
    overhead histogram, packed (None when its count is still
    ``overhead_count_then``), of the statistics area at byte ``offset`` of
    the file ``fd`` (an area of ``route_slots`` routes), if its sequence
    counter, ``seq`` when read before (even), is still ``seq`` after reading
    them; else None. The overhead histogram is read up to the bucket of its
    maximum."""
    cdef uint64_t g[16]  # the global words, this call's own (see below)
    cdef uint64_t after
    cdef Py_ssize_t i, buckets, have
    if GLOBAL_WORDS != 16:
        raise ValueError("the global words are not 16")
    _pread_exact(fd, _head_buf, (GLOBAL_WORDS + OVERHEAD_HEAD_BUCKETS) * WORD, offset)
    memcpy(g, _head_buf, GLOBAL_WORDS * WORD)
    # The shared buffer is done with before any object that the garbage
    # collector tracks is made (that may run finalizers that read segments
    # too); packing makes only bytes.
    overhead = None
    if overhead_count_then is None or g[G_OVERHEAD_COUNT] != <uint64_t>overhead_count_then:
        buckets = <Py_ssize_t>bucket_index(g[G_OVERHEAD_MAX_NS]) + 1
        have = min(buckets, OVERHEAD_HEAD_BUCKETS)
        if buckets > have:
            _pread_exact(fd, _head_buf + GLOBAL_WORDS + have, (buckets - have) * WORD,
                         offset + (OVERHEAD_HIST + have) * WORD)
        overhead = _pack(_head_buf + GLOBAL_WORDS, buckets)
    globals_ = tuple([g[i] for i in range(GLOBAL_WORDS)])
    blocks = read_blocks(fd, offset, route_slots, route_count, then)
    _pread_exact(fd, &after, WORD, offset + G_SEQ * WORD)
    if after != seq:
        return None
    return globals_, blocks, overhead


# -- opening a segment: what a reader does first, for each segment it finds ----

cdef char _head[65536]


def open_segment(path not None, Py_ssize_t head_size) -> tuple:
    """Open the file at ``path`` to read and write it, else (no permission
    to write) to read it, without blocking (a FIFO named like a segment must
    not hang the caller), without following a symlink (one named like a
    segment must not lead the reader to another file), close-on-exec, and
    read its first ``head_size``
    bytes: ``(fd, writable, size, head)``, ``size`` -1 (and ``head`` empty)
    if it is not a regular file, ``head`` shorter if the file is. OSError if
    it cannot be opened or read (then nothing is left open)."""
    # (str paths, the daemon's, encoded here: os.fsencode is Python code)
    cdef bytes encoded = PyUnicode_EncodeFSDefault(path) if type(path) is str else os.fsencode(path)
    cdef int fd, flags = O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW
    cdef bint writable = True
    cdef struct_stat info
    cdef ssize_t got
    if not 0 <= head_size <= <Py_ssize_t>sizeof(_head):
        raise ValueError(f"cannot read a head of {head_size} bytes")
    if b"\0" in encoded:
        raise ValueError("embedded null byte")  # as os.open says it
    fd = c_open(encoded, O_RDWR | flags)
    if fd < 0:
        if errno != EACCES and errno != EPERM and errno != EROFS:
            PyErr_SetFromErrnoWithFilenameObject(OSError, path)
            return None
        writable = False
        fd = c_open(encoded, O_RDONLY | flags)
        if fd < 0:
            PyErr_SetFromErrnoWithFilenameObject(OSError, path)
            return None
    if c_fstat(fd, &info) != 0:
        _close_keeping_errno(fd)
        PyErr_SetFromErrnoWithFilenameObject(OSError, path)
        return None
    if not S_ISREG(info.st_mode):
        return fd, writable, -1, b""
    while True:
        got = pread(fd, _head, <size_t>head_size, 0)
        if got >= 0 or errno != EINTR:
            break
    if got < 0:
        _close_keeping_errno(fd)
        PyErr_SetFromErrnoWithFilenameObject(OSError, path)
        return None
    return fd, writable, info.st_size, PyBytes_FromStringAndSize(_head, got)


cdef void _close_keeping_errno(int fd) noexcept:
    """Close ``fd`` before raising the error in ``errno`` (raising leaves the function)."""
    cdef int failed = libc_errno.errno
    c_close(fd)
    libc_errno.errno = failed


# -- liveness of a writer: what the daemon asks of each idle process per tick --


def proc_start_ticks(pid_number: int):
    """The start time of ``pid`` in clock ticks since boot (/proc), None if
    it is gone or a zombie (it has ended; only its exit status waits)."""
    cdef long long pid
    cdef char path[48]
    cdef char buf[4096]
    cdef int fd
    cdef ssize_t n
    cdef Py_ssize_t i, close_paren = -1, field = 0
    if not 0 <= pid_number < 2**63:
        return None
    pid = pid_number
    snprintf(path, sizeof(path), b"/proc/%lld/stat", pid)
    fd = c_open(path, O_RDONLY | O_CLOEXEC)
    if fd < 0:
        return None
    n = c_read(fd, buf, sizeof(buf))
    c_close(fd)
    if n < 0:
        return None
    # The command name may hold spaces and parentheses: fields follow the last ')'.
    for i in range(n):
        if buf[i] == b')':
            close_paren = i
    if close_paren < 0:
        raise ValueError("no ')' in /proc/<pid>/stat")
    i = close_paren + 2
    if i >= n:
        raise IndexError("no state in /proc/<pid>/stat")
    if buf[i] == b'Z' or buf[i] == b'X':
        return None
    # Field 19 after the state (starttime), each field separated by one space.
    while field < 19:
        while i < n and buf[i] != b' ':
            i += 1
        while i < n and buf[i] == b' ':
            i += 1
        field += 1
    if i >= n:
        raise IndexError("no start time in /proc/<pid>/stat")
    return int(buf[i:n].split(None, 1)[0])


cdef extern from "Python.h":
    bytes PyUnicode_EncodeFSDefault(object unicode)


cdef extern from "<fcntl.h>":
    int F_OFD_GETLK  # Linux >= 3.15 (Python.h defines _GNU_SOURCE first)


def segment_locked(int fd) -> bool:
    """True if some open file holds a lock on the segment open at ``fd``
    (then its writer is alive); False if none does, or if the file system
    cannot tell (then ask /proc: see ``segment.process_alive``)."""
    cdef c_flock probe
    memset(&probe, 0, sizeof(probe))
    probe.l_type = F_WRLCK
    probe.l_whence = SEEK_SET
    if c_fcntl(fd, F_OFD_GETLK, &probe) != 0:
        return False
    return probe.l_type != F_UNLCK


# -- objects the daemon makes for every process it reads -----------------------

cdef extern from "Python.h":
    int PyObject_GenericSetAttr(object o, object name, object value) except -1

_object_new = object.__new__


def new_frozen(cls, tuple names not None, tuple values not None):
    """An instance of ``cls`` made by ``object.__new__``, with each attribute
    of ``names`` set to the value at its position by ``object.__setattr__``
    (what the ``__init__`` of a frozen dataclass without defaults to fill or
    ``__post_init__`` does, in one call: the daemon makes a few of them per
    process that it reads)."""
    cdef Py_ssize_t i, n = len(names)
    if len(values) != n:
        raise ValueError(f"{len(values)} values for {n} attributes")
    obj = _object_new(cls)
    for i in range(n):
        PyObject_GenericSetAttr(obj, names[i], values[i])
    return obj
