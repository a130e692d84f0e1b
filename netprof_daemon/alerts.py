"""The alert lifecycle, as Prometheus and Alertmanager do it, without them:
inactive → pending (the rule's ``for``) → firing → resolved, with flap damping
(``keep_firing_for``), grouping (alerts that fire within ``group_wait`` go out
as one notification), ``repeat_interval`` for an alert still firing, and
silences. The engine is fed one evaluation per tick and hands back the
notifications that are due; it keeps no clock of its own."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import re2  # type: ignore[import-untyped]

from netprof_core._display import printable

from .notification import Alert, Notification, finite_number
from .rules import Rule, Sample

__all__ = (
    "MAX_COMMENT",
    "MAX_CREATED_BY",
    "MAX_LABEL_NAME",
    "MAX_MATCHERS",
    "MAX_PATTERN",
    "MAX_REGEX_MATCHERS",
    "MAX_SILENCES",
    "ActiveAlert",
    "AlertEngine",
    "Matcher",
    "Silence",
    "SilenceError",
    "fingerprint",
    "within_limits",
)

Phase = Literal["pending", "firing"]

# Bounds on silences (docs/NETWORK_PROFILING_API.md): anyone with the API key
# can make them, and every alert is matched against all of them on the loop.
MAX_SILENCES = 1000  # not yet expired (active or pending) at once; as many expired ones are kept
MAX_MATCHERS = 16  # per silence
# Regex matchers in all active or pending silences together: an alert is matched
# against every one of them on the loop (a few µs each), so this bounds that.
MAX_REGEX_MATCHERS = 1000
MAX_LABEL_NAME = 128  # characters of a matcher's label name
MAX_PATTERN = 1024  # characters of a matcher's value or regular expression
MAX_COMMENT = 1024
MAX_CREATED_BY = 256
MAX_HISTORY = 500  # events kept (fired, resolved, silenced)
# RE2's budget for one compiled pattern: bounds its memory as RE2 bounds its time.
_RE2_MAX_MEM = 256 * 1024
_SILENCE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class SilenceError(ValueError):
    """A silence that may not be kept; ``field`` names the culprit (an API parameter)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


@functools.lru_cache(maxsize=1024)
def _re2(pattern: str) -> Any:
    """``pattern`` compiled by RE2, whose matching takes time linear in the
    text whatever the pattern (no backtracking): Python's re could spend
    hours on ``((\\w+)+)+!`` with the event loop stopped."""
    options = re2.Options()
    options.log_errors = False  # RE2 would write each refused pattern to stderr
    options.max_mem = _RE2_MAX_MEM
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = (
            exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        )
        raise SilenceError(
            "value",
            f"not a regular expression RE2 accepts (the syntax of Prometheus and Alertmanager): {reason}",
        ) from None


