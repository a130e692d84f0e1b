"""Rates and percentiles over the last 1 m / 5 m / 15 m, from snapshot deltas.

A window's statistics are the current totals minus those at a checkpoint taken
a window ago: exact, counter by counter and histogram bucket by bucket. What
the checkpoints hold is bounded by design, whatever the tick and the traffic:

* at most one checkpoint per FINE_SPACING seconds (not one per tick) for the
  last FINE_SECONDS, then one per COARSE_SPACING up to KEEP_SECONDS: about 55
  checkpoints, so a window of W seconds covers W to W + FINE_SPACING (up to
  FINE_SECONDS), or W to W + COARSE_SPACING (longer): ``Window.seconds`` is
  the span actually covered, and rates are over it;
* per checkpoint and route, the counters in one array (22 words, 176 bytes),
  and the histogram's *change* since the previous checkpoint, packed (its
  nonzero buckets only: a few words for a route that saw a few requests; a
  route that saw none costs nothing). A checkpoint that is thinned out hands
  its changes on to the next one;
* per route, its histogram at the newest checkpoint, packed (at most
  LATEST_MAX_BYTES, 21 KiB; a few KiB in practice);
* in all, at most BYTES_PER_ROUTE per route tracked on average (at least
  MIN_BUDGET_BYTES) beside that latest histogram: past it the oldest
  checkpoints go first, so the longest windows cover less (said by
  ``Window.seconds``, ``covered_seconds``, ``trimmed`` and one log line).
"""

from __future__ import annotations

import bisect
import sys
from array import array
from collections import deque
from dataclasses import dataclass, field, fields
from itertools import chain
from typing import TYPE_CHECKING

from netprof_core import Histogram, RouteKey, RouteStats
from netprof_core._layout import ERROR_KINDS, HIST_BUCKETS, STATUS_CLASSES
from netprof_core._recorder import core_module, subtract_counts
from netprof_core.histogram import add_packed, pack_words, subtract_packed

from .log import daemon_logger
from .totals import CounterTotals

if TYPE_CHECKING:
    from collections.abc import Mapping

    from netprof_core._recorder_py import new_frozen

    from .store import AppState
else:
    new_frozen = core_module().new_frozen

__all__ = ("WINDOWS", "Window", "WindowHistory", "parse_window")

WINDOWS: dict[str, float] = {"1m": 60.0, "5m": 300.0, "15m": 900.0}
FINE_SPACING = 5.0
FINE_SECONDS = 120.0
COARSE_SPACING = 30.0
KEEP_SECONDS = max(WINDOWS.values()) + 2 * COARSE_SPACING
BYTES_PER_ROUTE = 32 * 1024
MIN_BUDGET_BYTES = 32 * 2**20

# A route's counters in a checkpoint's array, in this order.
_SCALARS = ("count", "errors", "slow", "sum_ns", "bytes_in", "bytes_out", "ttfb_sum_ns")
_STATUS_AT = len(_SCALARS)
_KINDS_AT = _STATUS_AT + STATUS_CLASSES
_MAX_AT = _KINDS_AT + ERROR_KINDS  # the largest duration ever: did it grow within a window?
ROW_WORDS = _MAX_AT + 1
_ZERO_ROW = (0,) * ROW_WORDS
_ROUTE_STATS_FIELDS = tuple(f.name for f in fields(RouteStats))
# What a stored bytes object and its dict slot cost beside their payload, about.
_ENTRY_OVERHEAD = sys.getsizeof(b"") + 64
# The most a route's latest histogram can take, packed (8 bytes of header, 10 per nonzero bucket).
LATEST_MAX_BYTES = 8 + 10 * HIST_BUCKETS + _ENTRY_OVERHEAD
# A histogram change that could not be taken (the route's totals went
# backwards): a window over it shows the route's totals, as one without a base.
_WENT_BACK = b""


def parse_window(text: str) -> float | None:
    """Seconds of a window name (``1m``, ``5m``, ``15m``), None for ``all``;
    ValueError for anything else."""
    if text == "all":
        return None
    if text in WINDOWS:
        return WINDOWS[text]
    raise ValueError(f"window must be one of 1m, 5m, 15m, all; got {text!r}")


@dataclass(slots=True)
class Window:
    """What one application did between two checkpoints."""

    seconds: float  # the span actually covered (shorter than asked right after start)
    counters: CounterTotals = field(default_factory=CounterTotals)
    routes: dict[RouteKey, RouteStats] = field(default_factory=dict)


@dataclass(slots=True)
class _AppMarks:
    """One application at one checkpoint."""

    counters: CounterTotals  # without the overhead histogram (see _scalars)
    rows: array[int]  # ROW_WORDS cumulative counters per route slot (_Routes.slots)
    changes: dict[RouteKey, bytes]  # packed histogram change since the previous checkpoint


