"""Latency histograms as read from segments: quantiles, exact merging, deltas."""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ._layout import HIST_BUCKETS, bucket_bounds, bucket_index
from ._recorder import add_counts, core_module, subtract_counts

if TYPE_CHECKING:
    from typing_extensions import Self

_core = core_module()
add_packed, pack_words, subtract_packed = _core.add_packed, _core.pack_words, _core.subtract_packed
replace_packed = _core.replace_packed

__all__ = ("Histogram", "saturating_add")

U64_MAX = (1 << 64) - 1


def saturating_add(into: array[int], values: Iterable[int]) -> None:
    """``into[i] += values[i]``, each count stopping at 2**64 - 1: for sums
    that are only ever added to (never subtracted from), where a count that
    cannot grow any more must at least not go backwards. The slow path of a
    checked addition that was refused, so rare."""
    for i, value in enumerate(values):
        into[i] = min(U64_MAX, into[i] + value)


class Histogram:
    """Counts of durations (ns) in the segment's log-linear buckets.

    Histograms of the same route from many processes merge exactly by adding
    bucket counts; a quantile is the midpoint of the bucket holding it (within
    0.8 % of the true value from 512 ns to 73 minutes), never above ``max_ns``
    when that is known (None: not known).
    """

    __slots__ = ("_counts", "_packed", "max_ns")

    def __init__(self, counts: Iterable[int] | None = None, max_ns: int | None = None) -> None:
        self._counts: array[int] | None = array("Q", bytes(8 * HIST_BUCKETS) if counts is None else counts)
        if len(self._counts) != HIST_BUCKETS:
            raise ValueError(f"a histogram has {HIST_BUCKETS} buckets, got {len(self._counts)}")
        self._packed: bytes | None = None
        self.max_ns = max_ns

    @classmethod
    def from_packed(cls, packed: bytes, max_ns: int | None = None) -> Histogram:
        """From its nonzero buckets (``pack_words`` of the counts). Kept packed
        (a few hundred bytes instead of 17 KB) until ``counts`` is asked for."""
        hist = cls.__new__(cls)
        hist._counts, hist._packed, hist.max_ns = None, packed, max_ns
        return hist

    @property
    def counts(self) -> array[int]:
        """The bucket counts (u64), unpacked on first use."""
        if self._counts is None:
            counts = array("Q", bytes(8 * HIST_BUCKETS))
            add_packed(counts, self._packed)
            self._counts, self._packed = counts, None
        return self._counts

    def add_to(self, counts: array[int]) -> bool:
        """``counts[i] += self.counts[i]``, without unpacking a packed histogram,
        if no count would pass 2**64 - 1 (else False, ``counts`` unchanged)."""
        if self._packed is not None:
            return add_packed(counts, self._packed)  # type: ignore[no-any-return]
        return add_counts(counts, self.counts)

    def packed(self) -> bytes:
        """The nonzero buckets, packed (``pack_words``), without unpacking a packed histogram."""
        if self._packed is not None:
            return self._packed
        return pack_words(self.counts, 0, HIST_BUCKETS)  # type: ignore[no-any-return]

    def subtract_from(self, counts: array[int]) -> bool:
        """``counts[i] -= self.counts[i]`` if none goes below zero (else False,
        ``counts`` unchanged), without unpacking a packed histogram."""
        if self._packed is not None:
            return subtract_packed(counts, self._packed)  # type: ignore[no-any-return]
        return subtract_counts(counts, self.counts)  # type: ignore[no-any-return]

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, max_ns: int | None = None) -> Histogram:
        """From the little-endian u64 bucket counts of a segment."""
        counts = array("Q")
        counts.frombytes(data)
        return cls(counts, max_ns)

    @classmethod
    def from_durations(cls, durations_ns: Iterable[int]) -> Histogram:
        hist = cls()
        for duration in durations_ns:
            hist.counts[bucket_index(duration)] += 1
            hist.max_ns = duration if hist.max_ns is None else max(hist.max_ns, duration)
        return hist

    @property
    def count(self) -> int:
        return sum(self.counts)

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, max_ns={self.max_ns})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return self.counts == other.counts and self.max_ns == other.max_ns

    def __add__(self, other: Histogram) -> Histogram:
        merged = Histogram(self.counts, self.max_ns)
        merged += other
        return merged

    def __iadd__(self, other: Histogram) -> Self:
        """Merge ``other`` in; a bucket that would pass 2**64 - 1 stays there
        (a merged histogram is made afresh, never subtracted from)."""
        if not other.add_to(self.counts):
            saturating_add(self.counts, other.counts)
        self.max_ns = None if self.max_ns is None or other.max_ns is None else max(self.max_ns, other.max_ns)
        return self

    def __sub__(self, earlier: Histogram) -> Histogram:
        """What was recorded since ``earlier`` (a former state of the same
        cumulative histogram). The maximum of the interval is not known; the
        later one is kept as an upper bound."""
        diff = Histogram(self.counts, self.max_ns)
        if not earlier.subtract_from(diff.counts):
            raise ValueError("cannot subtract a histogram that is not an earlier state")
        return diff

    def nonzero(self) -> Iterator[tuple[int, int]]:
        for index, count in enumerate(self.counts):
            if count:
                yield index, count

    def quantile(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1) in ns by the nearest-rank method; NaN when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be within 0 and 1, got {q!r}")
        total = self.count
        if total == 0:
            return math.nan
        rank = max(1, math.ceil(q * total))
        seen = 0
        for index, count in self.nonzero():
            seen += count
            if seen >= rank:
                lower, upper = bucket_bounds(index)
                estimate = (lower + upper) / 2
                return estimate if self.max_ns is None else min(estimate, float(self.max_ns))
        raise AssertionError("unreachable: rank is at most the total count")
