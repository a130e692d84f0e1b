"""Alert rules: the built-in ones, from the guide's keys, and the custom ones
of the config's ``rules`` array; and their evaluation over the daemon's windows."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from netprof_core import ProfilingConfig, RouteKey, RouteStats

from .notification import SEVERITIES, finite_number
from .store import AppState
from .summary import quantiles
from .windows import WINDOWS, Window

__all__ = (
    "APP_METRICS",
    "LONGEST_WINDOW",
    "ROUTE_METRICS",
    "Rule",
    "Sample",
    "builtin_rules",
    "evaluate",
    "parse_duration",
    "parse_rules",
)

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
# Metrics of a set of requests: an application's, or one route's.
ROUTE_METRICS = ("error_rate_percent", "slow_request_percent", "request_rate", "p50_ms", "p95_ms", "p99_ms")
# Metrics of an application's processes, not of its requests.
PERCENTILE_METRICS = ("p50_ms", "p95_ms", "p99_ms")  # the ones that need the windows' histograms
APP_METRICS = ("memory_mb", "process_memory_mb", "overhead_ms", "consecutive_errors", "auto_disables")
ANY_ROUTE = "*"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
# The daemon keeps checkpoints for its longest window only: a longer rule
# window would silently be evaluated over this much.
LONGEST_WINDOW = max(WINDOWS.values())
_LONGEST_NAME = max(WINDOWS, key=WINDOWS.__getitem__)


def parse_duration(text: object) -> float:
    """``"30s"``, ``"5m"``, ``"1h30m"``, ``"500ms"`` or a number of seconds, as seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not finite_number(text) or text < 0:
            raise ValueError(f'expected a duration such as "30s" or "5m", got {text!r}')
        return float(text)
    if not isinstance(text, str) or not text or _DURATION.sub("", text):
        raise ValueError(f'expected a duration such as "30s" or "5m", got {text!r}')
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(text))


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    metric: str
    op: str
    threshold: float
    window: float = 60.0  # seconds of requests the metric is computed over
    for_seconds: float = 0.0  # how long the condition must hold before firing
    severity: str = "warning"
    app: str | None = None  # only this application
    route: str | None = None  # only this route template; "*": each route on its own
    min_requests: int = 0  # fewer requests in the window: no verdict
    action: str | None = None  # "disable": turn profiling off in the app's processes
    keep_firing_for: float = 0.0  # flap damping: stay firing this long after the condition clears
    summary: str = ""
    builtin: bool = False

    def holds(self, value: float) -> bool:
        return OPS[self.op](value, self.threshold)


_FIELDS = {
    "name", "metric", "op", "threshold", "window", "for", "severity", "app", "route",
    "min_requests", "action", "keep_firing_for", "summary",
}  # fmt: skip


