"""Exports of the stored request records as JSON, CSV or NDJSON, streamed one
process at a time so that a large export does not balloon the daemon's memory.
Records come grouped by process, oldest first within each."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from aiohttp import web

from netprof_core import RequestRecord, SegmentError, read_segment

from .log import api_logger
from .summary import record_json

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ("ExportFilter", "stream_export")

MAX_LIMIT = 10_000_000
CSV_FIELDS = (
    "app", "pid", "time", "direction", "method", "route", "status", "duration_ms",
    "ttfb_ms", "bytes_in", "bytes_out", "slow", "error", "error_kind",
)  # fmt: skip
CONTENT_TYPES = {"json": "application/json", "csv": "text/csv", "ndjson": "application/x-ndjson"}
_STATUS_CLASS = re.compile(r"([1-5])xx")


def _time(name: str, text: str) -> int:
    """Unix seconds or an ISO 8601 date-time (UTC unless it says otherwise), as ns."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{name} must be unix seconds or an ISO 8601 date-time, got {text!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        seconds = moment.timestamp()
    if not math.isfinite(seconds) or not 0 <= seconds < 1e11:
        raise ValueError(f"{name} must be unix seconds or an ISO 8601 date-time, got {text!r}")
    return int(seconds * 1e9)


@dataclass(frozen=True, slots=True)
class ExportFilter:
    PARAMETERS = ("since", "until", "route", "status", "min_duration_ms", "app", "limit")

    since_ns: int = 0
    until_ns: int | None = None
    route: str | None = None
    status: tuple[int, int] | None = None  # [lo, hi)
    min_duration_ns: int = 0
    app: str | None = None
    limit: int | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> ExportFilter:
        """ValueError, starting with the parameter's name, for a bad value."""
        values: dict[str, Any] = {}
        if "since" in query:
            values["since_ns"] = _time("since", query["since"])
        if "until" in query:
            values["until_ns"] = _time("until", query["until"])
        if "route" in query:
            values["route"] = query["route"]
        if "status" in query:
            text = query["status"]
            if match := _STATUS_CLASS.fullmatch(text):
                lo = int(match.group(1)) * 100
                values["status"] = (lo, lo + 100)
            elif text.isdigit() and 100 <= int(text) <= 599:
                values["status"] = (int(text), int(text) + 1)
            else:
                raise ValueError(f"status must be a status code (100-599) or a class like 5xx, got {text!r}")
        if "min_duration_ms" in query:
            text = query["min_duration_ms"]
            try:
                ms = float(text)
            except ValueError:
                ms = math.nan
            if not math.isfinite(ms) or not 0 <= ms <= 1e9:
                raise ValueError(f"min_duration_ms must be a number of milliseconds from 0, got {text!r}")
            values["min_duration_ns"] = int(ms * 1e6)
        if "app" in query:
            values["app"] = query["app"]
        if "limit" in query:
            text = query["limit"]
            if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
                raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {text!r}")
            values["limit"] = int(text)
        return cls(**values)

    def matches(self, record: RequestRecord) -> bool:
        if record.wall_ns < self.since_ns or (self.until_ns is not None and record.wall_ns > self.until_ns):
            return False
        if self.route is not None and record.route.template != self.route:
            return False
        if self.status is not None and not self.status[0] <= record.status < self.status[1]:
            return False
        return record.duration_ns >= self.min_duration_ns

    def describe(self) -> dict[str, Any]:
        return {
            "since": self.since_ns / 1e9 if self.since_ns else None,
            "until": self.until_ns / 1e9 if self.until_ns is not None else None,
            "route": self.route,
            "status": f"{self.status[0]}-{self.status[1] - 1}" if self.status else None,
            "min_duration_ms": self.min_duration_ns / 1e6 if self.min_duration_ns else None,
            "app": self.app,
            "limit": self.limit,
        }


def _csv_line(row: dict[str, Any]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(["" if row[f] is None else row[f] for f in CSV_FIELDS])
    return out.getvalue()


class _Formatter:
    def __init__(self, fmt: str, wanted: ExportFilter, exported_at: float) -> None:
        self.fmt = fmt
        self.wanted = wanted
        self.exported_at = exported_at
        self.count = 0

    def start(self) -> str:
        if self.fmt == "csv":
            return ",".join(CSV_FIELDS) + "\n"
        if self.fmt == "json":
            head = json.dumps({"exported_at": self.exported_at, "filters": self.wanted.describe()})
            return head[:-1] + ', "records": ['
        return ""

    def record(self, row: dict[str, Any]) -> str:
        self.count += 1
        if self.fmt == "csv":
            return _csv_line(row)
        if self.fmt == "ndjson":
            return json.dumps(row) + "\n"
        return ("\n" if self.count == 1 else ",\n") + json.dumps(row)

    def end(self) -> str:
        return f'\n], "count": {self.count}}}\n' if self.fmt == "json" else ""


async def stream_export(
    request: web.Request, daemon: Daemon, fmt: str, wanted: ExportFilter
) -> web.StreamResponse:
    formatter = _Formatter(fmt, wanted, daemon.store.last_tick_ns / 1e9)
    response = web.StreamResponse(
        headers={
            "Content-Type": f"{CONTENT_TYPES[fmt]}; charset=utf-8",
            "Content-Disposition": f'attachment; filename="network-profiling-export.{fmt}"',
        }
    )
    await response.prepare(request)
    await response.write(formatter.start().encode())
    left = wanted.limit
    for entry in list(daemon.store.live(wanted.app)):
        if left is not None and left <= 0:
            break
        try:
            # A reader of its own, off the loop (an object per record); the
            # tick may close the entry's own reader meanwhile.
            snapshot = await asyncio.to_thread(read_segment, entry.path)
        except (SegmentError, OSError, ValueError) as exc:
            api_logger.warning("export: skipping %s: %s", entry.path, exc)
            continue
        chunk = []
        for record in _matching(snapshot.records, wanted, left):
            chunk.append(formatter.record(record_json(record, snapshot.app_name, snapshot.header.pid)))
            if left is not None:
                left -= 1
            if len(chunk) >= 500:
                await response.write("".join(chunk).encode())
                chunk.clear()
        if chunk:
            await response.write("".join(chunk).encode())
    await response.write(formatter.end().encode())
    await response.write_eof()
    return response


def _matching(
    records: tuple[RequestRecord, ...], wanted: ExportFilter, left: int | None
) -> Iterator[RequestRecord]:
    for record in records:
        if left is not None and left <= 0:
            return
        if wanted.matches(record):
            yield record
            if left is not None:
                left -= 1
