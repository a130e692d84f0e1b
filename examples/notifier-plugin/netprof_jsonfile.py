"""Example netprof notifier: appends each notification, as one line of JSON,
to the file named in the configuration::

    [notifiers.jsonfile]
    path = "/var/log/netprof/alerts.jsonl"
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from netprof_daemon import hookimpl
from netprof_daemon.notification import Notification

_path: Path | None = None


@hookimpl
def netprof_describe() -> str:
    return "Appends each notification as a JSON line to notifiers.jsonfile.path"


@hookimpl
def netprof_configure(table: Mapping[str, Any]) -> None:
    global _path
    path = table.get("path")
    if not isinstance(path, str) or not path:
        # "<key>: ..." lets netprofd report it as notifiers.jsonfile.path: ...
        raise ValueError("path: required, the file to append notifications to")
    if not Path(path).parent.is_dir():
        raise ValueError(f"path: directory {str(Path(path).parent)!r} does not exist")
    _path = Path(path)


@hookimpl
def netprof_notify(notification: Notification) -> None:
    # Sync is fine: netprofd calls this in a worker thread, with a timeout.
    # Raising (e.g. disk full) makes netprofd retry the same notification later.
    if _path is None:
        raise RuntimeError("jsonfile is not configured")
    with _path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(notification.to_json(), sort_keys=True) + "\n")
