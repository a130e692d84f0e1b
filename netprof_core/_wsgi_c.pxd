# C types for _wsgi_c, which Cython compiles from _wsgi_py.py.
cimport cython
from libc.stdint cimport int64_t

from netprof_core._recorder_c cimport RecorderCore


cdef class Request


cdef int _NONE
cdef int _EXCEPTION
cdef dict _STATUS_CODES
cdef Py_ssize_t _STATUS_CODES_LIMIT
cdef object _INT64_MAX
from netprof_core._clock cimport now_ns


cdef class WsgiRequests:
    cdef readonly object hook
    cdef object app
    cdef object excluded
    cdef object route_key
    cdef dict route_ids
    cdef object admit
    cdef object record_admitted
    cdef RecorderCore core

    @cython.locals(request=Request, bytes_out=int64_t, admitted=int)
    cpdef serve(self, environ, start_response)

    @cython.locals(templates=dict, end=int64_t, ttfb=int64_t)
    cdef finish(self, Request request, int error_kind)


cdef bint _is_file_wrapper(body, environ) except -1


cdef class Request:
    cdef WsgiRequests requests
    cdef readonly object environ
    cdef object _start_response
    cdef int64_t start
    cdef object status
    cdef object body
    cdef int64_t bytes_out
    cdef int64_t first_byte
    cdef int error_kind
    cdef int admitted

    @cython.locals(requests=WsgiRequests)
    cdef finish(self, int error_kind)
