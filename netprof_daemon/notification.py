"""What a notifier plugin receives: a notification about one or more alerts.

Alerts that start firing together (within ``group_wait``) go out as one
notification; a resolved alert goes out on its own notification with state
``resolved``. Both types are plain frozen dataclasses with a JSON form, so a
notification can be kept in the daemon's state until every plugin took it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ("SEVERITIES", "Alert", "Notification")

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
        return cls(
            **{**data, "labels": dict(data["labels"]), "annotations": dict(data.get("annotations", {}))}
        )


@dataclass(frozen=True, slots=True)
class Notification:
    id: str  # unique; the same on every retry and after a daemon restart
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
        """One line per alert, for plugins that send text."""
        return "\n".join(f"{a.state}: {a.name}: {a.summary}" for a in self.alerts)

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
        return cls(
            id=data["id"],
            state=data["state"],
            alerts=tuple(Alert.from_json(a) for a in data["alerts"]),
            created_at=data["created_at"],
            test=data.get("test", False),
        )


def _rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else 0
