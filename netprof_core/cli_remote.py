"""The ``netprof`` commands that talk to a netprofd: ``stats --url``,
``export``, ``enable``, ``disable``, ``cleanup``, ``reset-errors``."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console, Group
from rich.progress import (
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from ._display import printable
from .cli_live import route_rows_from_daemon, routes_table, watch
from .daemon_client import PREFIX, DaemonClient, DaemonError

__all__ = ("cmd_control", "cmd_export", "stats_from_daemon")

ACTIONS = {
    "enable": "enable",
    "disable": "disable",
    "cleanup": "force-cleanup",
    "reset-errors": "reset-errors",
}


def _client(args: argparse.Namespace) -> DaemonClient:
    return DaemonClient(args.url, args.api_key)


def stats_from_daemon(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        if args.json:
            print(json.dumps(client.network_stats(args.window, slowest=10), indent=2))
            return 0

        def render() -> Group:
            stats = client.network_stats(args.window)
            rows = route_rows_from_daemon(stats)
            title = f"netprof: {client.url}, window {args.window}"
            return Group(routes_table(rows, title), Text(f"{len(stats['applications'])} application(s)"))

        if args.watch:
            return watch(render, args.interval, args.count)
        Console(width=None if Console().is_terminal else 140).print(render())
    except DaemonError as exc:
        _refused(exc)
        return 2
    return 0


def _refused(exc: DaemonError) -> None:
    print(f"netprof: {printable(str(exc))}", file=sys.stderr)


def cmd_control(args: argparse.Namespace) -> int:
    try:
        result = _client(args).control(ACTIONS[args.action], args.app)
    except DaemonError as exc:
        _refused(exc)
        return 2
    where = f"app {printable(args.app)}" if args.app else "every app"
    print(f"{args.action}: {printable(str(result['segments']))} process(es) of {where}")
    for failure in result.get("failed", []):
        print(
            f"  failed: {printable(str(failure['path']))}: {printable(str(failure['reason']))}",
            file=sys.stderr,
        )
    return 1 if result.get("failed") else 0


def cmd_export(args: argparse.Namespace) -> int:
    filters = {
        name: getattr(args, name.replace("-", "_"))
        for name in ("since", "until", "route", "status", "min-duration-ms", "app", "limit")
    }
    params = {name.replace("-", "_"): value for name, value in filters.items() if value is not None}
    client = _client(args)
    out = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")  # noqa: SIM115
    written = 0
    progress = Progress(
        SpinnerColumn(), TextColumn("exporting {task.description}"), DownloadColumn(), TransferSpeedColumn(),
        TimeElapsedColumn(), console=Console(stderr=True), disable=args.output == "-",
    )  # fmt: skip
    try:
        with progress:
            task = progress.add_task(args.format, total=None)
            for chunk in client.stream(f"{PREFIX}/network-profiling/export/{args.format}", **params):
                out.write(chunk)
                written += len(chunk)
                progress.update(task, completed=written)
    except DaemonError as exc:
        _refused(exc)
        return 2
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    if args.output != "-":
        print(f"wrote {written} bytes to {args.output}", file=sys.stderr)
    return 0
