# C types for _outbound_c, which Cython compiles from _outbound_py.py.
cimport cython
from libc.stdint cimport int64_t, uint8_t

from netprof_core._recorder_c cimport RecorderCore


cdef object _OUTBOUND
cdef int _EXCEPTION
from netprof_core._clock cimport now_ns
cdef object error_kind_of
cdef object content_length
cdef Py_ssize_t ROUTE_CACHE_LIMIT
cdef dict _DEFAULT_PORTS
cdef object urlsplit
cdef object _instrumentation
cdef object timed
cdef object timed_async
cdef object awaiting_for


cdef class OutboundHook:
    cdef readonly object recorder
    cdef readonly object path_template
    cdef dict routes
    cdef tuple last_route
    cdef object record_call
    cdef RecorderCore core

    @cython.locals(last=tuple)
    cpdef record(self, method, host, port, url, status, start_ns, end_ns, bytes_in, bytes_out, exc)
    @cython.locals(route=object)
    cdef _route(self, method, host, port, url)
    cpdef httpx_done(self, request, response, exc, start_ns)
    cpdef requests_done(self, request, response, exc, start_ns)


cdef class AsyncHttpxTransport:
    cdef readonly object inner
    cdef readonly OutboundHook hook
    cdef object awaiting
    cdef object done


@cython.locals(triples=list, name=bytes, value=bytes)
cdef _httpx_response_length(headers)
@cython.locals(number=int64_t, digit=uint8_t)
cdef _decimal(bytes digits)
cpdef int failure_kind(exc) except? -1
cpdef host_template(host, port)
cpdef explicit_port(scheme, port)
