"""Exports of the stored request records as JSON, CSV or NDJSON, streamed one
process at a time so that a large export does not balloon the daemon's memory.
Records come grouped by process, oldest first within each."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from aiohttp import web

from netprof_core import RequestRecord, SegmentError

from .log import api_logger
from .store import stored_records
from .summary import record_json

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ("ExportFilter", "spreadsheet_cell", "stream_export")

MAX_LIMIT = 10_000_000
CSV_FIELDS = (
    "app", "pid", "time", "direction", "method", "route", "status", "duration_ms",
    "ttfb_ms", "bytes_in", "bytes_out", "slow", "error", "error_kind",
)  # fmt: skip
CONTENT_TYPES = {"json": "application/json", "csv": "text/csv", "ndjson": "application/x-ndjson"}
# A text cell starting with one of these is a formula (or starts one after a
# tab or CR) in Excel, LibreOffice and Google Sheets: OWASP's list, with NUL
# (OWASP ASVS) and the quote itself, so that one leading quote is always
# netprof's and taking it away gives the name back.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\0", "'")
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


def _whole_number(text: str, lo: int, hi: int) -> int | None:
    """``text`` as a whole number from ``lo`` to ``hi``, else None. ASCII
    digits only: str.isdigit() also takes superscripts, which int() refuses,
    and int() refuses more than 4,300 digits, which a client may send."""
    digits = text.lstrip("0")
    if not text.isascii() or not text.isdigit() or len(digits) > len(str(hi)):
        return None
    value = int(digits or "0")
    return value if lo <= value <= hi else None


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
            elif (code := _whole_number(text, 100, 599)) is not None:
                values["status"] = (code, code + 1)
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
            limit = _whole_number(text, 1, MAX_LIMIT)
            if limit is None:
                raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {text!r}")
            values["limit"] = limit
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


def spreadsheet_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: a str starting like a formula
    gets a leading single quote (OWASP's CSV injection advice). The numbers
    the exporter writes itself stay numbers."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _csv_line(values: Iterable[object]) -> str:
    out = io.StringIO()
    # CRLF (RFC 4180): the csv module quotes a cell holding any character of the
    # line terminator, so a name with a bare CR cannot end a row either.
    csv.writer(out, lineterminator="\r\n").writerow([spreadsheet_cell(value) for value in values])
    return out.getvalue()


class _Formatter:
    def __init__(self, fmt: str, wanted: ExportFilter, exported_at: float) -> None:
        self.fmt = fmt
        self.wanted = wanted
        self.exported_at = exported_at
        self.count = 0

    def start(self) -> str:
        if self.fmt == "csv":
            return _csv_line(CSV_FIELDS)
        if self.fmt == "json":
            head = json.dumps({"exported_at": self.exported_at, "filters": self.wanted.describe()})
            return head[:-1] + ', "records": ['
        return ""

    def record(self, row: dict[str, Any]) -> str:
        self.count += 1
        if self.fmt == "csv":
            return _csv_line(row[f] for f in CSV_FIELDS)
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
            "X-Content-Type-Options": "nosniff",  # a download, never rendered as a page
        }
    )
    await response.prepare(request)
    await response.write(formatter.start().encode())
    left = wanted.limit
    for entry in list(daemon.store.live(wanted.app)):
        if left is not None and left <= 0:
            break
        try:
            # A reader of its own, a chunk of the ring at a time in a worker
            # thread (bounded time and memory per step; the tick may close the
            # entry's own reader meanwhile).
            async with contextlib.aclosing(stored_records(entry.path)) as records:
                async for records_chunk in records:
                    chunk = []
                    for record in _matching(records_chunk, wanted, left):
                        chunk.append(formatter.record(record_json(record, entry.app, entry.pid)))
                        if left is not None:
                            left -= 1
                    if chunk:
                        await response.write("".join(chunk).encode())
                    if left is not None and left <= 0:
                        break
        except (SegmentError, OSError, ValueError) as exc:
            api_logger.warning("export: skipping %s: %s", entry.path, exc)
            continue
    await response.write(formatter.end().encode())
    await response.write_eof()
    return response


def _matching(
    records: Iterable[RequestRecord], wanted: ExportFilter, left: int | None
) -> Iterator[RequestRecord]:
    for record in records:
        if left is not None and left <= 0:
            return
        if wanted.matches(record):
            yield record
            if left is not None:
                left -= 1
