"""Notifier ``log``: one log line per alert on the ``netprofd.notify`` logger,
ending with ``notification <id>`` (the same id on a retry or after a restart).

Active by default when the configuration has no ``notifiers`` table. Table keys:
``level`` (optional): the level for firing alerts, default ``WARNING``;
resolved alerts are logged at ``INFO``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from netprof_daemon import hookimpl
from netprof_daemon.notification import Notification

notify_logger = logging.getLogger("netprofd.notify")

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_firing_level = logging.WARNING


@hookimpl
def netprof_describe() -> str:
    return "Writes one line per alert to the daemon's log (logger netprofd.notify)"


@hookimpl
def netprof_configure(table: Mapping[str, Any]) -> None:
    global _firing_level
    unknown = sorted(set(table) - {"level"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key (known: level)")
    level = table.get("level", "WARNING")
    if not isinstance(level, str) or level.upper() not in _LEVELS:
        raise ValueError(f"level: {level!r} is not one of {', '.join(_LEVELS)}")
    _firing_level = logging.getLevelName(level.upper())


@hookimpl
def netprof_notify(notification: Notification) -> None:
    level = _firing_level if notification.state == "firing" else logging.INFO
    for alert in notification.alerts:
        notify_logger.log(
            level,
            "%s%s %s [%s] %s (value %s, threshold %s; notification %s)",
            "[TEST] " if notification.test else "",
            alert.state.upper(),
            alert.name,
            alert.severity,
            alert.summary,
            alert.value,
            alert.threshold,
            notification.id,
        )
