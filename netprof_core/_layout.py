"""The segment layout: the one definition shared by the Cython core, its
pure-Python twin and the reader.

A segment is one file per profiled process, mapped with ``mmap`` by the writer
(the process itself) and by any number of readers (netprofd, the CLI, tests).
Its size is fixed when it is created. All integers are little-endian; netprof
runs on little-endian hosts only (the cores write native words).

::

    offset                 size                    what
    0                      HEADER_SIZE (512)       header: magic, version, identity, sizes
    CONTROL_OFFSET         CONTROL_SIZE (128)      control block, 16 u64 words
    ROUTES_OFFSET          ROUTE_TABLE_HEADER +    route table: names of interned routes
                           (cap+1) * ROUTE_NAME_SIZE
    layout.live_offset     layout.stats_size       live statistics (written per record)
    layout.published_offset layout.stats_size      published copy of the statistics
    layout.ring_offset     ring_capacity * 64      ring of request records

Statistics area (u64 words, ``stats_size`` bytes)::

    GLOBAL_WORDS words     seq, global counters (see G_*)
    HIST_BUCKETS words     the recorder's own overhead histogram (ns)
    (cap+1) route headers  ROUTE_HEADER_WORDS counters each (see R_*), side by side:
                           a reader gets every route's counters in one read
    (cap+1) histograms     HIST_BUCKETS buckets each, one per route

A route's header and histogram together make its route block
(ROUTE_BLOCK_WORDS: the header, then the buckets): the unit that readers pack
and add up across processes.

Route id 0 is the overflow route: requests of routes interned after the route
table was full are counted there.

Ring record (RECORD_WORDS u64 words)::

    0 seq        2*index+1 while being written, 2*index+2 when complete
    1 wall_ns    wall-clock end time
    2 duration_ns
    3 bytes_in
    4 bytes_out
    5 ttfb_ns    time to first byte (0 when unknown)
    6 packed     route_id | status << 32 | error_kind << 48 | flags << 56
    7 reserved

Concurrency. There is exactly one writer per segment: the process that made it.
(Within that process the Cython core runs a record without releasing the GIL;
the pure-Python twin takes a lock.) The writer never waits for a reader:

* The live statistics are guarded by a sequence counter (``G_SEQ``): odd while
  a record is being applied. A reader copies the area between two reads of the
  counter and retries when they differ.
* A writer recording at full speed would keep that copy from ever succeeding,
  so a reader may also raise ``C_PUBLISH_REQUEST``; on its next record the
  writer copies the live area (only the route blocks changed since its last
  copy) into the published area, under the published area's own counter, and
  stores the request in ``G_PUBLISH_ACK`` of the published copy.
* Each ring record carries its own sequence word; a slot is written once per
  pass of the ring, so a reader validates each record on its own.
* The control block is written by readers (the daemon, the CLI) and read by the
  writer on every record; its words are independent settings, each written with
  one aligned 8-byte store. Requests the writer must act on (publish, reset of
  errors) are tokens the writer acknowledges in its own words, so that no word
  is read-modified-written by both sides. The one exception is
  ``C_AUTO_DISABLED``: the writer sets it, a reset clears it; both outcomes of
  that race are states the user asked for.
* The route table is written only by the writer's interning call: an entry is
  complete before the count that makes it visible is raised.

These rules rely on stores becoming visible, and loads happening, in program
order, as on x86-64 (TSO). The Cython core adds release fences; the readers
and the pure-Python twin have none, so weaker architectures are not supported.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

MAGIC: Final = b"NETPROF1"
LAYOUT_VERSION: Final = 2  # 2: route headers side by side, then the route histograms
SEGMENT_SUFFIX: Final = ".npseg"
# A running netprofd holds an exclusive flock on this file in the segment directory.
DAEMON_LOCK_NAME: Final = "netprofd.lock"

WORD: Final = 8
U64: Final = struct.Struct("<Q")

# Behaviour both cores share.
MAX_CONSECUTIVE_ERRORS: Final = 3  # more than this in a row auto-disables
OVERHEAD_SAMPLE_MASK: Final = 63  # time one record in 64 when performance monitoring is on
SLOW_LOG_INTERVAL_NS: Final = 1_000_000_000  # at most one slow-request log line a second

# --- header ---------------------------------------------------------------
HEADER_SIZE: Final = 512
_HEADER_SPEC: Final = (
    ("magic", "8s"),
    ("layout_version", "I"),
    ("header_size", "I"),
    ("total_size", "Q"),
    ("pid", "Q"),
    ("start_ticks", "Q"),  # the process start time from /proc: with pid, its identity
    ("created_ns", "Q"),  # wall clock
    ("mono_offset_ns", "q"),  # wall clock minus monotonic clock at creation
    ("ring_capacity", "I"),
    ("route_capacity", "I"),  # interned routes; the overflow route comes in addition
    ("requested_ring_capacity", "I"),  # from the config, before the memory bound
    ("requested_route_capacity", "I"),
    ("hist_buckets", "I"),
    ("memory_shrinks", "I"),  # 1 if the memory bound shrank the ring or the route table
    ("app_name", "64s"),  # utf-8, NUL-padded
)
HEADER_STRUCT: Final = struct.Struct("<" + "".join(fmt for _, fmt in _HEADER_SPEC))
HEADER_FIELDS: Final = tuple(name for name, _ in _HEADER_SPEC)
HEADER_OFFSETS: Final = {
    name: struct.calcsize("<" + "".join(fmt for _, fmt in _HEADER_SPEC[:i]))
    for i, (name, _) in enumerate(_HEADER_SPEC)
}


def read_header_field(buf: object, name: str) -> int:
    fmt = dict(_HEADER_SPEC)[name]
    return struct.unpack_from("<" + fmt, buf, HEADER_OFFSETS[name])[0]  # type: ignore[arg-type,no-any-return]


# closed_ns is written once, when the process ends, after the header was made.
CLOSED_NS_OFFSET: Final = HEADER_STRUCT.size + (-HEADER_STRUCT.size % WORD)
APP_NAME_MAX: Final = 64

# --- control block (u64 words, index from CONTROL_OFFSET) -----------------
CONTROL_OFFSET: Final = HEADER_SIZE
CONTROL_WORDS: Final = 16
CONTROL_SIZE: Final = CONTROL_WORDS * WORD
C_ENABLED: Final = 0
C_FEATURE_FLAG: Final = 1
C_AUTO_DISABLED: Final = 2
C_LOG_SLOW: Final = 3
C_PERF_MONITORING: Final = 4
C_AUTO_DISABLE_ON_ERROR: Final = 5
C_GRACEFUL: Final = 6
C_SAMPLE_THRESHOLD: Final = 7  # sample_rate * 2**32; >= 2**32 records everything
C_SLOW_NS: Final = 8
C_RING_CAPACITY: Final = 9  # effective ring capacity, <= header ring_capacity
C_RETENTION_NS: Final = 10  # 0: no age limit on served records
C_CLEAN_FLOOR: Final = 11  # records with an index below this are dropped
C_PUBLISH_REQUEST: Final = 12  # a reader's token; answered in G_PUBLISH_ACK
C_RESET_ERRORS_REQUEST: Final = 13  # a reader's token; answered in G_RESET_ACK
SAMPLE_ALL: Final = 1 << 32

# --- route table ------------------------------------------------------------
ROUTES_OFFSET: Final = CONTROL_OFFSET + CONTROL_SIZE
ROUTE_TABLE_HEADER: Final = 64
ROUTE_TABLE_STRUCT: Final = struct.Struct("<QQ")  # route_count, overflowed (route keys sent to overflow)
ROUTE_COUNT_WORD: Final = ROUTES_OFFSET // WORD  # record() refuses route ids at or above it
ROUTE_NAME_SIZE: Final = 128
ROUTE_NAME_STRUCT: Final = struct.Struct("<B3x12s112s")  # direction, method, template
OVERFLOW_ROUTE_ID: Final = 0
OVERFLOW_TEMPLATE: Final = "<other>"


class Direction(IntEnum):
    INBOUND = 0
    OUTBOUND = 1


class ErrorKind(IntEnum):
    """Why a request failed, as recorded in the ring and counted per route."""

    NONE = 0
    EXCEPTION = 1
    CLIENT_DISCONNECT = 2
    TIMEOUT = 3
    CONNECTION_REFUSED = 4
    DNS = 5
    CONNECTION = 6
    OTHER = 7


ERROR_KINDS: Final = 8

# --- histogram --------------------------------------------------------------
# Log-linear buckets over durations in ns, in the manner of HdrHistogram: below
# 2**HIST_LINEAR_BITS ns, HIST_LINEAR_BUCKETS equal buckets; above, each power
# of two is split into 2**HIST_SUB_BITS equal buckets, so a bucket is at most
# 1/64 of its lower bound wide and its midpoint is within 0.8 % of any value
# in it from 512 ns to 2**42 ns (about 73 minutes). Larger values share the last bucket.
HIST_SUB_BITS: Final = 6
HIST_LINEAR_BITS: Final = 9
HIST_MAX_BITS: Final = 42
HIST_LINEAR_BUCKETS: Final = 1 << (HIST_LINEAR_BITS - HIST_SUB_BITS)
HIST_BUCKETS: Final = HIST_LINEAR_BUCKETS + ((HIST_MAX_BITS - HIST_LINEAR_BITS) << HIST_SUB_BITS)


def bucket_index(duration_ns: int) -> int:
    """The histogram bucket of a duration (ns, >= 0)."""
    if duration_ns < 1 << HIST_LINEAR_BITS:
        return duration_ns >> HIST_SUB_BITS
    top = duration_ns.bit_length() - 1
    if top >= HIST_MAX_BITS:
        return HIST_BUCKETS - 1
    return (
        HIST_LINEAR_BUCKETS
        + ((top - HIST_LINEAR_BITS) << HIST_SUB_BITS)
        + ((duration_ns >> (top - HIST_SUB_BITS)) & ((1 << HIST_SUB_BITS) - 1))
    )


def bucket_bounds(index: int) -> tuple[int, int]:
    """The durations (ns) a bucket holds: lower bound inclusive, upper exclusive."""
    if index < HIST_LINEAR_BUCKETS:
        width = 1 << HIST_SUB_BITS
        return index * width, (index + 1) * width
    octave, sub = divmod(index - HIST_LINEAR_BUCKETS, 1 << HIST_SUB_BITS)
    top = octave + HIST_LINEAR_BITS
    width = 1 << (top - HIST_SUB_BITS)
    lower = (1 << top) + sub * width
    return lower, lower + width


# --- statistics area (u64 word indexes) ------------------------------------
G_SEQ: Final = 0
G_SAMPLED_OUT: Final = 1  # requests left out by the sample rate
G_DISABLED_CALLS: Final = 2  # requests seen while profiling was off
G_INTERNAL_ERRORS: Final = 3
G_AUTO_DISABLE_EVENTS: Final = 4
G_NEXT_INDEX: Final = 5  # records ever written to the ring == requests recorded
G_RING_CURSOR: Final = 6  # the slot the next record goes to
G_OVERHEAD_COUNT: Final = 7  # records whose own cost was timed
G_OVERHEAD_SUM_NS: Final = 8
G_OVERHEAD_MAX_NS: Final = 9
G_PUBLISH_ACK: Final = 10  # meaningful in the published copy: the request it answers
G_CONSECUTIVE_ERRORS: Final = 11  # internal errors since the last good record or reset
G_RESET_ACK: Final = 12  # the last reset-errors request acted on
GLOBAL_WORDS: Final = 16
OVERHEAD_HIST: Final = GLOBAL_WORDS

ROUTE_HEADERS_START: Final = GLOBAL_WORDS + HIST_BUCKETS

R_COUNT: Final = 0
R_ERRORS: Final = 1  # error kind set, or status >= 500
R_SLOW: Final = 2
R_SUM_NS: Final = 3
R_MAX_NS: Final = 4
R_BYTES_IN: Final = 5
R_BYTES_OUT: Final = 6
R_TTFB_SUM_NS: Final = 7
R_STATUS_CLASSES: Final = 8  # 6 words: no status, 1xx, 2xx, 3xx, 4xx, 5xx
R_ERROR_KINDS: Final = 14  # ERROR_KINDS words, by ErrorKind
# The shortest duration counted: with R_MAX_NS, the bucket range that can be
# nonzero, all a reader needs to copy. 0 in a segment from before it was kept
# (bucket 0 on: the whole range), as for a route not used yet.
R_MIN_NS: Final = R_ERROR_KINDS + ERROR_KINDS
ROUTE_HEADER_WORDS: Final = 32
ROUTE_BLOCK_WORDS: Final = ROUTE_HEADER_WORDS + HIST_BUCKETS


def route_histograms_start(route_slots: int) -> int:
    """Word index, within a statistics area of ``route_slots`` routes, of route 0's histogram."""
    return ROUTE_HEADERS_START + route_slots * ROUTE_HEADER_WORDS


