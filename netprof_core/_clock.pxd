# The compiled hooks' now_ns() (see _clock.py): time.monotonic_ns's clock, in C.
from libc.stdint cimport int64_t

from netprof_core._cdefs cimport np_monotonic_ns


cpdef inline int64_t now_ns() noexcept:
    return np_monotonic_ns()
