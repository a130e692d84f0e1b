/* Small C helpers for the Cython recorder core. */
#ifndef NETPROF_CDEFS_H
#define NETPROF_CDEFS_H

#include <stdint.h>
#include <time.h>

/* Orders the stores before it ahead of the stores after it, for readers in
   other processes (a compiler barrier only on x86-64). */
static inline void np_release_fence(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

static inline int np_bit_length(uint64_t value) {
    return value ? 64 - __builtin_clzll(value) : 0;
}

/* The clock of time.monotonic_ns() on Linux. */
static inline int64_t np_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#endif