def stats_prefix_words(route_slots: int, route_count: int) -> int:
    """The words of a statistics area of ``route_slots`` routes that hold
    everything about its first ``route_count`` routes (a copy of the area's
    start up to the last of their histograms)."""
    return route_histograms_start(route_slots) + route_count * HIST_BUCKETS
STATUS_CLASSES: Final = 6

# --- ring --------------------------------------------------------------------
RECORD_WORDS: Final = 8
RECORD_SIZE: Final = RECORD_WORDS * WORD
REC_SEQ, REC_WALL_NS, REC_DURATION_NS, REC_BYTES_IN, REC_BYTES_OUT, REC_TTFB_NS, REC_PACKED = range(7)
FLAG_SLOW: Final = 1
FLAG_ERROR: Final = 2


def pack_record_word(route_id: int, status: int, error_kind: int, flags: int) -> int:
    return route_id | status << 32 | error_kind << 48 | flags << 56


def unpack_record_word(packed: int) -> tuple[int, int, int, int]:
    return packed & 0xFFFFFFFF, (packed >> 32) & 0xFFFF, (packed >> 48) & 0xFF, packed >> 56


@dataclass(frozen=True, slots=True)
class SegmentLayout:
    """Offsets and sizes of one segment, computed from its two capacities."""

    ring_capacity: int
    route_capacity: int

    @property
    def route_slots(self) -> int:
        return self.route_capacity + 1

    @property
    def route_table_size(self) -> int:
        return ROUTE_TABLE_HEADER + self.route_slots * ROUTE_NAME_SIZE

    @property
    def stats_words(self) -> int:
        return GLOBAL_WORDS + HIST_BUCKETS + self.route_slots * ROUTE_BLOCK_WORDS

    @property
    def route_histograms_start(self) -> int:
        """Word index, within a statistics area, of route 0's histogram."""
        return route_histograms_start(self.route_slots)

    @property
    def stats_size(self) -> int:
        return self.stats_words * WORD

    @property
    def live_offset(self) -> int:
        return _align(ROUTES_OFFSET + self.route_table_size, 64)

    @property
    def published_offset(self) -> int:
        return self.live_offset + self.stats_size

    @property
    def ring_offset(self) -> int:
        return self.published_offset + self.stats_size

    @property
    def total_size(self) -> int:
        return self.ring_offset + self.ring_capacity * RECORD_SIZE

    def route_header(self, route_id: int) -> int:
        """Word index, within a statistics area, of a route's counters."""
        return ROUTE_HEADERS_START + route_id * ROUTE_HEADER_WORDS

    def route_histogram(self, route_id: int) -> int:
        """Word index, within a statistics area, of a route's histogram."""
        return self.route_histograms_start + route_id * HIST_BUCKETS

    def route_name_offset(self, route_id: int) -> int:
        return ROUTES_OFFSET + ROUTE_TABLE_HEADER + route_id * ROUTE_NAME_SIZE

    @classmethod
    def fitting(
        cls, ring_capacity: int, route_capacity: int, max_bytes: int
    ) -> tuple[SegmentLayout, int]:
        """The layout within ``max_bytes`` closest to the one asked for: the ring
        shrinks first, down to MIN_RING_CAPACITY, then the route table; the ring
        then takes what room is left. Returns it with 1 if anything shrank, else 0."""
        wanted = cls(ring_capacity, route_capacity)
        if wanted.total_size <= max_bytes:
            return wanted, 0
        without_ring = cls(0, route_capacity).total_size
        if without_ring + MIN_RING_CAPACITY * RECORD_SIZE <= max_bytes:
            ring = min(ring_capacity, (max_bytes - without_ring) // RECORD_SIZE)
            return cls(ring, route_capacity), 1
        ring = min(ring_capacity, MIN_RING_CAPACITY)
        for routes in range(route_capacity - 1, 0, -1):
            if cls(ring, routes).total_size <= max_bytes:
                spare = (max_bytes - cls(0, routes).total_size) // RECORD_SIZE
                return cls(min(ring_capacity, spare), routes), 1
        raise ValueError(
            f"max_memory_mb allows {max_bytes} bytes, below the smallest possible "
            f"segment ({cls(ring, 1).total_size} bytes): raise max_memory_mb"
        )


MIN_RING_CAPACITY: Final = 16


def _align(value: int, to: int) -> int:
    return value + (-value % to)
