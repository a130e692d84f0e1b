"""Prometheus /metrics: a prometheus_client custom collector over the daemon's
latest tick. Nothing is registered globally; each daemon has its own registry.

The guide's alert rules use ``network_profiling_memory_mb``,
``network_profiling_overhead_ms`` and ``increase(network_profiling_auto_disables[5m])``,
so those names stay as printed (the auto-disable count is a gauge: as a
counter, prometheus_client would expose it as ``..._total``). Base-unit twins
(``_bytes``, ``_seconds``) sit beside them for users who follow Prometheus naming.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from netprof_core import ErrorKind, Histogram
from netprof_core._layout import bucket_index

from .summary import STATUS_CLASS_NAMES

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ("BUCKETS_SECONDS", "NetprofCollector")

# The exposed duration buckets. Each bound falls inside one of the segment's
# log-linear buckets, which is counted below it: a bound is exact to within
# that bucket's width (1/64 of its value, 1.6 %).
BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BUCKET_LAST_INDEX = tuple(bucket_index(int(bound * 1e9)) for bound in BUCKETS_SECONDS)
_ROUTE_LABELS = ["app", "route", "method", "direction"]


def prometheus_buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """Cumulative counts at BUCKETS_SECONDS and +Inf."""
    cumulative = []
    seen = 0
    index_at = 0
    counts = histogram.counts
    for bound, last in zip(BUCKETS_SECONDS, _BUCKET_LAST_INDEX):
        seen += sum(counts[index_at : last + 1])
        index_at = last + 1
        cumulative.append((repr(bound), float(seen)))
    cumulative.append(("+Inf", float(histogram.count)))
    return cumulative


class NetprofCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        daemon = self.daemon
        apps = daemon.apps
        overhead_now = daemon.overhead_by_app()

        requests = CounterMetricFamily(
            "network_profiling_requests", "Requests recorded", labels=[*_ROUTE_LABELS, "status"]
        )
        errors = CounterMetricFamily(
            "network_profiling_request_errors",
            "Failed requests by kind of failure",
            labels=[*_ROUTE_LABELS, "kind"],
        )
        slow = CounterMetricFamily(
            "network_profiling_slow_requests",
            "Requests slower than slow_request_threshold",
            labels=_ROUTE_LABELS,
        )
        transferred = CounterMetricFamily(
            "network_profiling_transferred_bytes",
            "Body bytes received (in) and sent (out)",
            labels=[*_ROUTE_LABELS, "flow"],
        )
        durations = HistogramMetricFamily(
            "network_profiling_request_duration_seconds", "Request durations", labels=_ROUTE_LABELS, unit=""
        )
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
            for key, route in sorted(state.routes.items(), key=lambda item: str(item[0])):
                labels = [name, key.template, key.method, key.direction.name.lower()]
                for status, count in zip(STATUS_CLASS_NAMES, route.status_classes):
                    if count:
                        requests.add_metric([*labels, status], count)
                for kind, count in zip(ErrorKind, route.error_kinds):
                    if count:
                        errors.add_metric([*labels, kind.name.lower()], count)
                slow.add_metric(labels, route.slow)
                transferred.add_metric([*labels, "in"], route.bytes_in)
                transferred.add_metric([*labels, "out"], route.bytes_out)
                durations.add_metric(labels, prometheus_buckets(route.histogram), route.sum_ns / 1e9)
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

        yield from (requests, errors, slow, transferred, durations)
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
