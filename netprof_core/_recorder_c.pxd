from cpython.buffer cimport Py_buffer
from libc.stdint cimport int64_t, uint64_t


cdef class RecorderCore:
    cdef Py_buffer _view
    cdef bint _has_view
    cdef uint64_t* _w
    cdef Py_ssize_t _ctl
    cdef Py_ssize_t _live
    cdef Py_ssize_t _pub
    cdef Py_ssize_t _ring
    cdef Py_ssize_t _hists  # route 0's histogram, within a statistics area
    cdef uint64_t _slots
    cdef uint64_t _ring_capacity
    cdef int64_t _mono_offset_ns
    cdef uint64_t _rng
    cdef uint64_t _calls
    cdef bytearray _dirty
    cdef int64_t _last_slow_log_ns
    cdef uint64_t _slow_suppressed
    cdef object _on_slow
    cdef uint64_t _publish_ack

    cpdef record_ints(self, Py_ssize_t route_id, Py_ssize_t status, int64_t start_ns, int64_t end_ns,
                      int64_t bytes_in, int64_t bytes_out, Py_ssize_t error_kind, int64_t ttfb_ns)
    cdef _reject(self, tuple arguments)
    cdef bint _apply(self, uint64_t route_id, uint64_t status, int64_t start_ns, int64_t end_ns,
                     uint64_t bytes_in, uint64_t bytes_out, uint64_t error_kind, uint64_t ttfb_ns,
                     bint timed, int64_t t0)
    cdef void _count(self, Py_ssize_t word)
    cdef void _publish(self)
    cdef _internal_error(self, exc)
    cdef _log_slow(self, uint64_t route_id, uint64_t duration_ns, uint64_t status, int64_t now_ns)
    # Added later: after the others, so that the slots of the method table
    # that the compiled hooks call by position stay where they were.
    cpdef int admit(self) noexcept
    cdef _record_objects(self, int admitted, route_id, status, start_ns, end_ns, bytes_in, bytes_out,
                         error_kind, ttfb_ns)
    cpdef record_admitted_ints(self, int admitted, Py_ssize_t route_id, Py_ssize_t status, int64_t start_ns,
                               int64_t end_ns, int64_t bytes_in, int64_t bytes_out, Py_ssize_t error_kind,
                               int64_t ttfb_ns)


cdef class EmptyRecorder:
    pass
