# C types for _asgi_c, which Cython compiles from _asgi_py.py.
cimport cython
from libc.stdint cimport int64_t

from netprof_core._recorder_c cimport RecorderCore


cdef class Exchange
cdef class Receiver


cdef int _NONE
cdef int _EXCEPTION
cdef int _CLIENT_DISCONNECT
cdef frozenset _DISCONNECT_NAMES
cdef object _ASYNCIO_MARK
cdef object _INSPECT_MARK
from netprof_core._clock cimport now_ns
cdef object awaiting_for
cdef object UNMATCHED_ROUTE


cdef route_template(dict scope, root_path)
cpdef bint is_disconnect(exc, send) except -1


cdef class AsgiRequests:
    cdef readonly object hook
    cdef object app
    cdef object excluded
    cdef object route_key
    cdef dict route_ids
    cdef object admit
    cdef object record_admitted
    cdef RecorderCore core
    cdef readonly object awaiting
    cdef readonly object served

    cpdef request_served(self, Exchange exchange, result, exc, _)
    @cython.locals(fields=dict, templates=dict, ttfb=int64_t)
    cdef finish(self, scope, Exchange exchange)


cdef AsgiRequests requests_of(middleware)
@cython.locals(exchange=Exchange)
cdef Exchange new_exchange(scope, dict fields, send, int admitted)
@cython.locals(receiver=Receiver)
cdef Receiver new_receiver(Exchange exchange, receive, awaiting)
cpdef received(Exchange exchange, message, exc, _)


# Reused, not allocated: an allocation of a garbage-collected object brings
# the next collection nearer, and under load (many requests in flight, all in
# the youngest generation) collections are most of what a middleware costs.
@cython.freelist(256)
cdef class Exchange:
    cdef object _send
    cdef readonly object scope
    cdef readonly object root_path
    cdef readonly int64_t start
    cdef readonly int status
    cdef public int64_t bytes_in
    cdef readonly int64_t bytes_out
    cdef readonly int64_t first_byte
    cdef public int64_t end
    cdef bint trailers
    cdef public int error_kind
    cdef int admitted

    cdef note(self, dict message)
    cdef failed(self, exc)


@cython.freelist(256)
cdef class Receiver:
    cdef Exchange exchange
    cdef object _receive
    cdef object _awaiting
