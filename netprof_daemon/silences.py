"""Silences from the API's JSON: matchers and an end time, validated with
errors that name the field. Regular expressions are RE2's (linear-time, the
syntax of Prometheus and Alertmanager); sizes are bounded (see alerts.py)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from netprof_core._display import shorten

from .alerts import MAX_COMMENT, MAX_CREATED_BY, MAX_MATCHERS, Matcher, SilenceError, check_text
from .notification import finite_number
from .rules import parse_duration

__all__ = ("SilenceError", "parse_silence")

MAX_SECONDS = 366 * 86400.0


def _moment(field: str, value: object) -> float:
    if finite_number(value):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    raise SilenceError(field, f"expected unix seconds or an ISO 8601 date-time, got {_short(value)}")


def _matchers(value: object) -> list[Matcher]:
    if isinstance(value, Mapping):
        value = [{"name": k, "value": v} for k, v in value.items()]
    if not isinstance(value, list) or not value:
        raise SilenceError(
            "matchers", 'expected a non-empty object {"label": "value"} or list of {name, value, regex}'
        )
    if len(value) > MAX_MATCHERS:
        raise SilenceError("matchers", f"{len(value)} matchers; at most {MAX_MATCHERS}")
    matchers = []
    for at, item in enumerate(value):
        if (
            not isinstance(item, Mapping)
            or not isinstance(item.get("name"), str)
            or not isinstance(item.get("value"), str)
        ):
            raise SilenceError(
                f"matchers[{at}]",
                f"expected {{name, value[, regex]}} with string name and value, got {_short(item)}",
            )
        unknown = set(item) - {"name", "value", "regex"}
        if unknown:
            raise SilenceError(f"matchers[{at}].{min(unknown)}", "unknown field; known: name, value, regex")
        try:
            matchers.append(Matcher(item["name"], item["value"], item.get("regex", False)))
        except SilenceError as exc:
            raise SilenceError(f"matchers[{at}].{exc.field}", exc.reason) from None
    return matchers


def _short(value: object) -> str:
    """``value`` for an error message: an attacker's megabyte is not echoed back."""
    return shorten(repr(value))


def parse_silence(body: object, now: float) -> dict[str, Any]:
    """Keyword arguments of ``AlertEngine.add_silence`` from a request body."""
    if not isinstance(body, Mapping):
        raise SilenceError("body", "expected a JSON object: matchers, and duration or ends_at")
    unknown = set(body) - {"matchers", "duration", "starts_at", "ends_at", "comment", "created_by"}
    if unknown:
        raise SilenceError(
            min(unknown),
            "unknown field; known: matchers, duration, starts_at, ends_at, comment, created_by",
        )
    starts_at = _moment("starts_at", body["starts_at"]) if "starts_at" in body else now
    if ("duration" in body) == ("ends_at" in body):
        raise SilenceError("duration", 'give either duration (e.g. "2h") or ends_at')
    if "duration" in body:
        try:
            ends_at = starts_at + parse_duration(body["duration"])
        except ValueError as exc:
            raise SilenceError("duration", str(exc)) from None
    else:
        ends_at = _moment("ends_at", body["ends_at"])
    if not starts_at < ends_at <= now + MAX_SECONDS:
        raise SilenceError(
            "ends_at" if "ends_at" in body else "duration", "must end after it starts, within a year"
        )
    check_text("comment", body.get("comment", ""), MAX_COMMENT)
    check_text("created_by", body.get("created_by", ""), MAX_CREATED_BY)
    return {
        "matchers": _matchers(body.get("matchers")),
        "starts_at": starts_at,
        "ends_at": ends_at,
        "comment": body.get("comment", ""),
        "created_by": body.get("created_by", ""),
    }