def check_text(field_name: str, value: object, limit: int, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise SilenceError(field_name, f"expected a string, got {type(value).__name__}")
    if len(value) > limit:
        raise SilenceError(field_name, f"{len(value)} characters; at most {limit}")
    if not empty and not value:
        raise SilenceError(field_name, "must not be empty")
    return value


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
        """An alert saved before a restart; ValueError or TypeError when it does
        not fit (a bad one would make every later tick fail)."""
        alert = cls(**data)
        problem = _active_problem(alert)
        if problem:
            raise ValueError(problem)
        return alert


def _active_problem(alert: ActiveAlert) -> str | None:
    strings = (alert.key, alert.rule, alert.severity, alert.summary)
    if not all(isinstance(value, str) for value in strings):
        return "key, rule, severity and summary must be strings"
    if not isinstance(alert.labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in alert.labels.items()
    ):
        return "labels must map strings to strings"
    if alert.phase not in ("pending", "firing"):
        return f"phase {alert.phase!r} is not pending or firing"
    if not all(finite_number(t) for t in (alert.threshold, alert.pending_since, alert.last_true)):
        return "threshold, pending_since and last_true must be numbers"
    if not all(t is None or finite_number(t) for t in (alert.value, alert.firing_since, alert.last_notified)):
        return "value, firing_since and last_notified must be numbers or null"
    if alert.action not in (None, "disable"):
        return f"action {alert.action!r} is not null or disable"
    return None


@dataclass(frozen=True, slots=True)
class Matcher:
    """``name`` equals ``value``, or with ``regex`` fully matches it (RE2, as
    Alertmanager's matchers). Checked when made: SilenceError names the field."""

    name: str
    value: str
    regex: bool = False

    def __post_init__(self) -> None:
        check_text("name", self.name, MAX_LABEL_NAME, empty=False)
        check_text("value", self.value, MAX_PATTERN)
        if not isinstance(self.regex, bool):
            raise SilenceError("regex", f"expected true or false, got {self.regex!r}")
        if self.regex:
            _re2(self.value)

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        return _re2(self.value).fullmatch(actual) is not None if self.regex else actual == self.value


@dataclass(frozen=True, slots=True)
class Silence:
    id: str
    matchers: tuple[Matcher, ...]
    starts_at: float
    ends_at: float
    comment: str = ""
    created_by: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _SILENCE_ID.fullmatch(self.id):
            raise SilenceError("id", f"expected 1 to 64 letters, digits, _ or -, got {str(self.id)[:80]!r}")
        if not isinstance(self.matchers, tuple) or not all(isinstance(m, Matcher) for m in self.matchers):
            raise SilenceError("matchers", "expected a tuple of Matcher")
        if not 1 <= len(self.matchers) <= MAX_MATCHERS:
            raise SilenceError("matchers", f"{len(self.matchers)} matchers; from 1 to {MAX_MATCHERS}")
        for name in ("starts_at", "ends_at"):
            if not finite_number(getattr(self, name)):
                raise SilenceError(name, f"expected unix seconds, got {getattr(self, name)!r}")
        if self.ends_at < self.starts_at:
            raise SilenceError("ends_at", "must not end before it starts")
        check_text("comment", self.comment, MAX_COMMENT)
        check_text("created_by", self.created_by, MAX_CREATED_BY)

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
        """A silence as :meth:`to_json` wrote it, checked as a new one is:
        SilenceError, TypeError or KeyError when it does not fit."""
        if not isinstance(data, Mapping):
            raise TypeError(f"expected an object, got {type(data).__name__}")
        fields = {k: v for k, v in data.items() if k != "state"}
        matchers = data["matchers"]
        if not isinstance(matchers, list) or len(matchers) > MAX_MATCHERS:
            raise SilenceError("matchers", f"expected a list of at most {MAX_MATCHERS} matchers")
        fields["matchers"] = tuple(Matcher(**m) for m in matchers)
        return cls(**fields)


def within_limits(silences: Iterable[Silence], now: float) -> tuple[list[Silence], list[Silence]]:
    """(kept, dropped): the silences as if added one by one, oldest first,
    under the limits a new one meets (restored state is checked the same way)."""
    kept, dropped = [], []
    live = regexes = 0
    for silence in sorted(silences, key=lambda s: s.starts_at):
        if silence.ends_at <= now:
            kept.append(silence)
            continue
        needs = sum(m.regex for m in silence.matchers)
        if live >= MAX_SILENCES or regexes + needs > MAX_REGEX_MATCHERS:
            dropped.append(silence)
            continue
        live, regexes = live + 1, regexes + needs
        kept.append(silence)
    return kept, dropped


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
        self.history_count = 0  # events ever added: the store saves the ones it has not seen
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
            self._remember({"at": now, "event": "silenced", "silence": silence.id, "alert": alert.to_json()})
            return
        group = self._groups.get(state)
        if group is None:
            group = self._groups[state] = _Group(state, now)
        group.alerts[key] = alert

    def _record(self, event: str, alert: ActiveAlert, now: float) -> None:
        self._remember({"at": now, "event": event, "alert": alert.to_alert(
            "resolved" if event == "resolved" else "firing", now).to_json()})  # fmt: skip

    def _remember(self, event: dict[str, Any]) -> None:
        self.history.append(event)
        del self.history[:-MAX_HISTORY]
        self.history_count += 1

    def unsaved_history(self, saved_count: int) -> list[dict[str, Any]]:
        """The events added since the store saw ``saved_count`` of them."""
        new = self.history_count - saved_count
        return self.history[-new:] if new > 0 else []

    def requeue(self, notifications: Iterable[Notification]) -> None:
        """Put back notifications :meth:`due` handed out that could not be kept."""
        for notification in notifications:
            group = self._groups.setdefault(
                notification.state, _Group(notification.state, notification.created_at)
            )
            for alert in notification.alerts:
                group.alerts.setdefault(fingerprint(alert.labels), alert)

    def prune(self, now: float, keep_expired: float = 86400.0) -> list[str]:
        """Forget silences expired more than ``keep_expired`` seconds ago, and
        the oldest expired ones beyond MAX_SILENCES; returns their ids."""
        expired = sorted((s for s in self.silences.values() if s.ends_at <= now), key=lambda s: s.ends_at)
        surplus = len(expired) - MAX_SILENCES
        forgotten = [s.id for at, s in enumerate(expired) if at < surplus or now - s.ends_at > keep_expired]
        for silence_id in forgotten:
            del self.silences[silence_id]
        return forgotten

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
                alert = raw if isinstance(raw, Alert) else Alert.from_json(raw)
                group.alerts[fingerprint(alert.labels)] = alert
            self._groups[group.state] = group

    # -- silences ---------------------------------------------------------------------

    def add_silence(
        self,
        matchers: Sequence[Matcher],
        starts_at: float,
        ends_at: float,
        comment: str,
        created_by: str,
        *,
        now: float | None = None,
    ) -> Silence:
        """A new silence (kept by the caller's store, one row each); SilenceError
        when MAX_SILENCES are already active or pending."""
        now = starts_at if now is None else now
        live = [s for s in self.silences.values() if s.ends_at > now]
        if len(live) >= MAX_SILENCES:
            raise SilenceError(
                "silences",
                f"{MAX_SILENCES} silences are active or pending, the most netprofd keeps: "
                "expire one first (DELETE .../silences/{id})",
            )
        regexes = sum(m.regex for s in live for m in s.matchers) + sum(m.regex for m in matchers)
        if regexes > MAX_REGEX_MATCHERS:
            raise SilenceError(
                "matchers",
                f"{regexes} regex matchers in active or pending silences; at most {MAX_REGEX_MATCHERS} "
                "in all: use equality matchers, or expire a silence first",
            )
        silence = Silence(uuid.uuid4().hex, tuple(matchers), starts_at, ends_at, comment, created_by)
        self.silences[silence.id] = silence
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
        return silence


def _summary(rule: Rule, sample: Sample) -> str:
    # One line a person reads (a notification's text, a log line): the names in
    # it, from outside, shown escaped; the labels keep them exactly.
    where = printable(sample.labels.get("app", ""))
    if "route" in sample.labels:
        where += f" {printable(sample.labels.get('method', ''))} {printable(sample.labels['route'])}"
    value = "no data" if sample.value is None else f"{sample.value:.4g}"
    text = f"{rule.metric} = {value} {rule.op} {rule.threshold:g} on {where.strip()}"
    if rule.window:
        text += f" (last {rule.window:g} s)"
    return f"{rule.summary}: {text}" if rule.summary else text