@dataclass(slots=True)
class _Checkpoint:
    taken_ns: int
    apps: dict[str, _AppMarks]
    nbytes: int = 0


@dataclass(slots=True)
class _Routes:
    """Per application: each route's place in the checkpoints' arrays (never
    reused: a route stays in an application's totals), and its histogram at
    the newest checkpoint with the count it had (what the next change is taken from)."""

    slots: dict[RouteKey, int] = field(default_factory=dict)
    latest: dict[RouteKey, tuple[int, bytes]] = field(default_factory=dict)


class WindowHistory:
    def __init__(
        self, *, bytes_per_route: int = BYTES_PER_ROUTE, min_budget_bytes: int = MIN_BUDGET_BYTES
    ) -> None:
        self.bytes_per_route = bytes_per_route
        self.min_budget_bytes = min_budget_bytes
        self._fine: deque[_Checkpoint] = deque()
        self._coarse: deque[_Checkpoint] = deque()
        self._routes: dict[str, _Routes] = {}
        self._scratch = array("Q", _ZEROS)
        self._checkpoint_bytes = 0
        self._latest_bytes = 0
        self._last_ns = 0  # the latest tick's time
        self.trimmed = 0  # checkpoints dropped early to stay within the budget

    def __len__(self) -> int:
        return len(self._fine) + len(self._coarse)

    # -- what it holds -----------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """About what the checkpoints and the latest histograms hold."""
        return self._checkpoint_bytes + self._latest_bytes

    @property
    def budget_bytes(self) -> int:
        """What the checkpoints may hold: ``bytes_per_route`` per route tracked."""
        return max(self.min_budget_bytes, self.bytes_per_route * self.routes_tracked)

    @property
    def routes_tracked(self) -> int:
        return sum(len(routes.slots) for routes in self._routes.values())

    @property
    def checkpoint_bytes(self) -> int:
        """About what the checkpoints hold (what the budget bounds)."""
        return self._checkpoint_bytes

    @property
    def covered_seconds(self) -> float:
        """The longest span a window can cover now."""
        oldest = self._coarse[0] if self._coarse else self._fine[0] if self._fine else None
        return (self._last_ns - oldest.taken_ns) / 1e9 if oldest is not None else 0.0

    # -- one tick ------------------------------------------------------------------

    def add(self, taken_ns: int, apps: Mapping[str, AppState]) -> None:
        """Keep a checkpoint of ``apps`` if the newest is FINE_SPACING old (else nothing)."""
        self._last_ns = taken_ns
        if self._fine and taken_ns - self._fine[-1].taken_ns < FINE_SPACING * 1e9:
            return
        checkpoint = _Checkpoint(taken_ns, {name: self._marks(name, state) for name, state in apps.items()})
        checkpoint.nbytes = sum(_marks_bytes(marks) for marks in checkpoint.apps.values())
        self._checkpoint_bytes += checkpoint.nbytes
        self._fine.append(checkpoint)
        # Past the fine horizon: one per coarse spacing stays, the others hand their changes on.
        while taken_ns - self._fine[0].taken_ns > FINE_SECONDS * 1e9:
            aged = self._fine.popleft()
            if not self._coarse or aged.taken_ns - self._coarse[-1].taken_ns >= COARSE_SPACING * 1e9:
                self._coarse.append(aged)
            else:
                self._hand_on(aged, self._fine[0])
        while self._coarse and taken_ns - self._coarse[0].taken_ns > KEEP_SECONDS * 1e9:
            self._drop_oldest()
        self._keep_to_budget()

    def _marks(self, name: str, state: AppState) -> _AppMarks:
        routes = self._routes.get(name)
        if routes is None:
            routes = self._routes[name] = _Routes()
        slots, latest = routes.slots, routes.latest
        changes: dict[RouteKey, bytes] = {}
        for key, route in state.routes.items():
            if key not in slots:
                slots[key] = len(slots)
            before = latest.get(key)
            if before is not None and before[0] == route.count:
                continue  # nothing recorded since: no change to keep
            now = pack_words(route.histogram.counts, 0, HIST_BUCKETS)
            if before is None:  # (its change: all of it)
                changes[key] = now
                self._latest_bytes += _ENTRY_OVERHEAD + len(now)
            else:
                changes[key] = self._change(route, before[1])
                self._latest_bytes += len(now) - len(before[1])
            latest[key] = (route.count, now)
        return _AppMarks(_scalars(state.counters), _rows(_ordered(slots, state.routes)[0]), changes)

    def _change(self, route: RouteStats, before: bytes) -> bytes:
        scratch = self._scratch
        scratch[:] = route.histogram.counts
        if not subtract_packed(scratch, before):
            return _WENT_BACK
        return pack_words(scratch, 0, HIST_BUCKETS)  # type: ignore[no-any-return]

    def _hand_on(self, dropped: _Checkpoint, later: _Checkpoint) -> None:
        """Drop a checkpoint between two others: the later one's changes now
        count from the one before (its counters are cumulative: nothing to do)."""
        self._checkpoint_bytes -= dropped.nbytes + later.nbytes
        for name, marks in dropped.apps.items():
            after = later.apps.get(name)
            if after is None:
                continue  # the application is gone from the later checkpoint: nothing reads these
            for key, change in marks.changes.items():
                mine = after.changes.get(key)
                after.changes[key] = change if mine is None else self._merged(change, mine)
        later.nbytes = sum(_marks_bytes(marks) for marks in later.apps.values())
        self._checkpoint_bytes += later.nbytes

    def _merged(self, first: bytes, then: bytes) -> bytes:
        if first == _WENT_BACK or then == _WENT_BACK:
            return _WENT_BACK
        scratch = self._scratch
        scratch[:] = _ZEROS
        if not (add_packed(scratch, first) and add_packed(scratch, then)):
            return _WENT_BACK
        return pack_words(scratch, 0, HIST_BUCKETS)  # type: ignore[no-any-return]

    def _drop_oldest(self) -> None:
        oldest = (self._coarse or self._fine).popleft()
        self._checkpoint_bytes -= oldest.nbytes
        # The new oldest's changes count from a checkpoint no window can start at any more.
        new_oldest = self._coarse[0] if self._coarse else self._fine[0] if self._fine else None
        if new_oldest is not None:
            self._checkpoint_bytes -= new_oldest.nbytes
            for marks in new_oldest.apps.values():
                marks.changes = {}
            new_oldest.nbytes = sum(_marks_bytes(marks) for marks in new_oldest.apps.values())
            self._checkpoint_bytes += new_oldest.nbytes

    def _keep_to_budget(self) -> None:
        budget = self.budget_bytes
        if self._checkpoint_bytes <= budget or len(self) <= 2:
            return
        if not self.trimmed:
            daemon_logger.warning(
                "the windows' checkpoints passed their budget (%.1f MiB for %d routes): the oldest go first, "
                "so the longest windows cover less (netprofd_window_covered_seconds)",
                budget / 2**20,
                self.routes_tracked,
            )
        while self._checkpoint_bytes > budget and len(self) > 2:
            self._drop_oldest()
            self.trimmed += 1

    # -- windows ---------------------------------------------------------------------

    def _checkpoints(self) -> list[_Checkpoint]:
        """Oldest first."""
        return list(self._coarse) + list(self._fine)

    def window(
        self,
        apps: Mapping[str, AppState],
        now_ns: int,
        seconds: float,
        *,
        histograms: bool = True,
        routes: bool = True,
    ) -> dict[str, Window]:
        """Per application, what happened in the last ``seconds`` (from the
        latest checkpoint at or before then, else the oldest). With
        ``histograms=False`` the routes' histograms are left empty (the costly
        part: for counts and rates they are not needed); ``routes=False``
        leaves the routes out (the counters alone)."""
        checkpoints = self._checkpoints()
        if not checkpoints:
            return {name: Window(0.0) for name in apps}
        at = bisect.bisect_right([c.taken_ns for c in checkpoints], now_ns - int(seconds * 1e9))
        base = checkpoints[at - 1] if at else checkpoints[0]
        later = checkpoints[at:] if at else checkpoints[1:]
        result: dict[str, Window] = {}
        for name, state in apps.items():
            marks = base.apps.get(name)
            span = (now_ns - base.taken_ns) / 1e9
            if marks is None:  # an application seen since: all of it is in the window
                result[name] = Window(span, _scalars(state.counters), dict(state.routes) if routes else {})
                continue
            window = Window(span, _counters_delta(state.counters, marks.counters))
            if routes:
                changes = [c.apps[name].changes for c in later if name in c.apps] if histograms else None
                window.routes = self._route_windows(self._routes[name], state, marks.rows, changes)
            result[name] = window
        return result

    def _route_windows(
        self, tracked: _Routes, state: AppState, base: array[int], changes: list[dict[RouteKey, bytes]] | None
    ) -> dict[RouteKey, RouteStats]:
        """Each route's window: its counters now minus at the base checkpoint
        (one subtraction for all, in C), its histogram if ``changes`` are given."""
        ordered, unplaced = _ordered(tracked.slots, state.routes)
        delta = _rows(ordered)[: len(base)]
        went_back: set[int] = set()
        if not subtract_counts(delta, base):  # cannot happen with retired totals: never show a negative
            went_back = {at for at in range(0, len(base), ROW_WORDS) if _behind(delta, base, at)}
            base = array("Q", base)
            for at in went_back:
                base[at : at + ROW_WORDS] = array("Q", _ZERO_ROW)
            subtract_counts(delta, base)
        # New since the base checkpoint (or their totals went back): all of them is in the window.
        found = {route.key: route for route in unplaced}
        found.update((route.key, route) for route in ordered[len(delta) // ROW_WORDS :] if route is not None)
        for at, route in zip(range(0, len(delta), ROW_WORDS), ordered):
            if route is None:
                continue
            key = route.key
            if at in went_back:
                found[key] = route
                continue
            d = delta[at : at + ROW_WORDS]
            histogram: Histogram | None = _EMPTY
            if d[0] and changes is not None:
                histogram = self._histogram_since(route, changes, tracked.latest.get(key))
                if histogram is None:  # its totals went back within the window: all of it
                    found[key] = route
                    continue
                # The window's largest is known when the largest ever grew within it.
                histogram.max_ns = route.max_ns if d[_MAX_AT] else None
            found[key] = new_frozen(  # RouteStats(...), one per route and window
                RouteStats,
                _ROUTE_STATS_FIELDS,
                # (max_ns: the largest ever, an upper bound of the window's)
                (key, d[0], d[1], d[2], d[3], route.max_ns, d[4], d[5], d[6], tuple(d[_STATUS_AT:_KINDS_AT]),
                 tuple(d[_KINDS_AT:_MAX_AT]), histogram),
            )  # fmt: skip
        return found

    @staticmethod
    def _histogram_since(
        now: RouteStats, changes: list[dict[RouteKey, bytes]], latest: tuple[int, bytes] | None
    ) -> Histogram | None:
        """``now`` minus the histogram at the base checkpoint: minus the one at
        the newest checkpoint, plus every change after the base."""
        if latest is None:
            return None
        histogram = Histogram(now.histogram.counts, now.max_ns)
        counts = histogram.counts
        if latest[0] == now.count:
            counts[:] = _ZEROS  # nothing recorded since the newest checkpoint
        elif not subtract_packed(counts, latest[1]):
            return None
        for found in changes:
            change = found.get(now.key)
            if change is not None and (change == _WENT_BACK or not add_packed(counts, change)):
                return None
        return histogram


_EMPTY = Histogram()
_ZEROS = array("Q", bytes(8 * HIST_BUCKETS))


def _ordered(
    slots: Mapping[RouteKey, int], routes: Mapping[RouteKey, RouteStats]
) -> tuple[list[RouteStats | None], list[RouteStats]]:
    """``routes`` in the order of their slots (None where a slot's route is
    not in ``routes``), and those without a slot."""
    ordered: list[RouteStats | None] = [None] * len(slots)
    unplaced = []
    for key, route in routes.items():
        slot = slots.get(key)
        if slot is None:
            unplaced.append(route)
        else:
            ordered[slot] = route
    return ordered, unplaced


def _rows(ordered: list[RouteStats | None]) -> array[int]:
    """The counters (``_row``) of each route, one row per slot (zeros for None)."""
    return array("Q", chain.from_iterable(_ZERO_ROW if r is None else _row(r) for r in ordered))


def _behind(now: array[int], then: array[int], at: int) -> bool:
    return any(a < b for a, b in zip(now[at : at + ROW_WORDS], then[at : at + ROW_WORDS]))


def _row(route: RouteStats) -> tuple[int, ...]:
    return (
        route.count,
        route.errors,
        route.slow,
        route.sum_ns,
        route.bytes_in,
        route.bytes_out,
        route.ttfb_sum_ns,
        *route.status_classes,
        *route.error_kinds,
        route.max_ns,
    )


def _marks_bytes(marks: _AppMarks) -> int:
    return (
        marks.rows.buffer_info()[1] * marks.rows.itemsize
        + sum(len(change) for change in marks.changes.values())
        + _ENTRY_OVERHEAD * (len(marks.changes) + 1)
    )


def _scalars(counters: CounterTotals) -> CounterTotals:
    """The counters without the overhead histogram: a window needs the counts
    (its mean overhead), and a histogram per checkpoint would cost 17 KB each."""
    kept = counters.copy()
    kept.overhead_histogram = _EMPTY
    return kept


def _counters_delta(now: CounterTotals, then: CounterTotals | None) -> CounterTotals:
    """The window's counts; its overhead histogram is left empty (see _scalars)."""
    delta = _scalars(now)
    if then is None:
        return delta
    for f in fields(CounterTotals):
        if f.name not in ("overhead_max_ns", "overhead_histogram"):  # the max: an upper bound for the window
            setattr(delta, f.name, max(0, getattr(now, f.name) - getattr(then, f.name)))
    return delta
