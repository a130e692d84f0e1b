"""``netprof``: the user's command line. For now, ``netprof stats`` reads the
segments of this host straight from the segment directory, no daemon needed."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence

from .config import ConfigError, load_profiling_config
from .reader import RouteStats, SegmentSnapshot, merge_routes, read_segments

__all__ = ("build_parser", "cmd_stats", "format_duration", "main", "route_table")

QUANTILES = (0.5, 0.95, 0.99)


def format_duration(ns: float) -> str:
    """A duration in ns, in the unit that keeps it short (µs, ms, s)."""
    if math.isnan(ns):
        return "-"
    if ns < 1e6:
        return f"{ns / 1e3:.1f}µs"
    if ns < 1e9:
        return f"{ns / 1e6:.1f}ms"
    return f"{ns / 1e9:.2f}s"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def route_table(snapshots: Sequence[SegmentSnapshot]) -> list[list[str]]:
    """Rows of the per-route table (header first), merged over processes,
    busiest routes first; routes without requests are left out."""
    rows = [["APP", "DIR", "METHOD", "ROUTE", "COUNT", "ERRORS", "SLOW", "P50", "P95", "P99", "MAX"]]
    merged = merge_routes(snapshots)
    ordered = sorted(merged.items(), key=lambda item: (-item[1].count, item[0][0], item[0][1]))
    for (app, key), route in ordered:
        if route.count:
            rows.append(_row(app, route))
    return rows


def _row(app: str, route: RouteStats) -> list[str]:
    hist = route.histogram
    return [
        app,
        "out" if route.key.direction else "in",
        route.key.method or "-",
        route.key.template,
        str(route.count),
        _percent(route.errors, route.count),
        _percent(route.slow, route.count),
        *(format_duration(hist.quantile(q)) for q in QUANTILES),
        format_duration(route.max_ns),
    ]


def _render(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = set(range(4, len(widths)))
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _summary(snapshots: Sequence[SegmentSnapshot]) -> str:
    processes = len(snapshots)
    memory = sum(s.memory_bytes for s in snapshots) / 2**20
    requests = sum(s.counters.requests for s in snapshots)
    internal = sum(s.counters.internal_errors for s in snapshots)
    disabled = sum(1 for s in snapshots if not s.control.recording)
    return (
        f"{processes} process(es), {requests} requests recorded, {memory:.2f} MiB of segments, "
        f"{internal} internal errors, {disabled} with profiling off"
    )


def _stats_json(snapshots: Sequence[SegmentSnapshot]) -> str:
    routes = []
    for (app, key), route in sorted(merge_routes(snapshots).items(), key=lambda item: -item[1].count):
        if not route.count:
            continue
        hist = route.histogram
        routes.append(
            {
                "app": app,
                "direction": "outbound" if key.direction else "inbound",
                "method": key.method,
                "route": key.template,
                "count": route.count,
                "errors": route.errors,
                "slow": route.slow,
                "bytes_in": route.bytes_in,
                "bytes_out": route.bytes_out,
                **{f"p{round(q * 100)}_ms": _ms(hist.quantile(q)) for q in QUANTILES},
                "max_ms": route.max_ns / 1e6,
            }
        )
    return json.dumps({"processes": len(snapshots), "routes": routes}, indent=2)


def _ms(ns: float) -> float | None:
    return None if math.isnan(ns) else ns / 1e6


def cmd_stats(args: argparse.Namespace) -> int:
    if args.segment_dir:
        directory = args.segment_dir
    else:
        try:
            directory = load_profiling_config(args.config).segment_dir
        except ConfigError as exc:
            print(f"netprof: {exc}", file=sys.stderr)
            return 2
    snapshots = read_segments(directory, records=False)
    if args.json:
        print(_stats_json(snapshots))
        return 0
    if not snapshots:
        print(f"no profiled processes in {directory}")
        return 0
    rows = route_table(snapshots)
    print(_render(rows) if len(rows) > 1 else "no requests recorded yet")
    print()
    print(_summary(snapshots))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netprof", description="netprof: network profiling for Python services")
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="per-route latency and errors, read from this host's segments")
    stats.add_argument("--segment-dir", help="where the segments are (default: from the config, else /dev/shm/netprof)")
    stats.add_argument("--config", help="a netprof config file (default: $NETPROF_CONFIG)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(handler=cmd_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
