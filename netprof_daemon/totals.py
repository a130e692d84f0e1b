"""Cumulative totals of one application: the sum of its live processes and of
the processes that have ended (their "retired" totals), so that no count is
ever lost and no counter ever goes backwards."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from netprof_core import Direction, Histogram, RouteKey, RouteStats, SegmentSnapshot
from netprof_core._layout import OVERFLOW_TEMPLATE
from netprof_core._recorder import core_module
from netprof_core.reader import Counters, RouteSums

if TYPE_CHECKING:
    from netprof_core._recorder_py import replace_blocks
else:
    replace_blocks = core_module().replace_blocks

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

    def add_snapshot(self, snapshot: SegmentSnapshot, sign: int = 1) -> None:
        """Add a process's counters (``sign=-1``: take them away again; the
        maximum stays, it is the largest ever seen)."""
        c = snapshot.counters
        self.requests += sign * c.requests
        self.sampled_out += sign * c.sampled_out
        self.disabled_calls += sign * c.disabled_calls
        self.internal_errors += sign * c.internal_errors
        self.auto_disable_events += sign * c.auto_disable_events
        self.overflowed_routes += sign * c.overflowed_routes
        self.overhead_count += sign * c.overhead_count
        self.overhead_sum_ns += sign * c.overhead_sum_ns
        self.overhead_max_ns = max(self.overhead_max_ns, c.overhead_max_ns)
        if c.overhead_count == 0:
            return  # an empty histogram: nothing to add or take away
        if sign > 0:
            c.overhead_histogram.add_to(self.overhead_histogram.counts)
        elif not c.overhead_histogram.subtract_from(self.overhead_histogram.counts):
            raise ValueError("subtracting counters that were never added")

    def replace_snapshot(self, old: SegmentSnapshot, new: SegmentSnapshot) -> None:
        """Swap a process's earlier counters for its new ones; the overhead
        histogram (the costly part) only when a record was timed in between."""
        if old.counters.overhead_count == new.counters.overhead_count:
            self.add_scalars(new.counters, old.counters)
        else:
            self.add_snapshot(old, -1)
            self.add_snapshot(new)

    def add_scalars(self, now: Counters, then: Counters) -> None:
        self.requests += now.requests - then.requests
        self.sampled_out += now.sampled_out - then.sampled_out
        self.disabled_calls += now.disabled_calls - then.disabled_calls
        self.internal_errors += now.internal_errors - then.internal_errors
        self.auto_disable_events += now.auto_disable_events - then.auto_disable_events
        self.overflowed_routes += now.overflowed_routes - then.overflowed_routes
        self.overhead_sum_ns += now.overhead_sum_ns - then.overhead_sum_ns
        self.overhead_max_ns = max(self.overhead_max_ns, now.overhead_max_ns)

    def add(self, other: CounterTotals) -> None:
        for f in fields(self):
            if f.name == "overhead_max_ns":
                self.overhead_max_ns = max(self.overhead_max_ns, other.overhead_max_ns)
            elif f.name == "overhead_histogram":
                self.overhead_histogram += other.overhead_histogram
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def copy(self) -> CounterTotals:
        # What CounterTotals().add(self) gives (apps() copies at every change), field by field.
        twin = CounterTotals(
            self.requests,
            self.sampled_out,
            self.disabled_calls,
            self.internal_errors,
            self.auto_disable_events,
            self.overflowed_routes,
            self.overhead_count,
            self.overhead_sum_ns,
            max(0, self.overhead_max_ns),
        )
        twin.overhead_histogram += self.overhead_histogram
        return twin

    @property
    def overhead_mean_ns(self) -> float:
        return self.overhead_sum_ns / self.overhead_count if self.overhead_count else 0.0


@dataclass(slots=True)
class Totals:
    """Counters and per-route sums over processes (route blocks, added in place)."""

    counters: CounterTotals = field(default_factory=CounterTotals)
    sums: dict[RouteKey, RouteSums] = field(default_factory=dict)

    # The sums of each route of a route table, by route id: what replace_blocks
    # adds into. Keyed by the table's identity (a reader hands out the same
    # tuple while its table does not grow, and processes of one application
    # share it), with the table kept so that its id is not reused.
    _by_table: dict[int, tuple[tuple[RouteKey, ...], list[RouteSums]]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def add_snapshot(self, snapshot: SegmentSnapshot) -> None:
        self.counters.add_snapshot(snapshot)
        replace_blocks((), snapshot.blocks, self._route_sums(snapshot.route_keys))

    def subtract_snapshot(self, snapshot: SegmentSnapshot) -> None:
        self.counters.add_snapshot(snapshot, -1)
        replace_blocks(snapshot.blocks, (), self._route_sums(snapshot.route_keys))

    def replace_snapshot(self, old: SegmentSnapshot, new: SegmentSnapshot) -> None:
        """Swap a process's earlier snapshot for its new one, touching only the
        routes that recorded in between (a route block changes only with its
        count; refresh() shares the blocks of routes that did not move)."""
        self.counters.replace_snapshot(old, new)
        # The routes of the new snapshot (a route table never shrinks).
        replace_blocks(old.blocks[: len(new.blocks)], new.blocks, self._route_sums(new.route_keys))

    def _route_sums(self, keys: tuple[RouteKey, ...]) -> list[RouteSums]:
        found = self._by_table.get(id(keys))
        if found is not None and found[0] is keys:
            return found[1]
        if len(self._by_table) >= 256:
            self._by_table.clear()  # a bound: tables are few, and rebuilt at once
        sums = [self._route(key) for key in keys]
        self._by_table[id(keys)] = (keys, sums)
        return sums

    def _route(self, key: RouteKey) -> RouteSums:
        route = self.sums.get(key)
        if route is None:
            route = self.sums[key] = RouteSums(key)
        return route

    def add(self, other: Totals) -> None:
        self.counters.add(other.counters)
        for key, route in other.sums.items():
            mine = self.sums.get(key)
            if mine is None:
                self.sums[key] = route.copy()
            else:
                mine.add(route)

    def route_stats(self) -> dict[RouteKey, RouteStats]:
        """Each route's statistics; the overflow route only once it was used."""
        return {
            key: route.stats()
            for key, route in self.sums.items()
            if route.count or key.template != OVERFLOW_TEMPLATE
        }

    # -- persistence (the daemon's state_dir), so retired totals survive a restart

    def to_json(self) -> dict[str, Any]:
        counters = {
            f.name: getattr(self.counters, f.name)
            for f in fields(CounterTotals)
            if f.name != "overhead_histogram"
        }
        counters["overhead_histogram"] = list(self.counters.overhead_histogram.nonzero())
        routes = [
            {
                "direction": int(key.direction),
                "method": key.method,
                "template": key.template,
                "max_ns": route.max_ns,
                "words": [[i, w] for i, w in enumerate(route.words) if w],
            }
            for key, route in self.sums.items()
        ]
        return {"counters": counters, "routes": routes}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Totals:
        raw = dict(data["counters"])
        overhead = Histogram(max_ns=raw.get("overhead_max_ns"))
        for index, count in raw.pop("overhead_histogram"):
            overhead.counts[index] = count
        totals = cls(CounterTotals(**raw, overhead_histogram=overhead))
        for route in data["routes"]:
            key = RouteKey(Direction(route["direction"]), route["method"], route["template"])
            sums = totals.sums[key] = RouteSums(key)
            sums.max_ns = int(route["max_ns"])
            for index, word in route["words"]:
                sums.words[index] = word
        return totals
