"""Prometheus /metrics: a prometheus_client custom collector over the daemon's
latest tick. Nothing is registered globally; each daemon has its own registry.

The guide's alert rules use ``network_profiling_memory_mb``,
``network_profiling_overhead_ms`` and ``increase(network_profiling_auto_disables[5m])``,
so those names stay as printed (the auto-disable count is a gauge: as a
counter, prometheus_client would expose it as ``..._total``). Base-unit twins
(``_bytes``, ``_seconds``) sit beside them for users who follow Prometheus naming.

The exposition (:class:`Exposition`) never runs on the event loop: with
thousands of routes it is megabytes of text and seconds of Python. The
per-route families are rendered in a worker thread from the tick's routes
(which nothing changes once a tick made them); the few other families, which
read state the loop changes, are taken on the loop first. One render at a time,
at most one per tick, kept gzipped: scrapes at the same tick share it, and a
scrape during a render waits for that one.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from netprof_core import ErrorKind, Histogram
from netprof_core._layout import bucket_index

from .summary import STATUS_CLASS_NAMES

if TYPE_CHECKING:
    from .daemon import Daemon
    from .store import AppState

__all__ = ("BUCKETS_SECONDS", "Exposition", "NetprofCollector", "route_families")

# The exposed duration buckets. Each bound falls inside one of the segment's
# log-linear buckets, which is counted below it: a bound is exact to within
# that bucket's width (1/64 of its value, 1.6 %).
BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BUCKET_LAST_INDEX = tuple(bucket_index(int(bound * 1e9)) for bound in BUCKETS_SECONDS)
BUCKET_NAMES = (*(repr(bound) for bound in BUCKETS_SECONDS), "+Inf")
_ROUTE_LABELS = ["app", "route", "method", "direction"]
GZIP_LEVEL = 1  # metrics text shrinks 20-fold even so, at a few ms per MB
ROUTES_PER_CHUNK = 512  # a render holds one family's samples of this many routes at once


def prometheus_buckets(histogram: Histogram) -> tuple[float, ...]:
    """Cumulative counts at BUCKETS_SECONDS and +Inf (the bounds: BUCKET_NAMES)."""
    cumulative = []
    seen = 0
    index_at = 0
    counts = histogram.counts
    for last in _BUCKET_LAST_INDEX:
        seen += sum(counts[index_at : last + 1])
        index_at = last + 1
        cumulative.append(float(seen))
    cumulative.append(float(histogram.count))
    return tuple(cumulative)


@dataclass(frozen=True, slots=True)
class _RouteRow:
    """What the per-route families show of one route. Taken from the tick's
    statistics first, so that a render formatting for seconds does not keep
    them (17 KB a route) while the ticks make newer ones."""

    labels: list[str]
    status_classes: tuple[int, ...]
    error_kinds: tuple[int, ...]
    slow: int
    bytes_in: int
    bytes_out: int
    buckets: tuple[float, ...]  # cumulative, at BUCKET_NAMES
    sum_seconds: float


def _route_rows(apps: Mapping[str, AppState]) -> list[_RouteRow]:
    """Every route of ``apps``, in the order they are shown."""
    return [
        _RouteRow(
            [name, key.template, key.method, key.direction.name.lower()],
            route.status_classes,
            route.error_kinds,
            route.slow,
            route.bytes_in,
            route.bytes_out,
            prometheus_buckets(route.histogram),
            route.sum_ns / 1e9,
        )
        for name, state in sorted(apps.items())
        for key, route in sorted(state.routes.items(), key=lambda item: str(item[0]))
    ]


def route_families(apps: Mapping[str, AppState]) -> Iterator[Metric]:
    """The per-route families, each built when the one before has been taken."""
    rows = _route_rows(apps)
    for build in _ROUTE_FAMILIES:
        yield build(rows)


def _requests(rows: list[_RouteRow]) -> Metric:
    family = CounterMetricFamily(
        "network_profiling_requests", "Requests recorded", labels=[*_ROUTE_LABELS, "status"]
    )
    for row in rows:
        for status, count in zip(STATUS_CLASS_NAMES, row.status_classes):
            if count:
                family.add_metric([*row.labels, status], count)
    return family


def _errors(rows: list[_RouteRow]) -> Metric:
    family = CounterMetricFamily(
        "network_profiling_request_errors",
        "Failed requests by kind of failure",
        labels=[*_ROUTE_LABELS, "kind"],
    )
    for row in rows:
        for kind, count in zip(ErrorKind, row.error_kinds):
            if count:
                family.add_metric([*row.labels, kind.name.lower()], count)
    return family


def _slow(rows: list[_RouteRow]) -> Metric:
    family = CounterMetricFamily(
        "network_profiling_slow_requests", "Requests slower than slow_request_threshold", labels=_ROUTE_LABELS
    )
    for row in rows:
        family.add_metric(row.labels, row.slow)
    return family


def _transferred(rows: list[_RouteRow]) -> Metric:
    family = CounterMetricFamily(
        "network_profiling_transferred_bytes",
        "Body bytes received (in) and sent (out)",
        labels=[*_ROUTE_LABELS, "flow"],
    )
    for row in rows:
        family.add_metric([*row.labels, "in"], row.bytes_in)
        family.add_metric([*row.labels, "out"], row.bytes_out)
    return family


def _durations(rows: list[_RouteRow]) -> Metric:
    family = HistogramMetricFamily(
        "network_profiling_request_duration_seconds", "Request durations", labels=_ROUTE_LABELS, unit=""
    )
    for row in rows:
        family.add_metric(row.labels, list(zip(BUCKET_NAMES, row.buckets)), row.sum_seconds)
    return family


class _Families(Collector):
    """Families already made (or made as they are taken), as generate_latest wants them."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def render_gzipped(apps: list[dict[str, AppState]], families: list[Metric]) -> bytes:
    """The exposition text of the per-route families of the applications
    ``apps`` holds (taken out of it, and let go once their rows are made) and
    of ``families``, gzipped. The per-route families are rendered
    ROUTES_PER_CHUNK routes at a time, a family's later chunks without its HELP
    and TYPE lines: the text is generate_latest's for the whole families, while
    what is held at once stays small whatever the number of routes. It reads
    nothing but the routes of the applications, which a tick makes and nothing
    changes after: this runs in a worker thread while the loop ticks on."""
    rows = _route_rows(apps.pop())
    gz = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # (16+: a gzip stream)
    parts = []
    for build in _ROUTE_FAMILIES:
        for start in range(0, max(1, len(rows)), ROUTES_PER_CHUNK):
            text = generate_latest(_Families([build(rows[start : start + ROUTES_PER_CHUNK])]))
            parts.append(gz.compress(text if start == 0 else _samples_only(text)))
    parts.append(gz.compress(generate_latest(_Families(families))))
    parts.append(gz.flush())
    return b"".join(parts)


