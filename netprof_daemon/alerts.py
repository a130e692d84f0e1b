"""The alert lifecycle, as Prometheus and Alertmanager do it, without them:
inactive → pending (the rule's ``for``) → firing → resolved, with flap damping
(``keep_firing_for``), grouping (alerts that fire within ``group_wait`` go out
as one notification), ``repeat_interval`` for an alert still firing, and
silences. The engine is fed one evaluation per tick and hands back the
notifications that are due; it keeps no clock of its own."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .notification import Alert, Notification
from .rules import Rule, Sample

__all__ = ("ActiveAlert", "AlertEngine", "Matcher", "Silence", "fingerprint")

Phase = Literal["pending", "firing"]


def fingerprint(labels: Mapping[str, str]) -> str:
    """A stable id of an alert: its labels."""
    text = json.dumps(sorted(labels.items()), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(slots=True)
class ActiveAlert:
    """An alert that is pending or firing (inactive ones are not kept)."""

    key: str
    rule: str
    labels: dict[str, str]
    severity: str
    threshold: float
    summary: str
    phase: Phase
    pending_since: float
    last_true: float  # the last evaluation where the condition held
    value: float | None
    firing_since: float | None = None
    last_notified: float | None = None  # None while firing: still to be notified
    action: str | None = None

    def to_alert(self, state: Literal["firing", "resolved"], now: float) -> Alert:
        return Alert(
            name=self.rule,
            state=state,
            severity=self.severity,
            labels=dict(self.labels),
            value=self.value,
            threshold=self.threshold,
            summary=self.summary,
            starts_at=self.firing_since or self.pending_since,
            ends_at=now if state == "resolved" else None,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ActiveAlert:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Matcher:
    name: str
    value: str
    regex: bool = False

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        return re.fullmatch(self.value, actual) is not None if self.regex else actual == self.value


@dataclass(frozen=True, slots=True)
class Silence:
    id: str
    matchers: tuple[Matcher, ...]
    starts_at: float
    ends_at: float
    comment: str = ""
    created_by: str = ""

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def silences(self, labels: Mapping[str, str], now: float) -> bool:
        return self.active(now) and all(m.matches(labels) for m in self.matchers)

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        data = asdict(self)
        if now is not None:
            data["state"] = (
                "active" if self.active(now) else ("pending" if now < self.starts_at else "expired")
            )
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Silence:
        fields = {k: v for k, v in data.items() if k != "state"}
        fields["matchers"] = tuple(Matcher(**m) for m in data["matchers"])
        return cls(**fields)


@dataclass(slots=True)
class _Group:
    state: Literal["firing", "resolved"]
    opened_at: float
    alerts: dict[str, Alert] = field(default_factory=dict)


class AlertEngine:
    """Feed :meth:`observe` one list of samples per tick; :meth:`due` returns
    the notifications to send. ``changed`` tells whether state must be saved."""

    def __init__(self, *, group_wait: float, repeat_interval: float, notify: bool = True) -> None:
        self.group_wait = group_wait
        self.repeat_interval = repeat_interval
        self.notify = notify  # enable_alerts: states are kept either way
        self.active: dict[str, ActiveAlert] = {}
        self.silences: dict[str, Silence] = {}
        self.history: list[dict[str, Any]] = []  # newest last; fired, resolved, silenced
        self._groups: dict[str, _Group] = {}
        self.newly_firing: list[ActiveAlert] = []  # this tick's, for actions
        self.changed = False

    # -- one tick -------------------------------------------------------------------

    def observe(self, samples: Iterable[Sample], rules: Sequence[Rule], now: float) -> None:
        self.newly_firing = []
        seen: set[str] = set()
        for sample in samples:
            key = fingerprint(sample.labels)
            seen.add(key)
            alert = self.active.get(key)
            if sample.holds:
                if alert is None:
                    self.active[key] = alert = self._start(key, sample, now)
                alert.last_true = now
                alert.value = sample.value
                alert.summary = _summary(sample.rule, sample)
                if alert.phase == "pending" and now - alert.pending_since >= sample.rule.for_seconds:
                    self._fire(alert, now)
            elif alert is not None and sample.value is not None:
                alert.value = sample.value
                alert.summary = _summary(sample.rule, sample)
                self._maybe_end(alert, sample.rule.keep_firing_for, now)
            elif alert is not None:
                # No verdict (too few requests, or a window still empty after a
                # restart): a firing alert stands until the requests that made
                # it fire have left the rule's window.
                self._maybe_end(alert, max(sample.rule.window, sample.rule.keep_firing_for), now)
        # An alert whose rule no longer yields a sample (an app gone, a rule removed) ends too.
        by_name = {rule.name: rule for rule in rules}
        for key, alert in list(self.active.items()):
            if key not in seen:
                rule = by_name.get(alert.rule)
                self._maybe_end(alert, rule.keep_firing_for if rule else 0.0, now)
        for alert in self.active.values():
            if (
                alert.phase == "firing"
                and alert.last_notified is not None
                and now - alert.last_notified >= self.repeat_interval
            ):
                self._queue(alert.to_alert("firing", now), "firing", now)
                alert.last_notified = now
                self.changed = True

    def _start(self, key: str, sample: Sample, now: float) -> ActiveAlert:
        rule = sample.rule
        self.changed = True
        return ActiveAlert(
            key=key,
            rule=rule.name,
            labels=dict(sample.labels),
            severity=rule.severity,
            threshold=rule.threshold,
            summary=_summary(rule, sample),
            phase="pending",
            pending_since=now,
            last_true=now,
            value=sample.value,
            action=rule.action,
        )

    def _fire(self, alert: ActiveAlert, now: float) -> None:
        alert.phase = "firing"
        alert.firing_since = now
        alert.last_notified = now
        self.newly_firing.append(alert)
        self._record("firing", alert, now)
        self._queue(alert.to_alert("firing", now), "firing", now)
        self.changed = True

    def _maybe_end(self, alert: ActiveAlert, damping: float, now: float) -> None:
        """End ``alert`` unless it held within the last ``damping`` seconds."""
        if alert.phase == "pending":
            del self.active[alert.key]
            self.changed = True
        elif now - alert.last_true >= damping:
            del self.active[alert.key]
            self._record("resolved", alert, now)
            self._queue(alert.to_alert("resolved", now), "resolved", now)
            self.changed = True

    def _queue(self, alert: Alert, state: Literal["firing", "resolved"], now: float) -> None:
        if not self.notify:
            return
        key = fingerprint(alert.labels)
        silence = next((s for s in self.silences.values() if s.silences(alert.labels, now)), None)
        if silence is not None:
            self.history.append(
                {"at": now, "event": "silenced", "silence": silence.id, "alert": alert.to_json()}
            )
            del self.history[:-500]
            return
        group = self._groups.get(state)
        if group is None:
            group = self._groups[state] = _Group(state, now)
        group.alerts[key] = alert

    def _record(self, event: str, alert: ActiveAlert, now: float) -> None:
        self.history.append({"at": now, "event": event, "alert": alert.to_alert(
            "resolved" if event == "resolved" else "firing", now).to_json()})  # fmt: skip
        del self.history[:-500]

    def requeue(self, notifications: Iterable[Notification]) -> None:
        """Put back notifications :meth:`due` handed out that could not be kept."""
        for notification in notifications:
            group = self._groups.setdefault(
                notification.state, _Group(notification.state, notification.created_at)
            )
            for alert in notification.alerts:
                group.alerts.setdefault(fingerprint(alert.labels), alert)

    def prune(self, now: float, keep_expired: float = 86400.0) -> None:
        """Forget silences expired more than ``keep_expired`` seconds ago."""
        for silence_id, silence in list(self.silences.items()):
            if now - silence.ends_at > keep_expired:
                del self.silences[silence_id]
                self.changed = True

    def due(self, now: float) -> list[Notification]:
        """Notifications whose group has waited ``group_wait``; they leave the engine."""
        out = []
        for state, group in list(self._groups.items()):
            if now - group.opened_at >= self.group_wait:
                del self._groups[state]
                alerts = tuple(
                    sorted(group.alerts.values(), key=lambda a: (a.name, sorted(a.labels.items())))
                )
                out.append(Notification(uuid.uuid4().hex, group.state, alerts, now))
        return out

    # -- restart: the engine's state to and from the daemon's store ----------------

    def pending_groups(self) -> list[dict[str, Any]]:
        return [
            {"state": g.state, "opened_at": g.opened_at, "alerts": [a.to_json() for a in g.alerts.values()]}
            for g in self._groups.values()
        ]

    def restore(
        self,
        active: Iterable[ActiveAlert],
        silences: Iterable[Silence],
        groups: Iterable[Mapping[str, Any]],
        now: float | None = None,
    ) -> None:
        """The state saved before a restart. The time the daemon was down
        counts as holding: a firing alert is judged again on fresh windows."""
        self.active = {alert.key: alert for alert in active}
        for restored in self.active.values():
            restored.last_true = max(restored.last_true, now or restored.last_true)
        self.silences = {silence.id: silence for silence in silences}
        for data in groups:
            group = _Group(data["state"], data["opened_at"])
            for raw in data["alerts"]:
                alert = Alert.from_json(raw)
                group.alerts[fingerprint(alert.labels)] = alert
            self._groups[group.state] = group

    # -- silences ---------------------------------------------------------------------

    def add_silence(
        self, matchers: Sequence[Matcher], starts_at: float, ends_at: float, comment: str, created_by: str
    ) -> Silence:
        silence = Silence(uuid.uuid4().hex, tuple(matchers), starts_at, ends_at, comment, created_by)
        self.silences[silence.id] = silence
        self.changed = True
        return silence

    def expire_silence(self, silence_id: str, now: float) -> Silence | None:
        silence = self.silences.get(silence_id)
        if silence is None:
            return None
        if silence.ends_at > now:
            silence = Silence(
                silence.id,
                silence.matchers,
                min(silence.starts_at, now),
                now,
                silence.comment,
                silence.created_by,
            )
            self.silences[silence.id] = silence
            self.changed = True
        return silence


def _summary(rule: Rule, sample: Sample) -> str:
    where = sample.labels.get("app", "")
    if "route" in sample.labels:
        where += f" {sample.labels.get('method', '')} {sample.labels['route']}"
    value = "no data" if sample.value is None else f"{sample.value:.4g}"
    text = f"{rule.metric} = {value} {rule.op} {rule.threshold:g} on {where.strip()}"
    if rule.window:
        text += f" (last {rule.window:g} s)"
    return f"{rule.summary}: {text}" if rule.summary else text
