"""``netprof``: the user's command line.

``netprof stats`` reads this host's segments straight from the segment
directory (no daemon needed), or a daemon's API with ``--url``; ``--watch``
keeps it on screen. ``export``, ``enable``, ``disable``, ``cleanup`` and
``reset-errors`` talk to a netprofd; ``demo`` runs the whole thing on a demo app.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence

from rich.cells import cell_len

from ._display import PrintableFormatter, format_duration, printable
from .config import ConfigError, load_profiling_config
from .reader import RouteStats, SegmentSnapshot, merge_routes, read_segments

__all__ = ("build_parser", "cmd_stats", "format_duration", "main", "route_table")

QUANTILES = (0.5, 0.95, 0.99)


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
        printable(app),
        "out" if route.key.direction else "in",
        printable(route.key.method) or "-",
        printable(route.key.template),
        str(route.count),
        _percent(route.errors, route.count),
        _percent(route.slow, route.count),
        *(format_duration(hist.quantile(q)) for q in QUANTILES),
        format_duration(route.max_ns),
    ]


def _render(rows: list[list[str]]) -> str:
    # Padded by the cells a terminal gives each name (a CJK character takes
    # two, a combining accent none), not by len().
    widths = [max(cell_len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = set(range(4, len(widths)))
    lines = []
    for row in rows:
        cells = []
        for i, (cell, width) in enumerate(zip(row, widths)):
            pad = " " * (width - cell_len(cell))
            cells.append(pad + cell if i in numeric else cell + pad)
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


def _local_directory(args: argparse.Namespace) -> str | None:
    if args.segment_dir:
        return str(args.segment_dir)
    try:
        return load_profiling_config(args.config).segment_dir
    except ConfigError as exc:
        print(f"netprof: {exc}", file=sys.stderr)
        return None


def cmd_stats(args: argparse.Namespace) -> int:
    if args.url:
        from .cli_remote import stats_from_daemon

        return stats_from_daemon(args)
    directory = _local_directory(args)
    if directory is None:
        return 2
    if args.watch:
        from .cli_live import watch_local

        return watch_local(directory, args.interval, args.count)
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


def _daemon_options(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument(
        "--url", required=required,
        help="a netprofd's base URL, e.g. http://127.0.0.1:9465",
    )  # fmt: skip
    parser.add_argument("--api-key", help="the daemon's API key (default: $NETPROF_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netprof", description="netprof: network profiling for Python services"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    stats = commands.add_parser(
        "stats", help="per-route latency and errors: this host's segments, or a daemon's"
    )
    stats.add_argument(
        "--segment-dir", help="where the segments are (default: from the config, else /dev/shm/netprof)"
    )
    stats.add_argument("--config", help="a netprof config file (default: $NETPROF_CONFIG)")
    _daemon_options(stats)
    stats.add_argument("--window", default="1m", help="with --url: 1m, 5m, 15m or all (default 1m)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.add_argument("--watch", action="store_true", help="keep the table on screen, refreshed")
    stats.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (--watch)")
    stats.add_argument("--count", type=int, default=None, help="stop after this many refreshes (--watch)")
    stats.set_defaults(handler=cmd_stats)

    export = commands.add_parser("export", help="download a daemon's stored request records to a file")
    _daemon_options(export, required=True)
    export.add_argument("--format", choices=("json", "csv", "ndjson"), default="json")
    export.add_argument("-o", "--output", required=True, help="the file to write ('-': standard output)")
    for name in ("since", "until", "route", "status", "min-duration-ms", "app", "limit"):
        export.add_argument(f"--{name}", help="filter; see the export API")
    export.set_defaults(handler=_remote("cmd_export"))

    for action, help_text in (
        ("enable", "turn profiling on in every process (or --app's)"),
        ("disable", "turn profiling off in every process (or --app's)"),
        ("cleanup", "drop the stored records; counters stay"),
        ("reset-errors", "clear consecutive errors and lift an auto-disable"),
    ):
        command = commands.add_parser(action, help=help_text)
        _daemon_options(command, required=True)
        command.add_argument("--app", help="only this application")
        command.set_defaults(handler=_remote("cmd_control"), action=action)

    demo = commands.add_parser(
        "demo", help="run a demo shop with netprofd and traffic through phases, then clean up"
    )
    demo.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (default 60)")
    demo.add_argument("--concurrency", type=int, default=8, help="clients sending at once (default 8)")
    demo.set_defaults(handler=_run_demo)
    return parser


def _remote(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        from . import cli_remote

        return int(getattr(cli_remote, name)(args))

    return handler


def _run_demo(args: argparse.Namespace) -> int:
    try:
        from .demo.run import run_demo
    except ImportError as exc:
        print(f"netprof demo needs the demo extra: pip install 'netprof[demo]' ({exc})", file=sys.stderr)
        return 2
    return run_demo(duration=args.duration, concurrency=args.concurrency)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    try:
        return int(args.handler(args))
    except OSError as exc:  # a segment directory that cannot be listed is not an empty one
        print(f"netprof: {printable(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
