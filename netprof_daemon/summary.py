"""The JSON shapes of the API: statistics of a route, a direction, an application."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from netprof_core import Direction, ErrorKind, Histogram, RequestRecord, RouteStats
from netprof_core._layout import bucket_bounds

__all__ = ("QUANTILES", "direction_summary", "largest", "quantiles", "record_json", "route_summary")

QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99))
STATUS_CLASS_NAMES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")


def quantiles(histogram: Histogram, qs: Sequence[float], cap_ns: int | None = None) -> list[float]:
    """The nearest-rank quantiles of ``histogram`` in ns (NaN when empty), in
    one pass; none above ``cap_ns`` (default: the histogram's ``max_ns``), an
    upper bound of every duration in it."""
    total = histogram.count
    if total == 0:
        return [math.nan] * len(qs)
    ranks = sorted((max(1, math.ceil(q * total)), at) for at, q in enumerate(qs))
    found = [math.nan] * len(qs)
    seen = 0
    pending = iter(ranks)
    rank, at = next(pending)
    cap_ns = histogram.max_ns if cap_ns is None else cap_ns
    cap = math.inf if cap_ns is None else float(cap_ns)
    for index, count in histogram.nonzero():
        seen += count
        while seen >= rank:
            lower, upper = bucket_bounds(index)
            found[at] = min((lower + upper) / 2, cap)
            try:
                rank, at = next(pending)
            except StopIteration:
                return found
    return found


def largest(route: RouteStats) -> tuple[float, bool]:
    """The largest duration (ns) of ``route``'s requests, and whether it is
    exactly that. A histogram that knows its maximum gives it: the cumulative
    one, and a window's when the largest ever grew within the window. Otherwise
    only the highest non-empty bucket is known: its top, capped by the largest
    ever (``route.max_ns``), an upper bound within one bucket (1/64) of the truth."""
    histogram = route.histogram
    if histogram.max_ns is not None:
        return float(histogram.max_ns), True
    top = -1
    for index, _ in histogram.nonzero():
        top = index
    if top < 0:
        return math.nan, False
    return float(min(bucket_bounds(top)[1] - 1, route.max_ns)), False


def _ms(ns: float) -> float | None:
    """ns as ms, to the ns: a rounding to 0.1 µs would put values near 1 µs
    up to 5 % off."""
    return None if math.isnan(ns) else round(ns / 1e6, 6)


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 3) if whole else 0.0


def route_summary(route: RouteStats, seconds: float | None) -> dict[str, Any]:
    """Counts, rates and latency of one route over a window (``seconds``: its span)."""
    values = quantiles(route.histogram, [q for _, q in QUANTILES], cap_ns=route.max_ns)
    maximum, exact = largest(route)
    summary: dict[str, Any] = {
        "direction": route.key.direction.name.lower(),
        "method": route.key.method,
        "route": route.key.template,
        "count": route.count,
        "rate_per_second": round(route.count / seconds, 4) if seconds else None,
        "errors": route.errors,
        "error_percent": _percent(route.errors, route.count),
        "slow": route.slow,
        "slow_percent": _percent(route.slow, route.count),
        "mean_ms": _ms(route.sum_ns / route.count) if route.count else None,
    }
    summary.update((f"{name}_ms", _ms(value)) for (name, _), value in zip(QUANTILES, values))
    summary["max_ms"] = _ms(maximum)
    summary["max_exact"] = exact  # false: max_ms is an upper bound (see largest())
    summary["bytes_in"] = route.bytes_in
    summary["bytes_out"] = route.bytes_out
    summary["status_classes"] = {
        name: count for name, count in zip(STATUS_CLASS_NAMES, route.status_classes) if count
    }
    summary["error_kinds"] = {
        kind.name.lower(): count for kind, count in zip(ErrorKind, route.error_kinds) if count
    }
    return summary


def direction_summary(
    routes: Iterable[RouteStats], direction: Direction, seconds: float | None
) -> dict[str, Any]:
    """One direction's routes summed into one line."""
    total: RouteStats | None = None
    for route in routes:
        if route.key.direction is direction:
            total = route if total is None else total + route
    if total is None:
        return {"count": 0, "rate_per_second": 0.0 if seconds else None, "errors": 0, "error_percent": 0.0}
    summary = route_summary(total, seconds)
    for key in ("direction", "method", "route"):
        summary.pop(key)
    return summary


def _error_kind(record: RequestRecord) -> str | None:
    if not record.error:
        return None
    if record.error_kind is ErrorKind.NONE:
        return "http_status"  # a 5xx answer, no exception
    return record.error_kind.name.lower()


def record_json(record: RequestRecord, app: str, pid: int) -> dict[str, Any]:
    return {
        "app": app,
        "pid": pid,
        "time": record.wall_ns / 1e9,
        "direction": record.route.direction.name.lower(),
        "method": record.route.method,
        "route": record.route.template,
        "status": record.status,
        "duration_ms": _ms(record.duration_ns),
        "ttfb_ms": _ms(record.ttfb_ns) if record.ttfb_ns else None,
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "slow": record.slow,
        "error": record.error,
        "error_kind": _error_kind(record),
    }
