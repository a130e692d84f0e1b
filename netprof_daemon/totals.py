"""Cumulative totals of one application: the sum of its live processes and of
the processes that have ended (their "retired" totals), so that no count is
ever lost and no counter ever goes backwards."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from netprof_core import Direction, Histogram, RouteKey, RouteStats, SegmentSnapshot

__all__ = ("CounterTotals", "Totals")


@dataclass(slots=True)
class CounterTotals:
    """The segment-wide counters that add up across processes."""

    requests: int = 0
    sampled_out: int = 0
    disabled_calls: int = 0
    internal_errors: int = 0
    auto_disable_events: int = 0
    overflowed_routes: int = 0
    overhead_count: int = 0
    overhead_sum_ns: int = 0
    overhead_max_ns: int = 0
    overhead_histogram: Histogram = field(default_factory=Histogram)

    def add_snapshot(self, snapshot: SegmentSnapshot) -> None:
        c = snapshot.counters
        self.requests += c.requests
        self.sampled_out += c.sampled_out
        self.disabled_calls += c.disabled_calls
        self.internal_errors += c.internal_errors
        self.auto_disable_events += c.auto_disable_events
        self.overflowed_routes += c.overflowed_routes
        self.overhead_count += c.overhead_count
        self.overhead_sum_ns += c.overhead_sum_ns
        self.overhead_max_ns = max(self.overhead_max_ns, c.overhead_max_ns)
        self.overhead_histogram += c.overhead_histogram

    def add(self, other: CounterTotals) -> None:
        for f in fields(self):
            if f.name == "overhead_max_ns":
                self.overhead_max_ns = max(self.overhead_max_ns, other.overhead_max_ns)
            elif f.name == "overhead_histogram":
                self.overhead_histogram += other.overhead_histogram
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def copy(self) -> CounterTotals:
        twin = CounterTotals()
        twin.add(self)
        return twin

    @property
    def overhead_mean_ns(self) -> float:
        return self.overhead_sum_ns / self.overhead_count if self.overhead_count else 0.0


@dataclass(slots=True)
class Totals:
    """Counters and per-route statistics, summed over processes."""

    counters: CounterTotals = field(default_factory=CounterTotals)
    routes: dict[RouteKey, RouteStats] = field(default_factory=dict)

    def add_snapshot(self, snapshot: SegmentSnapshot) -> None:
        self.counters.add_snapshot(snapshot)
        self.add_routes(snapshot.routes)

    def add_routes(self, routes: Iterable[RouteStats]) -> None:
        for route in routes:
            if route.count == 0 and route.key.template == "<other>":
                continue  # the overflow route, never used: not worth a series
            known = self.routes.get(route.key)
            self.routes[route.key] = route if known is None else known + route

    def add(self, other: Totals) -> None:
        self.counters.add(other.counters)
        self.add_routes(other.routes.values())

    def copy(self) -> Totals:
        twin = Totals()
        twin.add(self)
        return twin

    # -- persistence (the daemon's state_dir), so retired totals survive a restart

    def to_json(self) -> dict[str, Any]:
        counters = {
            f.name: getattr(self.counters, f.name) for f in fields(CounterTotals) if f.name != "overhead_histogram"
        }
        counters["overhead_histogram"] = list(self.counters.overhead_histogram.nonzero())
        return {
            "counters": counters,
            "routes": [_route_to_json(route) for route in self.routes.values()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Totals:
        raw = dict(data["counters"])
        overhead = _histogram_from_pairs(raw.pop("overhead_histogram"), raw.get("overhead_max_ns"))
        totals = cls(CounterTotals(**raw, overhead_histogram=overhead))
        totals.add_routes(_route_from_json(route) for route in data["routes"])
        return totals


_ROUTE_SCALARS = ("count", "errors", "slow", "sum_ns", "max_ns", "bytes_in", "bytes_out", "ttfb_sum_ns")


def _route_to_json(route: RouteStats) -> dict[str, Any]:
    out: dict[str, Any] = {
        "direction": int(route.key.direction),
        "method": route.key.method,
        "template": route.key.template,
    }
    out.update((name, getattr(route, name)) for name in _ROUTE_SCALARS)
    out["status_classes"] = list(route.status_classes)
    out["error_kinds"] = list(route.error_kinds)
    out["histogram"] = list(route.histogram.nonzero())
    return out


def _route_from_json(data: Mapping[str, Any]) -> RouteStats:
    key = RouteKey(Direction(data["direction"]), data["method"], data["template"])
    return RouteStats(
        key=key,
        **{name: int(data[name]) for name in _ROUTE_SCALARS},
        status_classes=tuple(data["status_classes"]),
        error_kinds=tuple(data["error_kinds"]),
        histogram=_histogram_from_pairs(data["histogram"], data["max_ns"]),
    )


def _histogram_from_pairs(pairs: Iterable[Iterable[int]], max_ns: int | None) -> Histogram:
    histogram = Histogram(max_ns=max_ns)
    for index, count in pairs:
        histogram.counts[index] = count
    return histogram
