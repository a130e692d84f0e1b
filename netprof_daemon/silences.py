"""Silences from the API's JSON: matchers and an end time, validated with
errors that name the field."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from .alerts import Matcher
from .rules import parse_duration

__all__ = ("SilenceError", "parse_silence")

MAX_SECONDS = 366 * 86400.0


class SilenceError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _moment(field: str, value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    raise SilenceError(field, f"expected unix seconds or an ISO 8601 date-time, got {value!r}")


def _matchers(value: object) -> list[Matcher]:
    if isinstance(value, Mapping):
        value = [{"name": k, "value": v} for k, v in value.items()]
    if not isinstance(value, list) or not value:
        raise SilenceError(
            "matchers", 'expected a non-empty object {"label": "value"} or list of {name, value, regex}'
        )
    matchers = []
    for at, item in enumerate(value):
        if (
            not isinstance(item, Mapping)
            or not isinstance(item.get("name"), str)
            or not isinstance(item.get("value"), str)
        ):
            raise SilenceError(
                f"matchers[{at}]",
                f"expected {{name, value[, regex]}} with string name and value, got {item!r}",
            )
        regex = item.get("regex", False)
        if not isinstance(regex, bool):
            raise SilenceError(f"matchers[{at}].regex", f"expected true or false, got {regex!r}")
        if regex:
            try:
                re.compile(item["value"])
            except re.error as exc:
                raise SilenceError(f"matchers[{at}].value", f"not a regular expression: {exc}") from None
        matchers.append(Matcher(item["name"], item["value"], regex))
    return matchers


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
    for field in ("comment", "created_by"):
        if not isinstance(body.get(field, ""), str):
            raise SilenceError(field, f"expected a string, got {body[field]!r}")
    return {
        "matchers": _matchers(body.get("matchers")),
        "starts_at": starts_at,
        "ends_at": ends_at,
        "comment": body.get("comment", ""),
        "created_by": body.get("created_by", ""),
    }
