"""Notifier ``apprise``: sends each notification to every URL in ``urls`` through
apprise (mail, Slack, Telegram, ntfy, generic JSON webhooks, ...).

Table keys: ``urls`` (required): a non-empty list of apprise URLs.
Apprise's payloads have no field of ours: the notification's id is the body's
last line, ``(netprof notification <id>)``, for a receiver to deduplicate by.
URLs carry secrets (passwords, tokens): only apprise's redacted form is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from netprof_daemon import hookimpl
from netprof_daemon.notification import Notification

notify_logger = logging.getLogger("netprofd.notify")

# apprise is imported when the plugin is configured, not when the daemon loads
# its entry points: it costs megabytes a daemon without apprise URLs need not carry.
_apprise: Any = None
_redacted_urls: list[str] = []
_TYPES = {"info": "INFO", "warning": "WARNING", "critical": "FAILURE"}  # apprise.NotifyType members


@hookimpl
def netprof_describe() -> str:
    return "Sends alerts through apprise to mail, chat and webhook services (notifiers.apprise.urls)"


@hookimpl
def netprof_configure(table: Mapping[str, Any]) -> None:
    global _apprise, _redacted_urls
    import apprise

    unknown = sorted(set(table) - {"urls"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key (known: urls)")
    urls = table.get("urls")
    if not isinstance(urls, list) or not urls:
        raise ValueError("urls: required, a non-empty list of apprise URLs")
    services = []
    for index, url in enumerate(urls):
        # instantiate() returns None for a URL no apprise plugin accepts; the
        # message must not repeat the URL, which may hold a secret.
        service = apprise.Apprise.instantiate(url) if isinstance(url, str) else None
        if service is None:
            raise ValueError(f"urls[{index}]: not a URL apprise accepts (see apprise's list of services)")
        services.append(service)
    sender = apprise.Apprise()
    for service in services:
        sender.add(service)
    _apprise = sender
    _redacted_urls = [service.url(privacy=True) for service in services]
    notify_logger.info("apprise: sending to %s", ", ".join(_redacted_urls))


@hookimpl
async def netprof_notify(notification: Notification) -> None:
    if _apprise is None:
        raise RuntimeError("apprise is not configured")
    import apprise

    if notification.state == "resolved":
        notify_type = apprise.NotifyType.SUCCESS
    else:
        notify_type = apprise.NotifyType[_TYPES.get(notification.severity, "INFO")]
    delivered = await _apprise.async_notify(
        title=notification.title,
        body=notification.body,
        notify_type=notify_type,
        body_format=apprise.NotifyFormat.TEXT,
    )
    # bool(): True only when every URL took it (a plain bool before apprise 2).
    if not delivered:
        raise RuntimeError(f"apprise could not deliver to every one of {', '.join(_redacted_urls)}")