def parse_rules(rules: Iterable[Mapping[str, Any]], source: str) -> tuple[list[Rule], list[str]]:
    """The custom rules, and one problem per bad field, each naming the rule and the field."""
    parsed, problems = [], []
    names: set[str] = set()
    for at, table in enumerate(rules):
        label = f"rules[{at}]" + (f" ({table['name']})" if isinstance(table.get("name"), str) else "")
        where = f"{source}: {label}"
        errors: list[str] = []

        def bad(key: str, message: str, *, errors: list[str] = errors, where: str = where) -> None:
            errors.append(f"{where}.{key}: {message}")

        for key in table:
            if key not in _FIELDS:
                bad(key, "unknown field; known: " + ", ".join(sorted(_FIELDS)))
        values: dict[str, Any] = {}
        name = table.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            bad("name", f"expected a name of letters, digits and _, got {name!r}")
        elif name in names:
            bad("name", f"{name!r} is used by another rule")
        else:
            names.add(name)
            values["name"] = name
        metric = table.get("metric")
        if metric not in ROUTE_METRICS + APP_METRICS:
            bad("metric", f"expected one of {', '.join(ROUTE_METRICS + APP_METRICS)}, got {metric!r}")
        else:
            values["metric"] = metric
        op = table.get("op")
        if not isinstance(op, str) or op not in OPS:  # (a JSON list or object is no key of OPS)
            bad("op", f"expected one of {', '.join(OPS)}, got {op!r}")
        else:
            values["op"] = op
        threshold = table.get("threshold")
        if not finite_number(threshold):
            bad("threshold", f"expected a number, got {threshold!r}")
        else:
            values["threshold"] = float(threshold)
        for key, field_name in (
            ("window", "window"),
            ("for", "for_seconds"),
            ("keep_firing_for", "keep_firing_for"),
        ):
            if key in table:
                try:
                    values[field_name] = parse_duration(table[key])
                except ValueError as exc:
                    bad(key, str(exc))
        if values.get("window", 1.0) <= 0:
            bad("window", "must be longer than 0")
        elif values.get("window", 0.0) > LONGEST_WINDOW:
            bad(
                "window",
                f"{values['window']:g} s is longer than the {LONGEST_WINDOW:g} s ({_LONGEST_NAME}) of "
                f'checkpoints netprofd keeps; use at most "{_LONGEST_NAME}"',
            )
        severity = table.get("severity", "warning")
        if severity not in SEVERITIES:
            bad("severity", f"expected one of {', '.join(SEVERITIES)}, got {severity!r}")
        else:
            values["severity"] = severity
        for key in ("app", "route", "summary"):
            if key in table:
                if not isinstance(table[key], str) or not table[key]:
                    bad(key, f"expected a non-empty string, got {table[key]!r}")
                else:
                    values[key] = table[key]
        if "route" in values and values.get("metric") in APP_METRICS:
            bad("route", f"{values['metric']} is a metric of an application's processes, not of a route")
        if "min_requests" in table:
            n = table["min_requests"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                bad("min_requests", f"expected a whole number of at least 0, got {n!r}")
            else:
                values["min_requests"] = n
        if "action" in table:
            if table["action"] != "disable":
                bad("action", f'the one action is "disable", got {table["action"]!r}')
            else:
                values["action"] = "disable"
        if errors:
            problems.extend(errors)
        else:
            parsed.append(Rule(**values))
    return parsed, problems


def builtin_rules(config: ProfilingConfig, *, overhead_ms: float) -> list[Rule]:
    """The rules the guide's keys ask for; names in the guide's style."""
    disable = "disable" if config.auto_disable_on_error else None
    slow, errors = config.alert_slow_request_threshold, config.alert_error_rate_threshold
    rules = [
        Rule("NetworkProfilingHighErrorRate", "error_rate_percent", ">", errors, 300.0, 60.0, "warning",
             min_requests=20, summary="error rate above alert_error_rate_threshold"),
        Rule("NetworkProfilingRouteHighErrorRate", "error_rate_percent", ">", errors, 300.0, 60.0, "warning",
             route=ANY_ROUTE, min_requests=20, summary="a route's error rate above alert_error_rate_threshold"),
        Rule("NetworkProfilingSlowRequests", "slow_request_percent", ">", slow, 300.0, 60.0, "warning",
             min_requests=20, summary="slow requests above alert_slow_request_threshold"),
        Rule("NetworkProfilingRouteSlowRequests", "slow_request_percent", ">", slow, 300.0, 60.0, "warning",
             route=ANY_ROUTE, min_requests=20, summary="a route's slow requests above alert_slow_request_threshold"),
        Rule("NetworkProfilingHighMemory", "process_memory_mb", ">", config.max_memory_mb, 60.0, 0.0,
             "critical" if disable else "warning", action=disable, summary="a process's segment above max_memory_mb"),
        Rule("NetworkProfilingHighOverhead", "overhead_ms", ">", overhead_ms, 60.0, 60.0,
             "critical" if disable else "warning", action=disable, summary="recorder overhead above its bound"),
        Rule("NetworkProfilingConsecutiveErrors", "consecutive_errors", ">", 3, 60.0, 0.0, "warning",
             summary="more than 3 consecutive internal errors in a process"),
        Rule("NetworkProfilingAutoDisabled", "auto_disables", ">", 0, 300.0, 0.0, "critical",
             summary="profiling was auto-disabled"),
    ]  # fmt: skip
    return [replace(rule, builtin=True) for rule in rules]


@dataclass(frozen=True, slots=True)
class Sample:
    """One evaluation of a rule for one application (and route)."""

    rule: Rule
    labels: Mapping[str, str]
    value: float | None  # None: not enough data for a verdict
    requests: int

    @property
    def holds(self) -> bool:
        return self.value is not None and self.rule.holds(self.value)


def evaluate(
    rule: Rule,
    apps: Mapping[str, AppState],
    window_of: Callable[[float, bool], Mapping[str, Window]],
    daemon_auto_disables: Callable[[str, float], int],
) -> Iterator[Sample]:
    """Samples of ``rule`` for every application (and route) it covers.
    ``window_of(seconds, histograms)`` gives each application's window;
    ``daemon_auto_disables(app, seconds)`` the auto-disables netprofd made in it."""
    windows = window_of(rule.window, rule.metric in PERCENTILE_METRICS)
    for name, state in apps.items():
        if rule.app is not None and rule.app != name:
            continue
        window = windows.get(name)
        if window is None:
            continue
        labels = {"alertname": rule.name, "severity": rule.severity, "app": name}
        if rule.metric in APP_METRICS:
            yield Sample(
                rule,
                labels,
                _app_metric(rule.metric, state, window, daemon_auto_disables(name, rule.window)),
                0,
            )
            continue
        routes = [r for r in window.routes.values() if r.count]
        if rule.route is None:
            merged = _merged(routes, rule.metric in PERCENTILE_METRICS)
            yield _route_sample(rule, labels, merged, window.seconds)
            continue
        for route in routes:
            if rule.route in (ANY_ROUTE, route.key.template):
                yield _route_sample(rule, {**labels, **_route_labels(route.key)}, route, window.seconds)


def _route_labels(key: RouteKey) -> dict[str, str]:
    return {"route": key.template, "method": key.method, "direction": key.direction.name.lower()}


def _merged(routes: list[RouteStats], histograms: bool = True) -> RouteStats | None:
    """All of an application's routes as one (the sum keeps the first key).
    Without ``histograms``, only the counts a rate reads are summed: adding
    histograms costs 17 KB a route, at every tick (issue 15: many routes)."""
    if not routes:
        return None
    if not histograms:
        return replace(
            routes[0],
            count=sum(r.count for r in routes),
            errors=sum(r.errors for r in routes),
            slow=sum(r.slow for r in routes),
        )
    total = routes[0]
    for route in routes[1:]:
        total = total + route
    return total


def _route_sample(rule: Rule, labels: dict[str, str], route: RouteStats | None, seconds: float) -> Sample:
    count = route.count if route is not None else 0
    if route is None or count == 0 or count < rule.min_requests:
        return Sample(rule, labels, None, count)
    metric = rule.metric
    if metric == "error_rate_percent":
        value = 100.0 * route.errors / count
    elif metric == "slow_request_percent":
        value = 100.0 * route.slow / count
    elif metric == "request_rate":
        value = count / seconds if seconds > 0 else math.nan
    else:
        q = {"p50_ms": 0.5, "p95_ms": 0.95, "p99_ms": 0.99}[metric]
        value = quantiles(route.histogram, [q], cap_ns=route.max_ns)[0] / 1e6
    return Sample(rule, labels, None if math.isnan(value) else value, count)


def _app_metric(metric: str, state: AppState, window: Window, daemon_auto_disables: int) -> float | None:
    live = state.processes
    if metric == "memory_mb":  # all of the app's segments, as /metrics shows it
        return sum(entry.snapshot.memory_bytes for entry in live) / 2**20 if live else None
    if metric == "process_memory_mb":  # the largest one: max_memory_mb bounds each process
        return max(entry.snapshot.memory_bytes for entry in live) / 2**20 if live else None
    if metric == "consecutive_errors":
        return float(max((e.snapshot.counters.consecutive_errors for e in live), default=0)) if live else None
    if metric == "auto_disables":
        return float(window.counters.auto_disable_events + daemon_auto_disables)
    counters = window.counters  # overhead_ms: the mean cost of a timed record in the window
    return counters.overhead_sum_ns / counters.overhead_count / 1e6 if counters.overhead_count else None
