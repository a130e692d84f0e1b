"""What a notifier plugin receives: a notification about one or more alerts.

Alerts that start firing together (within ``group_wait``) go out as one
notification; a resolved alert goes out on its own notification with state
``resolved``. Both types are plain frozen dataclasses with a JSON form, so a
notification can be kept in the daemon's state until every plugin took it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeGuard

__all__ = ("SEVERITIES", "Alert", "Notification", "finite_number")

# Ordered from least to most urgent.
SEVERITIES = ("info", "warning", "critical")
State = Literal["firing", "resolved"]


@dataclass(frozen=True, slots=True)
class Alert:
    name: str  # the rule's name, e.g. "NetworkProfilingHighErrorRate"
    state: State
    severity: str  # one of SEVERITIES
    labels: Mapping[str, str]  # always "alertname" and "severity"; "app", "route" when the rule has them
    value: float | None  # the metric when last evaluated (None: no data)
    threshold: float
    summary: str  # one line a person can act on
    starts_at: float  # unix seconds: when it started firing
    ends_at: float | None = None  # unix seconds: when it resolved
    annotations: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = dict(self.labels)
        data["annotations"] = dict(self.annotations)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Alert:
        """An alert as :meth:`to_json` wrote it; ValueError, TypeError or
        KeyError when it does not fit (saved state is checked, not trusted)."""
        alert = cls(
            **{**data, "labels": dict(data["labels"]), "annotations": dict(data.get("annotations", {}))}
        )
        problem = _alert_problem(alert)
        if problem:
            raise ValueError(f"alert {alert.name!r}: {problem}")
        return alert


def _alert_problem(alert: Alert) -> str | None:
    if not all(isinstance(text, str) for text in (alert.name, alert.severity, alert.summary)):
        return "name, severity and summary must be strings"
    if alert.state not in ("firing", "resolved"):
        return f"state {alert.state!r} is not firing or resolved"
    for name in ("labels", "annotations"):
        pairs = getattr(alert, name).items()
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs):
            return f"{name} must map strings to strings"
    if not all(finite_number(t) for t in (alert.threshold, alert.starts_at)):
        return "threshold and starts_at must be numbers"
    if not all(t is None or finite_number(t) for t in (alert.value, alert.ends_at)):
        return "value and ends_at must be numbers or null"
    return None


def finite_number(value: object) -> TypeGuard[int | float]:
    """A number a float holds: not a bool, NaN or an infinity, nor an integer
    past every float (JSON carries any; math.isfinite raises OverflowError on it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True, slots=True)
class Notification:
    # Unique, and the same on every retry and after a daemon restart: delivery
    # is at least once, and a receiver deduplicates by it (every built-in
    # plugin's payload carries it).
    id: str
    state: State
    alerts: tuple[Alert, ...]
    created_at: float  # unix seconds
    test: bool = False  # sent by ``netprofd --test-notify``

    @property
    def severity(self) -> str:
        """The most urgent severity among the alerts."""
        return max((a.severity for a in self.alerts), key=_rank, default="info")

    @property
    def title(self) -> str:
        names = sorted({a.name for a in self.alerts})
        head = "[TEST] " if self.test else ""
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        return f"{head}[{self.state.upper()}:{self.severity}] {names[0] if names else 'netprof'}{more}"

    @property
    def body(self) -> str:
        """One line per alert, then the notification's id, for plugins that send text."""
        lines = [f"{a.state}: {a.name}: {a.summary}" for a in self.alerts]
        return "\n".join([*lines, self.id_line])

    @property
    def id_line(self) -> str:
        """How text payloads carry the id, for a receiver to deduplicate by."""
        return f"(netprof notification {self.id})"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "severity": self.severity,
            "title": self.title,
            "created_at": self.created_at,
            "test": self.test,
            "alerts": [a.to_json() for a in self.alerts],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Notification:
        """A notification as :meth:`to_json` wrote it; ValueError, TypeError or
        KeyError when it does not fit."""
        notification = cls(
            id=data["id"],
            state=data["state"],
            alerts=tuple(Alert.from_json(a) for a in data["alerts"]),
            created_at=data["created_at"],
            test=data.get("test", False),
        )
        if not isinstance(notification.id, str) or not notification.id:
            raise ValueError(f"id {notification.id!r} is not a non-empty string")
        if notification.state not in ("firing", "resolved") or not finite_number(notification.created_at):
            raise ValueError(f"notification {notification.id}: bad state or created_at")
        if not isinstance(notification.test, bool):
            raise TypeError(f"notification {notification.id}: test must be true or false")
        return notification


def _rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else 0
