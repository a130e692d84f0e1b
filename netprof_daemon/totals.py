"""Cumulative totals of one application: the sum of its live processes and of
the processes that have ended (their "retired" totals), so that no count is
ever lost and no counter ever goes backwards."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from netprof_core import Direction, Histogram, RouteKey, RouteStats, SegmentSnapshot
from netprof_core._layout import HIST_BUCKETS, OVERFLOW_TEMPLATE, ROUTE_BLOCK_WORDS
from netprof_core._recorder import core_module
from netprof_core.histogram import U64_MAX, saturating_add
from netprof_core.reader import Counters, RouteSums

if TYPE_CHECKING:
    from netprof_core._recorder_py import replace_blocks, replace_packed
else:
    replace_blocks, replace_packed = core_module().replace_blocks, core_module().replace_packed

__all__ = ("CounterTotals", "SumRefused", "Totals")

# The counters of one writer that only ever grow (consecutive_errors does
# not: a success or a reset clears it; it is not summed).
_GROWING = (
    "requests",
    "sampled_out",
    "disabled_calls",
    "internal_errors",
    "auto_disable_events",
    "overflowed_routes",
    "overhead_count",
    "overhead_sum_ns",
    "overhead_max_ns",
)


class SumRefused(ValueError):
    """A process's figures that the sums cannot take: a counter of one writer
    went backwards between two snapshots ("backwards"), a sum would pass
    2**64 - 1 ("overflow"), or figures to take away were never added
    ("unsubtractable"). Raised before anything changed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{detail}: {_REFUSALS.get(reason, reason)}")
        self.reason = reason
        self.detail = detail


_REFUSALS = {
    "backwards": "a counter went backwards",
    "overflow": "a sum would pass 2**64 - 1",
    "unsubtractable": "figures to take away were never added",
}


