#!/usr/bin/env python3
"""Watch netprofd's profiling figures against the deployment guide's canary
thresholds: one line per check.

Each line: UTC timestamp, segment memory (MB, all processes), recorder
overhead (ms per record, last minute, the worst app), error rate (% of the
requests served in the last minute, all apps), consecutive internal errors
(the worst process), auto-disable events (total) and processes. A breached
threshold is flagged at the end of the line as ``! name``; a line without
one ends with ``ok``.

``--url`` is netprofd's base URL. It calls
/api/v1/debug/network-profiling/production-metrics, .../memory-usage and
/api/v1/debug/network-stats?window=1m with ``Authorization: Bearer <key>``.

Examples::

    python scripts/monitor_network_profiling.py --url http://127.0.0.1:9465 --api-key "$API_KEY"
    python scripts/monitor_network_profiling.py \\
      --url https://api.example.com --api-key $PROD_API_KEY \\
      --continuous --interval 300 > monitoring.log 2>&1 &

Once (the default) it checks one time and exits 1 on a breach, 0 otherwise.
With --continuous it checks every --interval seconds until interrupted
(Ctrl-C or SIGTERM) or --count lines, and exits 0; an unreachable daemon
is then an ``ERROR`` line and the next check tries again. Exit 2: bad arguments, a refused key
(HTTP 401/403), or (once) a daemon that cannot be reached.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from _common import DaemonClient, DaemonError, default_api_key


@dataclass(frozen=True)
class Figures:
    memory_mb: float
    overhead_ms: float | None
    error_percent: float | None  # None: no request in the last minute
    consecutive_errors: int
    auto_disable_events: int
    auto_disabled_processes: int
    processes: int


@dataclass(frozen=True)
class Thresholds:
    memory_mb: float
    error_percent: float
    overhead_ms: float
    consecutive_errors: int


# -- arguments ------------------------------------------------------------------


def _number(text: str, *, integer: bool = False, allow_zero: bool = True) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if integer else 'a number'}: {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "at least 0" if allow_zero else "more than 0"
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monitor_network_profiling.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="netprofd's base URL, e.g. http://127.0.0.1:9465")
    parser.add_argument(
        "--api-key", default=default_api_key(), help="netprofd's key (default $NETPROF_API_KEY)"
    )
    parser.add_argument("--app", help="watch only this application")
    parser.add_argument("--continuous", action="store_true", help="check every --interval seconds")
    parser.add_argument(
        "--interval", type=lambda t: _number(t, allow_zero=False), default=30.0, metavar="SECONDS",
        help="seconds between checks with --continuous (default 30)",
    )  # fmt: skip
    parser.add_argument(
        "--count", type=lambda t: int(_number(t, integer=True, allow_zero=False)), metavar="N",
        help="with --continuous: stop after N lines",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=lambda t: _number(t, allow_zero=False), default=10.0, metavar="SECONDS",
        help="per call to netprofd (default 10)",
    )  # fmt: skip
    limits = parser.add_argument_group("thresholds (the guide's canary alerts)")
    limits.add_argument("--max-memory-mb", type=_number, default=30.0, metavar="MB", help="default 30")
    limits.add_argument("--max-error-rate", type=_number, default=5.0, metavar="PERCENT", help="default 5")
    limits.add_argument("--max-overhead-ms", type=_number, default=2.0, metavar="MS", help="default 2")
    limits.add_argument(
        "--max-consecutive-errors", type=lambda t: int(_number(t, integer=True)), default=3, metavar="N",
        help="default 3",
    )  # fmt: skip
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"--url must start with http:// or https://, got {args.url!r}")
    if args.count is not None and not args.continuous:
        parser.error("--count needs --continuous")
    return args


# -- figures -------------------------------------------------------------------


def collect(daemon: DaemonClient, app: str | None) -> Figures:
    metrics = daemon.production_metrics(app)["applications"]
    memory = daemon.memory_usage(app)
    stats = daemon.network_stats("1m", app)["applications"]
    overheads = [a["overhead"]["last_minute_mean_ms"] for a in metrics if a["overhead"]["timed_records"]]
    served = sum(a["inbound"]["count"] for a in stats)
    failed = sum(a["inbound"]["errors"] for a in stats)
    return Figures(
        memory_mb=float(memory["total_mb"]),
        overhead_ms=max(overheads) if overheads else None,
        error_percent=100.0 * failed / served if served else None,
        consecutive_errors=max((a["consecutive_errors"] for a in metrics), default=0),
        auto_disable_events=sum(a["auto_disable_events"] for a in metrics),
        auto_disabled_processes=sum(a["auto_disabled_processes"] for a in metrics),
        processes=sum(a["process_count"] for a in metrics),
    )


def breaches(figures: Figures, limits: Thresholds, previous: Figures | None) -> list[str]:
    """The thresholds ``figures`` breach; auto-disables are the events new
    since ``previous`` (any when there is none) or a process auto-disabled now."""
    found = []
    if figures.memory_mb > limits.memory_mb:
        found.append(f"memory>{limits.memory_mb:g}MB")
    if figures.error_percent is not None and figures.error_percent > limits.error_percent:
        found.append(f"error_rate>{limits.error_percent:g}%")
    if figures.overhead_ms is not None and figures.overhead_ms > limits.overhead_ms:
        found.append(f"overhead>{limits.overhead_ms:g}ms")
    if figures.consecutive_errors > limits.consecutive_errors:
        found.append(f"consecutive_errors>{limits.consecutive_errors}")
    new_events = figures.auto_disable_events - (previous.auto_disable_events if previous else 0)
    if new_events > 0 or figures.auto_disabled_processes:
        found.append("auto_disable")
    return found


def _opt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_line(now: datetime, figures: Figures, flags: list[str]) -> str:
    fields = [
        now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        f"memory_mb={figures.memory_mb:.2f}",
        f"overhead_ms={_opt(figures.overhead_ms, 4)}",
        f"error_rate={_opt(figures.error_percent, 2)}%",
        f"consecutive_errors={figures.consecutive_errors}",
        f"auto_disables={figures.auto_disable_events}",
        f"processes={figures.processes}",
    ]
    tail = "  ".join(f"! {flag}" for flag in flags) if flags else "ok"
    return " ".join(fields) + "  " + tail


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


# -- main ------------------------------------------------------------------------


def check_once(daemon: DaemonClient, args: argparse.Namespace, limits: Thresholds) -> int:
    figures = collect(daemon, args.app)
    flags = breaches(figures, limits, None)
    print(format_line(utc_now(), figures, flags))
    return 1 if flags else 0


def watch(daemon: DaemonClient, args: argparse.Namespace, limits: Thresholds) -> int:
    previous: Figures | None = None
    lines = 0
    next_at = time.monotonic()
    while args.count is None or lines < args.count:
        try:
            figures = collect(daemon, args.app)
        except DaemonError as exc:
            if exc.auth_failed:
                raise
            print(f"{utc_now():%Y-%m-%dT%H:%M:%SZ} ERROR {exc}")
        else:
            print(format_line(utc_now(), figures, breaches(figures, limits, previous)))
            previous = figures
        lines += 1
        if args.count is not None and lines >= args.count:
            break
        next_at = max(next_at + args.interval, time.monotonic())  # a slow answer shifts the beat
        time.sleep(next_at - time.monotonic())
    return 0


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # `kill %1` ends a backgrounded monitor as Ctrl-C does


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # for `> monitoring.log &`
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    limits = Thresholds(
        args.max_memory_mb, args.max_error_rate, args.max_overhead_ms, args.max_consecutive_errors
    )
    with DaemonClient(args.url, args.api_key, timeout=args.timeout) as daemon:
        try:
            return watch(daemon, args, limits) if args.continuous else check_once(daemon, args, limits)
        except DaemonError as exc:
            print(f"monitor_network_profiling.py: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
