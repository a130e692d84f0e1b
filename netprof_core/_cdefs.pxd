# C and OS declarations for the recorder core: extern only.
from libc.stdint cimport int64_t, uint64_t


cdef extern from "_cdefs.h" nogil:
    void np_release_fence()
    int np_bit_length(uint64_t value)
    int64_t np_monotonic_ns()


cdef extern from "Python.h":
    # Declared without an exception value: the core checks and clears the error
    # itself, so a bad argument becomes a counted internal error, not a raise.
    long long PyLong_AsLongLong_noexc "PyLong_AsLongLong" (object obj)
    unsigned long long PyLong_AsUnsignedLongLong_noexc "PyLong_AsUnsignedLongLong" (object obj)
    bint PyLong_CheckExact(object obj)
    void* PyErr_Occurred()
    void PyErr_Clear()