def check_forward(old: SegmentSnapshot, new: SegmentSnapshot) -> None:
    """SumRefused unless every counter of ``new`` is at least what it was in
    ``old`` (two snapshots of one segment, in order) and its route table did
    not shrink. The route blocks' and histogram's words are checked as they
    are swapped in (replace_blocks, replace_packed)."""
    then, now = old.counters, new.counters
    for name in _GROWING:
        before, after = getattr(then, name), getattr(now, name)
        if after < before:
            raise SumRefused("backwards", f"its {name} went from {before} to {after}")
    if len(new.blocks) < len(old.blocks):
        raise SumRefused(
            "backwards", f"its route table went from {len(old.blocks)} to {len(new.blocks)} routes"
        )


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

    def add_scalars(self, now: Counters, then: Counters | None = None, sign: int = 1) -> None:
        """Add ``sign * (now - then)`` to the counters (Python ints: exact); the
        maximum only grows (the largest ever seen)."""
        for name in _GROWING[:-1]:
            delta = getattr(now, name) - (getattr(then, name) if then is not None else 0)
            setattr(self, name, getattr(self, name) + sign * delta)
        self.overhead_max_ns = max(self.overhead_max_ns, now.overhead_max_ns)

    def add_histogram(self, counters: Counters, *, saturate: bool) -> None:
        """Add a process's overhead histogram: SumRefused if a bucket would pass
        2**64 - 1, unless ``saturate`` (then it stays there)."""
        if counters.overhead_count == 0:
            return  # an empty histogram: nothing to add
        if counters.overhead_histogram.add_to(self.overhead_histogram.counts):
            return
        if not saturate:
            raise SumRefused("overflow", "its overhead histogram")
        saturating_add(self.overhead_histogram.counts, counters.overhead_histogram.counts)

    def subtract_histogram(self, counters: Counters) -> None:
        if counters.overhead_count and not counters.overhead_histogram.subtract_from(
            self.overhead_histogram.counts
        ):
            raise SumRefused("unsubtractable", "its overhead histogram")

    def replace_histogram(self, old: Counters, new: Counters, *, check: bool = True) -> bool:
        """Swap a process's overhead histogram (only when a record was timed in
        between: the costly part); whether it moved. SumRefused as
        replace_packed refuses (``check``: a bucket going down is refused too)."""
        if old.overhead_count == new.overhead_count:
            return False
        refused = replace_packed(
            self.overhead_histogram.counts,
            old.overhead_histogram.packed() if old.overhead_count else None,
            new.overhead_histogram.packed() if new.overhead_count else None,
            check,
        )
        if refused is not None:
            raise SumRefused(refused, "its overhead histogram")
        return True

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

    def add_snapshot(self, snapshot: SegmentSnapshot, *, saturate: bool = False) -> None:
        """Add a process's figures. SumRefused, nothing changed, if a sum would
        pass 2**64 - 1, unless ``saturate``: for sums that are only ever added
        to (retired totals), where such a sum stays at 2**64 - 1."""
        counters, c = self.counters, snapshot.counters
        counters.add_histogram(c, saturate=saturate)
        sums = self._route_sums(snapshot.route_keys)
        refused = replace_blocks((), snapshot.blocks, sums)
        if refused is not None:
            if not saturate:
                counters.subtract_histogram(c)
                route, reason = refused
                raise SumRefused(reason, f"route {sums[route].key}")
            for block, route_sums in zip(snapshot.blocks, sums):
                route_sums.add_block(block)  # (saturating where it must)
        counters.add_scalars(c)

    def subtract_snapshot(self, snapshot: SegmentSnapshot) -> None:
        """Take away a process's figures added before (the maximum stays: the
        largest ever seen); SumRefused, nothing changed, if they never were."""
        counters, c = self.counters, snapshot.counters
        counters.subtract_histogram(c)
        sums = self._route_sums(snapshot.route_keys)
        refused = replace_blocks(snapshot.blocks, (), sums)
        if refused is not None:
            counters.add_histogram(c, saturate=True)  # back as it was (it fitted)
            route, reason = refused
            raise SumRefused(reason, f"route {sums[route].key}")
        counters.add_scalars(c, sign=-1)

    def replace_snapshot(self, old: SegmentSnapshot, new: SegmentSnapshot) -> None:
        """Swap a process's earlier snapshot for its new one, touching only the
        routes that recorded in between (a route block changes only with its
        count; refresh() shares the blocks of routes that did not move).
        SumRefused, nothing changed, if a counter of the process went
        backwards or a sum would pass 2**64 - 1."""
        check_forward(old, new)
        counters = self.counters
        moved = counters.replace_histogram(old.counters, new.counters)
        # The routes of the new snapshot (a route table never shrinks: checked).
        sums = self._route_sums(new.route_keys)
        refused = replace_blocks(old.blocks, new.blocks, sums)
        if refused is not None:
            if moved:
                counters.replace_histogram(new.counters, old.counters, check=False)
            route, reason = refused
            raise SumRefused(reason, f"route {sums[route].key}")
        counters.add_scalars(new.counters, old.counters)

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
        """The totals :meth:`to_json` saved; ValueError naming what is wrong."""
        raw = dict(data["counters"])
        overhead = Histogram(max_ns=_u64(raw.get("overhead_max_ns", 0), "overhead_max_ns"))
        for index, count in raw.pop("overhead_histogram"):
            overhead.counts[_index(index, HIST_BUCKETS)] = _u64(count, "overhead_histogram")
        unknown = raw.keys() - {f.name for f in fields(CounterTotals)}
        if unknown:
            raise ValueError(f"unknown counters {sorted(unknown)}")
        scalars = {name: _count(value, name) for name, value in raw.items()}
        totals = cls(CounterTotals(**scalars, overhead_histogram=overhead))
        for route in data["routes"]:
            key = RouteKey(Direction(route["direction"]), str(route["method"]), str(route["template"]))
            sums = totals.sums[key] = RouteSums(key)
            sums.max_ns = _u64(route["max_ns"], f"{key} max_ns")
            for index, word in route["words"]:
                sums.words[_index(index, ROUTE_BLOCK_WORDS)] = _u64(word, f"{key} words")
        return totals


def _count(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{what}: {value!r} is not a count")
    return value


def _u64(value: object, what: str) -> int:
    if _count(value, what) > U64_MAX:
        raise ValueError(f"{what}: {value!r} is past 2**64 - 1")
    return value  # type: ignore[return-value]


def _index(value: object, size: int) -> int:
    if type(value) is not int or not 0 <= value < size:
        raise ValueError(f"index {value!r} out of range for {size} words")
    return value
