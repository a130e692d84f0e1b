"""Notifier ``alertmanager``: posts alerts to a Prometheus Alertmanager
(``POST <url>/api/v2/alerts``), which then groups, silences and routes them.
Alertmanager deduplicates an alert posted twice by its labels; each alert also
carries the notification's id as the ``notification_id`` annotation.

Table keys: ``url`` (required), e.g. ``"http://127.0.0.1:9093"``;
``timeout`` (optional, seconds, default 10).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from netprof_daemon import hookimpl
from netprof_daemon.notification import Alert, Notification

_url: str | None = None
_timeout = 10.0


@hookimpl
def netprof_describe() -> str:
    return "Posts alerts to a Prometheus Alertmanager's v2 API (notifiers.alertmanager.url)"


@hookimpl
def netprof_configure(table: Mapping[str, Any]) -> None:
    global _url, _timeout
    unknown = sorted(set(table) - {"url", "timeout"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key (known: url, timeout)")
    url = table.get("url")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise ValueError('url: required, the Alertmanager\'s base URL, e.g. "http://127.0.0.1:9093"')
    timeout = table.get("timeout", 10.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout: {timeout!r} is not a number of seconds > 0")
    _url = url.rstrip("/") + "/api/v2/alerts"
    _timeout = float(timeout)


@hookimpl
async def netprof_notify(notification: Notification) -> None:
    if _url is None:
        raise RuntimeError("alertmanager is not configured")
    payload = [postable_alert(alert, notification) for alert in notification.alerts]
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_timeout)) as session,
        session.post(_url, json=payload) as response,
    ):
        if response.status // 100 != 2:
            text = (await response.text())[:200]
            raise RuntimeError(f"Alertmanager answered {response.status} at {_redacted(_url)}: {text}")


def _redacted(url: str) -> str:
    """``url`` without its user info: a password there must not reach the logs or the API."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def postable_alert(alert: Alert, notification: Notification) -> dict[str, Any]:
    """One alert in the form of Alertmanager's ``postableAlert``."""
    labels = {"alertname": alert.name, "severity": alert.severity, **alert.labels}
    if notification.test:
        labels["test"] = "true"
    # Alertmanager deduplicates by labels itself; the id (the same on every
    # retry and after a restart) is there for whatever reads the annotations.
    annotations = {"summary": alert.summary, **alert.annotations, "notification_id": notification.id}
    generator_url = annotations.pop("generator_url", None)
    body: dict[str, Any] = {
        "labels": {key: str(value) for key, value in labels.items()},
        "annotations": {key: str(value) for key, value in annotations.items()},
        "startsAt": _rfc3339(alert.starts_at),
    }
    if alert.state == "resolved":
        # An endsAt in the past is how Alertmanager learns an alert resolved.
        body["endsAt"] = _rfc3339(alert.ends_at if alert.ends_at is not None else notification.created_at)
    if generator_url:
        body["generatorURL"] = generator_url
    return body


def _rfc3339(unix_seconds: float) -> str:
    moment = datetime.fromtimestamp(unix_seconds, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