def _samples_only(text: bytes) -> bytes:
    """A family's exposition text without its first two lines (# HELP, # TYPE)."""
    help_line, type_line, samples = text.split(b"\n", 2)
    if not (help_line.startswith(b"# HELP ") and type_line.startswith(b"# TYPE ")):
        raise ValueError(f"not a family's exposition: {text[:200]!r}")
    return samples


_ROUTE_FAMILIES = (_requests, _errors, _slow, _transferred, _durations)


class Exposition:
    """The /metrics body: rendered off the loop, at most once per tick, one
    render at a time (a scrape during a render waits for it and gets it: a
    burst of scrapes costs one render), kept gzipped until the next tick."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._others = NetprofCollector(daemon, routes=False)
        self._kept: tuple[tuple[int, int], bytes] | None = None  # (tick, apps) -> gzipped body
        self._rendering: asyncio.Future[bytes] | None = None
        # One thread of its own: one malloc arena (each thread that allocates
        # gets its own, and keeps its high-water mark), one render at a time.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="netprofd-metrics")

    async def gzipped(self) -> bytes:
        daemon = self.daemon
        key = (daemon.store.ticks, id(daemon.apps))
        if self._kept is not None and self._kept[0] == key:
            return self._kept[1]
        if self._rendering is None:
            self._rendering = asyncio.ensure_future(self._render(key))
        # Shielded: a scraper that goes away does not cancel the render the others wait for.
        return await asyncio.shield(self._rendering)

    async def text(self) -> bytes:
        body = await self.gzipped()
        return await asyncio.get_running_loop().run_in_executor(self._thread, gzip.decompress, body)

    async def _render(self, key: tuple[int, int]) -> bytes:
        try:
            others = list(self._others.collect())  # on the loop: they read what it changes
            loop = asyncio.get_running_loop()
            # (the apps in a list the render empties: nothing here keeps them while it formats)
            body = await loop.run_in_executor(self._thread, render_gzipped, [self.daemon.apps], others)
            self._kept = (key, body)
            return body
        finally:
            self._rendering = None


class NetprofCollector(Collector):
    """Every family when ``routes`` (the default); without the per-route ones
    when not (what :class:`Exposition` takes on the loop)."""

    def __init__(self, daemon: Daemon, *, routes: bool = True) -> None:
        self.daemon = daemon
        self.routes = routes

    def collect(self) -> Iterator[Metric]:
        daemon = self.daemon
        apps = daemon.apps
        overhead_now = daemon.overhead_by_app()
        if self.routes:
            yield from route_families(apps)

        memory_mb = GaugeMetricFamily(
            "network_profiling_memory_mb", "Shared memory of the live segments, MiB", labels=["app"]
        )
        memory_bytes = GaugeMetricFamily(
            "network_profiling_memory_bytes", "Shared memory of the live segments", labels=["app"]
        )
        overhead_ms = GaugeMetricFamily(
            "network_profiling_overhead_ms",
            "Mean cost of one record() over the last minute, ms",
            labels=["app"],
        )
        overhead_seconds = GaugeMetricFamily(
            "network_profiling_overhead_seconds",
            "Mean cost of one record() over the last minute",
            labels=["app"],
        )
        auto_disables = GaugeMetricFamily(
            "network_profiling_auto_disables", "Auto-disable events so far (a running count)", labels=["app"]
        )
        internal_errors = CounterMetricFamily(
            "network_profiling_internal_errors",
            "Errors inside netprof, caught before the app saw them",
            labels=["app"],
        )
        sampled_out = CounterMetricFamily(
            "network_profiling_sampled_out", "Requests left out by the sample rate", labels=["app"]
        )
        consecutive = GaugeMetricFamily(
            "network_profiling_consecutive_errors",
            "Largest consecutive internal errors of a process",
            labels=["app"],
        )
        enabled = GaugeMetricFamily(
            "network_profiling_enabled", "Processes recording (1 each)", labels=["app"]
        )
        processes = GaugeMetricFamily(
            "network_profiling_processes", "Live profiled processes", labels=["app"]
        )

        for name, state in sorted(apps.items()):
            memory = sum(entry.snapshot.memory_bytes for entry in state.processes)
            memory_mb.add_metric([name], memory / 2**20)
            memory_bytes.add_metric([name], memory)
            mean_ns = overhead_now.get(name, 0.0)
            overhead_ms.add_metric([name], mean_ns / 1e6)
            overhead_seconds.add_metric([name], mean_ns / 1e9)
            counters = state.counters
            made = daemon.alerting.auto_disables[name] if daemon.alerting is not None else 0
            auto_disables.add_metric([name], counters.auto_disable_events + made)
            internal_errors.add_metric([name], counters.internal_errors)
            sampled_out.add_metric([name], counters.sampled_out)
            consecutive.add_metric(
                [name], max((e.snapshot.counters.consecutive_errors for e in state.processes), default=0)
            )
            enabled.add_metric([name], sum(e.snapshot.control.recording for e in state.processes))
            processes.add_metric([name], len(state.processes))

        yield from (memory_mb, memory_bytes, overhead_ms, overhead_seconds, auto_disables)
        yield from (internal_errors, sampled_out, consecutive, enabled, processes)
        yield from self._alerting()
        up = GaugeMetricFamily("netprofd_up_seconds", "Seconds since netprofd started")
        up.add_metric([], daemon.uptime_seconds())
        yield up
        tick = GaugeMetricFamily(
            "netprofd_tick_duration_seconds", "Time the last snapshot of every segment took"
        )
        tick.add_metric([], daemon.store.last_tick_seconds)
        yield tick
        yield from self._windows()
        yield from self._store_health()
        if daemon.listener is not None:  # the HTTP connections, their cap, malformed requests (server.py)
            yield from daemon.listener.collect()

    def _windows(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The windows' memory and reach (their budget: see windows.py)."""
        history = self.daemon.history
        yield GaugeMetricFamily(
            "netprofd_window_memory_bytes",
            "What the 1m/5m/15m windows' checkpoints hold, about",
            value=history.nbytes,
        )
        yield GaugeMetricFamily(
            "netprofd_window_covered_seconds",
            "The longest span a window can cover now (15m and more when whole)",
            value=history.covered_seconds,
        )
        yield CounterMetricFamily(
            "netprofd_window_checkpoints_trimmed",
            "Checkpoints dropped early to keep the windows within budget",
            value=history.trimmed,
        )

    def _store_health(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """What the store could not read, or would not trust (issue 15: the figures never lie)."""
        daemon, store = self.daemon, self.daemon.store
        yield CounterMetricFamily(
            "netprofd_tick_failures",
            "Ticks that failed, or could not list the segments (see /healthz)",
            value=daemon.tick_failures,
        )
        yield GaugeMetricFamily(
            "netprofd_segments_quarantined",
            "Segments no longer read because their figures could not be trusted (last good figures kept)",
            value=len(store.quarantined),
        )
        yield GaugeMetricFamily(
            "netprofd_segments_refused",
            "Files in the segment directory refused as segments",
            value=store.refused_count,
        )
        errors = CounterMetricFamily(
            "netprofd_segment_errors",
            "Segments refused or quarantined, by reason (refused, identity, unreadable, backwards, overflow, "
            "unsubtractable)",
            labels=["reason"],
        )
        for reason, count in sorted(store.segment_errors.items()):
            errors.add_metric([reason], count)
        yield errors
        transient = CounterMetricFamily(
            "netprofd_transient_errors",
            "Operations that failed and are retried at the next tick, what was known standing meanwhile",
            labels=["operation"],
        )
        for operation, count in sorted(store.transient_errors.items()):
            transient.add_metric([operation], count)
        yield transient
        yield CounterMetricFamily(
            "netprofd_state_save_failures",
            "Failed saves of the retired totals (retried at each tick)",
            value=store.save_failures,
        )
        yield GaugeMetricFamily(
            "netprofd_segments_awaiting_save",
            "Ended segments kept until their folded totals are saved",
            value=len(store.awaiting_save),
        )

    def _alerting(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        alerting = self.daemon.alerting
        if alerting is None:
            return
        alerts = GaugeMetricFamily(
            "network_profiling_alerts",
            "Alerts pending or firing (1 each)",
            labels=["alertname", "app", "route", "severity", "state"],
        )
        for alert in alerting.engine.active.values():
            labels = alert.labels
            alerts.add_metric(
                [alert.rule, labels.get("app", ""), labels.get("route", ""), alert.severity, alert.phase], 1
            )
        yield alerts
        outcomes = CounterMetricFamily(
            "netprofd_notifications",
            "Notification deliveries by plugin and outcome",
            labels=["plugin", "outcome"],
        )
        for (plugin, outcome), count in sorted(alerting.dispatcher.outcomes.items()):
            outcomes.add_metric([plugin, outcome], count)
        yield outcomes
        queued = GaugeMetricFamily("netprofd_notifications_undelivered", "Deliveries waiting in the outbox")
        queued.add_metric([], len(alerting.state.pending()))
        yield queued
