"""Rates and percentiles over the last 1 m / 5 m / 15 m, from snapshot deltas.

Each tick the daemon keeps a checkpoint of every application's cumulative
totals; a window's statistics are the current totals minus the checkpoint
taken a window ago (histograms subtract bucket by bucket, exactly). Checkpoints
are kept every tick for the last FINE_SECONDS, then every COARSE_SPACING
seconds up to the longest window; histograms are stored compressed, and an
unchanged route shares its previous checkpoint's bytes, so memory stays small.
"""

from __future__ import annotations

import bisect
import zlib
from collections import deque
from dataclasses import dataclass, field, fields, replace

from netprof_core import Histogram, RouteKey, RouteStats

from .store import AppState
from .totals import CounterTotals

__all__ = ("WINDOWS", "Window", "WindowHistory", "parse_window")

WINDOWS: dict[str, float] = {"1m": 60.0, "5m": 300.0, "15m": 900.0}
FINE_SECONDS = 120.0
COARSE_SPACING = 10.0
KEEP_SECONDS = max(WINDOWS.values()) + 2 * COARSE_SPACING


def parse_window(text: str) -> float | None:
    """Seconds of a window name (``1m``, ``5m``, ``15m``), None for ``all``;
    ValueError for anything else."""
    if text == "all":
        return None
    if text in WINDOWS:
        return WINDOWS[text]
    raise ValueError(f"window must be one of 1m, 5m, 15m, all; got {text!r}")


@dataclass(frozen=True, slots=True)
class _RouteMark:
    count: int
    route: RouteStats  # scalars only are used; its histogram is dropped to save memory
    packed_histogram: bytes


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    taken_ns: int
    counters: dict[str, CounterTotals]
    routes: dict[str, dict[RouteKey, _RouteMark]]


@dataclass(slots=True)
class Window:
    """What one application did between two checkpoints."""

    seconds: float  # the span actually covered (shorter than asked right after start)
    counters: CounterTotals = field(default_factory=CounterTotals)
    routes: dict[RouteKey, RouteStats] = field(default_factory=dict)


class WindowHistory:
    def __init__(self) -> None:
        self._fine: deque[_Checkpoint] = deque()
        self._coarse: deque[_Checkpoint] = deque()

    def __len__(self) -> int:
        return len(self._fine) + len(self._coarse)

    def add(self, taken_ns: int, apps: dict[str, AppState]) -> None:
        previous = self._fine[-1] if self._fine else None
        routes: dict[str, dict[RouteKey, _RouteMark]] = {}
        for name, state in apps.items():
            marks = routes[name] = {}
            before = previous.routes.get(name, {}) if previous else {}
            for key, route in state.routes.items():
                old = before.get(key)
                if old is not None and old.count == route.count:
                    marks[key] = old  # unchanged: share the bytes
                else:
                    packed = zlib.compress(route.histogram.counts.tobytes(), 1)
                    marks[key] = _RouteMark(route.count, replace(route, histogram=_EMPTY), packed)
        counters = {name: _scalars(state.counters) for name, state in apps.items()}
        checkpoint = _Checkpoint(taken_ns, counters, routes)
        self._fine.append(checkpoint)
        # Move checkpoints past the fine horizon to the coarse list, one per spacing.
        while self._fine and taken_ns - self._fine[0].taken_ns > FINE_SECONDS * 1e9:
            aged = self._fine.popleft()
            if not self._coarse or aged.taken_ns - self._coarse[-1].taken_ns >= COARSE_SPACING * 1e9:
                self._coarse.append(aged)
        while self._coarse and taken_ns - self._coarse[0].taken_ns > KEEP_SECONDS * 1e9:
            self._coarse.popleft()

    def _checkpoint_before(self, target_ns: int) -> _Checkpoint | None:
        """The latest checkpoint taken at or before ``target_ns``, else the oldest."""
        ordered = list(self._coarse) + list(self._fine)
        if not ordered:
            return None
        at = bisect.bisect_right([c.taken_ns for c in ordered], target_ns)
        return ordered[at - 1] if at else ordered[0]

    def window(
        self, apps: dict[str, AppState], now_ns: int, seconds: float, *, histograms: bool = True
    ) -> dict[str, Window]:
        """Per application, what happened in the last ``seconds``. With
        ``histograms=False`` the routes' histograms are left empty (the costly
        part: for counts and rates they are not needed)."""
        base = self._checkpoint_before(now_ns - int(seconds * 1e9))
        result: dict[str, Window] = {}
        for name, state in apps.items():
            if base is None:
                result[name] = Window(0.0)
                continue
            old_routes = base.routes.get(name, {})
            result[name] = Window(
                (now_ns - base.taken_ns) / 1e9,
                _counters_delta(state.counters, base.counters.get(name)),
                {
                    key: _route_delta(route, old_routes.get(key), histograms)
                    for key, route in state.routes.items()
                },
            )
        return result


_EMPTY = Histogram()
_SCALARS = ("count", "errors", "slow", "sum_ns", "bytes_in", "bytes_out", "ttfb_sum_ns")


def _route_delta(now: RouteStats, old: _RouteMark | None, histograms: bool = True) -> RouteStats:
    if old is None:
        return now
    then = old.route
    if now.count < then.count:  # cannot happen with retired totals; never show a negative
        return now
    if not histograms:
        histogram = _EMPTY
    elif now.count == then.count:
        histogram = _EMPTY  # nothing recorded in the window
    else:
        try:
            histogram = now.histogram - Histogram.from_bytes(zlib.decompress(old.packed_histogram))
        except ValueError:  # not an earlier state (totals restored from an older file): show all
            return now
    return replace(
        now,
        **{name: getattr(now, name) - getattr(then, name) for name in _SCALARS},
        status_classes=tuple(a - b for a, b in zip(now.status_classes, then.status_classes)),
        error_kinds=tuple(a - b for a, b in zip(now.error_kinds, then.error_kinds)),
        histogram=histogram,
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
