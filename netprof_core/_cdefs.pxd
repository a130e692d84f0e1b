# C and OS declarations for the recorder core: extern only.
from libc.stdint cimport int64_t, uint64_t


cdef extern from "<fcntl.h>" nogil:
    enum: O_NOFOLLOW  # (not in Cython's posix.fcntl)


cdef extern from "_cdefs.h" nogil:
    void np_release_fence()
    int np_bit_length(uint64_t value)
    int64_t np_monotonic_ns()

