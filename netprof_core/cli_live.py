"""``netprof stats --watch``: the per-route table kept on screen with rich."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ._display import format_duration, printable

__all__ = ("route_rows_from_daemon", "routes_table", "watch", "watch_local")

COLUMNS = ("APP", "DIR", "METHOD", "ROUTE", "COUNT", "RATE/s", "ERRORS", "SLOW", "P50", "P95", "P99", "MAX")


def _ms(value: float | None) -> str:
    return "-" if value is None else format_duration(value * 1e6)


def _name(text: str | None) -> Text:
    """A name from outside as a cell: never markup (a plain str cell is parsed as
    rich markup), never a control character (rich keeps ESC)."""
    return Text(printable(text or "") or "-")


def route_rows_from_daemon(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The routes of a daemon's network-stats answer, one dict each, with the app."""
    return [{"app": app["app"], **route} for app in stats["applications"] for route in app["routes"]]


def routes_table(rows: Iterable[Mapping[str, Any]], title: str = "") -> Table:
    table = Table(
        title=Text(printable(title)) if title else None, title_justify="left", expand=False, pad_edge=False
    )
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("APP", "DIR", "METHOD", "ROUTE") else "right")
    for row in sorted(rows, key=lambda r: -r["count"]):
        errors = row.get("error_percent", 0.0)
        # max_exact false: the window's largest is only known to one bucket, and this is its top.
        bound = "" if row.get("max_exact", True) is not False else "≤"
        table.add_row(
            _name(row["app"]),
            "out" if row["direction"] == "outbound" else "in",
            _name(row["method"]),
            _name(row["route"]),
            str(row["count"]),
            "-" if row.get("rate_per_second") is None else f"{row['rate_per_second']:.1f}",
            Text(f"{errors:.1f}%", style="bold red" if errors >= 5 else ""),
            f"{row.get('slow_percent', 0.0):.1f}%",
            *(_ms(row.get(key)) for key in ("p50_ms", "p95_ms", "p99_ms")),
            bound + _ms(row.get("max_ms")),
        )
    return table


def watch(
    render: Callable[[], Any], interval: float, count: int | None, console: Console | None = None
) -> int:
    """Refresh ``render()`` every ``interval`` seconds (``count`` times, or until ^C)."""
    console = console or (Console() if Console().is_terminal else Console(width=140))
    done = 0
    try:
        with Live(render(), console=console, refresh_per_second=4, transient=False) as live:
            while count is None or done < count:
                time.sleep(interval)
                live.update(render())
                done += 1
    except KeyboardInterrupt:
        pass
    return 0


def watch_local(directory: str, interval: float, count: int | None) -> int:
    from .cli import _summary
    from .reader import merge_routes, read_segments

    def render() -> Group:
        snapshots = read_segments(directory, records=False)
        rows = []
        for (app, key), route in merge_routes(snapshots).items():
            if route.count:
                values = route.histogram
                rows.append(
                    {
                        "app": app,
                        "direction": "outbound" if key.direction else "inbound",
                        "method": key.method,
                        "route": key.template,
                        "count": route.count,
                        "rate_per_second": None,
                        "error_percent": 100 * route.errors / route.count,
                        "slow_percent": 100 * route.slow / route.count,
                        **{
                            name: None if (v := values.quantile(q)) != v else v / 1e6
                            for name, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99))
                        },
                        "max_ms": route.max_ns / 1e6,
                    }
                )
        title = f"netprof: {directory} (since each process started)"
        return Group(routes_table(rows, title), Text(_summary(snapshots)))

    return watch(render, interval, count)
