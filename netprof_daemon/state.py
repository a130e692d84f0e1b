"""The daemon's durable alert state, in ``state_dir/alerts.sqlite3`` (sqlite
from the standard library): the alert engine's state, and the outbox of
notifications each plugin has yet to take. A notification enters the outbox
in the same transaction that takes it out of the engine, and leaves it when
its plugin took it, so a restart neither loses nor repeats one."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .alerts import ActiveAlert, AlertEngine, Silence
from .notification import Notification

__all__ = ("AlertStateStore", "OutboxItem")

STATE_FILE = "alerts.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS engine (name TEXT PRIMARY KEY, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    notification_id TEXT NOT NULL,
    plugin TEXT NOT NULL,
    notification TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT,
    PRIMARY KEY (notification_id, plugin)
);
"""


@dataclass(frozen=True, slots=True)
class OutboxItem:
    notification: Notification
    plugin: str
    attempts: int
    next_attempt: float
    last_error: str | None


class AlertStateStore:
    def __init__(self, state_dir: str | Path) -> None:
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / STATE_FILE
        # One connection, used only from the event loop's thread.
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- the engine ------------------------------------------------------------------

    def restore(self, engine: AlertEngine) -> None:
        saved = {name: json.loads(text) for name, text in self._db.execute("SELECT name, json FROM engine")}
        engine.restore(
            (ActiveAlert.from_json(a) for a in saved.get("active", [])),
            (Silence.from_json(s) for s in saved.get("silences", [])),
            saved.get("groups", []),
            now=time.time(),
        )
        engine.history = saved.get("history", [])

    def load_extra(self) -> dict[str, Any]:
        """What the daemon keeps beside the engine (its running counts)."""
        row = self._db.execute("SELECT json FROM engine WHERE name = 'extra'").fetchone()
        return json.loads(row[0]) if row else {}

    def save(
        self,
        engine: AlertEngine,
        notifications: Iterable[Notification] = (),
        plugins: Iterable[str] = (),
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """The engine's state, and the notifications it just handed out (one
        outbox row per plugin), in one transaction."""
        plugins = list(plugins)
        rows: dict[str, Any] = {
            "active": [a.to_json() for a in engine.active.values()],
            "silences": [s.to_json() for s in engine.silences.values()],
            "groups": engine.pending_groups(),
            "history": engine.history,
        }
        if extra is not None:
            rows["extra"] = dict(extra)
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO engine (name, json) VALUES (?, ?)",
                [(name, json.dumps(value)) for name, value in rows.items()],
            )
            for notification in notifications:
                payload = json.dumps(notification.to_json())
                db.executemany(
                    "INSERT OR IGNORE INTO outbox (notification_id, plugin, notification, created_at, next_attempt) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [
                        (notification.id, plugin, payload, notification.created_at, notification.created_at)
                        for plugin in plugins
                    ],
                )
        engine.changed = False

    # -- the outbox ----------------------------------------------------------------------

    def due(self, now: float, limit: int = 100) -> list[OutboxItem]:
        """Each plugin's oldest undelivered notification, when its next attempt
        is due: a plugin takes its notifications in order (a retried "firing"
        never lands after its "resolved")."""
        cursor = self._db.execute(
            "SELECT notification, plugin, attempts, next_attempt, last_error FROM outbox AS o "
            "WHERE created_at = (SELECT MIN(created_at) FROM outbox WHERE plugin = o.plugin) "
            "AND next_attempt <= ? ORDER BY created_at LIMIT ?",
            (now, limit),
        )
        return [
            OutboxItem(Notification.from_json(json.loads(text)), plugin, attempts, next_attempt, error)
            for text, plugin, attempts, next_attempt, error in cursor
        ]

    def pending(self) -> list[dict[str, Any]]:
        cursor = self._db.execute(
            "SELECT notification_id, plugin, attempts, next_attempt, last_error FROM outbox ORDER BY next_attempt"
        )
        keys = ("notification_id", "plugin", "attempts", "next_attempt", "last_error")
        return [dict(zip(keys, row)) for row in cursor]

    def retry_all_now(self, now: float) -> int:
        """Make every undelivered notification due (at start: a restart is a
        good moment to try again); returns how many there are."""
        return self._db.execute("UPDATE outbox SET next_attempt = ?", (now,)).rowcount

    def delivered(self, item: OutboxItem) -> None:
        self._db.execute(
            "DELETE FROM outbox WHERE notification_id = ? AND plugin = ?", (item.notification.id, item.plugin)
        )

    def retry_later(self, item: OutboxItem, error: str, next_attempt: float) -> None:
        self._db.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt = ? "
            "WHERE notification_id = ? AND plugin = ?",
            (error, next_attempt, item.notification.id, item.plugin),
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
