"""The daemon's durable alert state, in ``state_dir/alerts.sqlite3`` (sqlite
from the standard library): the alert engine's state, its silences (one row
each), its history, and the outbox of notifications each plugin has yet to
take. A notification enters the outbox in the same transaction that takes it
out of the engine, and leaves it when its plugin took it, so a restart never
loses one; one whose plugin was cut off mid-delivery is sent again, with the
same id (delivery is at least once).

Saved state is checked, not trusted: a row that does not parse or fit is
dropped with one log line, a file sqlite finds corrupt is moved aside and the
daemon starts empty, and restoring never raises. A state directory the daemon
cannot write is one clear error (:class:`StateDirError`) before anything runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .alerts import (
    MAX_HISTORY,
    MAX_REGEX_MATCHERS,
    MAX_SILENCES,
    ActiveAlert,
    AlertEngine,
    Silence,
    within_limits,
)
from .log import alert_logger
from .notification import Alert, Notification

__all__ = ("STATE_FILE", "AlertStateStore", "OutboxItem", "StateDirError", "check_state_dir")

STATE_FILE = "alerts.sqlite3"
BUSY_TIMEOUT_SECONDS = 0.2
_SIDE_FILES = ("-wal", "-shm")  # sqlite's companions in WAL mode: they go where the file goes
_SCHEMA = """
CREATE TABLE IF NOT EXISTS engine (name TEXT PRIMARY KEY, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS silences (id TEXT PRIMARY KEY, ends_at REAL NOT NULL, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS history (seq INTEGER PRIMARY KEY AUTOINCREMENT, json TEXT NOT NULL);
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
# What sqlite says of a file that is not (or no longer) a database.
_CORRUPT_CODES = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}
_CORRUPT_WORDS = ("malformed", "not a database", "corrupt")
# What one bad row may raise while it is parsed and checked.
_BAD_ROW = (ValueError, TypeError, KeyError, AttributeError)
_T = TypeVar("_T")


class StateDirError(Exception):
    """The state directory (or a file in it) cannot be written: the deployment
    must change. Its message is one line naming the path and the reason."""


@dataclass(frozen=True, slots=True)
class OutboxItem:
    notification: Notification
    plugin: str
    attempts: int
    next_attempt: float
    last_error: str | None


def check_state_dir(state_dir: str | os.PathLike[str], *, create: bool = True) -> None:
    """StateDirError unless the daemon can write ``state_dir`` and the state
    files already in it. Without ``create`` (``--check``), a missing directory
    passes when its nearest existing parent is writable."""
    path = Path(state_dir)
    if not create and not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise StateDirError(f"state_dir {path} cannot be created: {parent} is not writable")
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateDirError(f"state_dir {path} cannot be created: {exc.strerror or exc}") from None
    try:  # an actual write: root passes os.access() checks that a read-only mount fails
        fd, probe = tempfile.mkstemp(dir=path, prefix=".netprofd-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StateDirError(f"state_dir {path} is not writable: {exc.strerror or exc}") from None
    for name in (STATE_FILE, *(STATE_FILE + side for side in _SIDE_FILES)):
        try:
            os.close(os.open(path / name, os.O_RDWR))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StateDirError(f"{path / name} is not writable: {exc.strerror or exc}") from None


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", "")  # Python 3.11+
    return name in _CORRUPT_CODES or any(word in str(exc).lower() for word in _CORRUPT_WORDS)


class AlertStateStore:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        """Open (or make) the state file. StateDirError when the directory or
        the file cannot be written; a corrupt file is moved aside, not fatal."""
        path = Path(state_dir)
        check_state_dir(path)
        self.path = path / STATE_FILE
        self._history_saved = 0  # the engine's history_count at the last save
        self._dropped = 0  # saved rows that did not parse or fit, dropped at restore
        # One connection, used only from the event loop's thread.
        self._db = self._open()
        self._drop_bad_outbox_rows()

    def close(self) -> None:
        self._db.close()

    # -- opening: a corrupt file is moved aside ------------------------------------------

    def _open(self) -> sqlite3.Connection:
        problem = self._corruption()
        if problem is not None:
            self._move_aside(problem)
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise StateDirError(f"{self.path} cannot be opened: {exc}") from None
            self._move_aside(str(exc))  # corrupt in a way the read-only check did not see
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            raise StateDirError(f"{self.path} cannot be made anew: {exc}") from None

    def _corruption(self) -> str | None:
        """Why the file is corrupt, or None. Read through a read-only
        connection: the last read-write one to close folds the WAL into the
        file and deletes it, which would rewrite a corrupt file and lose the
        WAL before they are moved aside. Every page is read, so a truncated
        file shows here, not in the middle of a tick."""
        if not self.path.exists():
            return None
        try:
            db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True)
        except sqlite3.DatabaseError as exc:
            return str(exc) if _is_corrupt(exc) else None
        try:
            verdict = [row[0] for row in db.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            return str(exc) if _is_corrupt(exc) else None
        finally:
            db.close()
        return None if verdict == ["ok"] else "quick_check: " + "; ".join(map(str, verdict[:3]))

    def _connect(self) -> sqlite3.Connection:
        # A short busy timeout: the connection is used on the event loop, and
        # only a process that is not netprofd could hold the file's lock.
        db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self, reason: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{STATE_FILE}.corrupt-{stamp}")
        moved = []
        for side in ("", *_SIDE_FILES):
            source = Path(f"{self.path}{side}")
            try:
                os.replace(source, f"{aside}{side}")
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StateDirError(
                    f"{source} is corrupt and cannot be moved aside: {exc.strerror}"
                ) from None
            moved.append(source.name)
        alert_logger.error(
            "%s is corrupt (%s): moved aside to %s (%s); starting with no alert state, silences or outbox",
            self.path, reason, aside, ", ".join(moved),
        )  # fmt: skip

    # -- the engine ------------------------------------------------------------------

    def restore(self, engine: AlertEngine, now: float | None = None) -> None:
        """The engine's state as saved; what does not parse or fit is dropped,
        one log line each. Never raises: at worst the engine starts empty."""
        now = time.time() if now is None else now
        rows = self._engine_rows()
        active = [
            alert
            for at, raw in enumerate(self._json_list(rows, "active"))
            if (alert := self._checked(f"active alert #{at}", raw, ActiveAlert.from_json)) is not None
        ]
        groups = [
            group
            for at, raw in enumerate(self._json_list(rows, "groups"))
            if (group := self._checked(f"pending notification group #{at}", raw, _group)) is not None
        ]
        silences = self._restore_silences(rows, now)
        try:
            engine.restore(active, silences, groups, now=now)
        except Exception as exc:  # noqa: BLE001  (a bug of ours: the daemon starts without the state)
            alert_logger.error("cannot restore the alert state (%s); starting without it", exc)
        engine.history = self._restore_history(rows)
        engine.history_count = self._history_saved = len(engine.history)
        if not self._dropped:
            return
        # What was dropped leaves the file too: logged once, not at every start.
        with contextlib.suppress(sqlite3.Error), self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO engine (name, json) VALUES (?, ?)",
                [
                    ("active", json.dumps([a.to_json() for a in engine.active.values()])),
                    ("groups", json.dumps(engine.pending_groups())),
                ],
            )

    def _engine_rows(self) -> dict[str, str]:
        try:
            return {str(name): text for name, text in self._db.execute("SELECT name, json FROM engine")}
        except sqlite3.Error as exc:
            alert_logger.error(
                "cannot read the saved alert state from %s: %s; starting without it", self.path, exc
            )
            return {}

    def _json_list(self, rows: Mapping[str, str], name: str) -> list[Any]:
        if name not in rows:
            return []
        try:
            value = json.loads(rows[name])
        except (ValueError, TypeError) as exc:
            self._dropped += 1
            alert_logger.error("dropped the saved %s: not JSON (%s)", name, exc)
            return []
        if not isinstance(value, list):
            self._dropped += 1
            alert_logger.error("dropped the saved %s: not a list", name)
            return []
        return value

    def _checked(self, what: str, raw: Any, parse: Callable[[Any], _T]) -> _T | None:
        """``parse(raw)``, or None and one log line."""
        try:
            return parse(raw)
        except _BAD_ROW as exc:
            self._dropped += 1
            alert_logger.error("dropped the saved %s: %s", what, exc)
            return None

    def _restore_silences(self, rows: Mapping[str, str], now: float) -> list[Silence]:
        """One row each; a state file of netprofd 0.x keeps them in the engine
        row ``silences``: they move to their rows (checked) on the way."""
        silences = []
        try:
            for silence_id, text in list(self._db.execute("SELECT id, json FROM silences")):
                silence = self._checked(f"silence {silence_id}", text, _silence_row)
                if silence is not None:
                    silences.append(silence)
        except sqlite3.Error as exc:
            alert_logger.error(
                "cannot read the saved silences from %s: %s; starting without them", self.path, exc
            )
        for at, raw in enumerate(self._json_list(rows, "silences")):
            silence = self._checked(f"silence #{at} of the old engine row", raw, Silence.from_json)
            if silence is not None:
                silences.append(silence)
        silences, surplus = within_limits(silences, now)
        for silence in surplus:
            self._dropped += 1
            alert_logger.error(
                "dropped the saved silence %s: beyond %d active or pending silences or %d regex matchers in all",
                silence.id, MAX_SILENCES, MAX_REGEX_MATCHERS,
            )  # fmt: skip
        if not self._dropped and "silences" not in rows:
            return silences
        # What was dropped is gone from the file too: logged once, not at every start.
        with contextlib.suppress(sqlite3.Error), self._transaction() as db:
            db.execute("DELETE FROM silences")
            db.executemany(
                "INSERT OR REPLACE INTO silences (id, ends_at, json) VALUES (?, ?, ?)",
                [(s.id, s.ends_at, json.dumps(s.to_json())) for s in silences],
            )
            db.execute("DELETE FROM engine WHERE name = 'silences'")
        return silences

    def _restore_history(self, rows: Mapping[str, str]) -> list[dict[str, Any]]:
        """Rows of their own (netprofd 0.x kept an engine row ``history``)."""
        kept = []
        for at, raw in enumerate(self._json_list(rows, "history")[-MAX_HISTORY:]):
            event = self._checked(f"history event #{at} of the old engine row", raw, _history_event)
            if event is not None:
                kept.append(event)
        try:
            texts = list(self._db.execute("SELECT seq, json FROM history ORDER BY seq"))
        except sqlite3.Error as exc:
            alert_logger.error("cannot read the saved alert history from %s: %s", self.path, exc)
            texts = []
        for seq, text in texts[-MAX_HISTORY:]:
            event = self._checked(f"history event {seq}", text, lambda t: _history_event(json.loads(t)))
            if event is not None:
                kept.append(event)
        kept = kept[-MAX_HISTORY:]
        if not self._dropped and "history" not in rows:
            return kept
        with contextlib.suppress(sqlite3.Error), self._transaction() as db:
            db.execute("DELETE FROM history")
            db.executemany("INSERT INTO history (json) VALUES (?)", [(json.dumps(e),) for e in kept])
            db.execute("DELETE FROM engine WHERE name = 'history'")
        return kept

    def load_extra(self) -> dict[str, Any]:
        """What the daemon keeps beside the engine (its running counts); {} when
        it is unreadable or does not fit (logged)."""
        try:
            row = self._db.execute("SELECT json FROM engine WHERE name = 'extra'").fetchone()
        except sqlite3.Error as exc:
            alert_logger.error("cannot read the saved running counts from %s: %s", self.path, exc)
            return {}
        extra = self._checked("running counts", row[0], _extra) if row else None
        if row and extra is None:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("DELETE FROM engine WHERE name = 'extra'")
        return extra or {}

    def save(
        self,
        engine: AlertEngine,
        notifications: Iterable[Notification] = (),
        plugins: Iterable[str] = (),
        *,
        extra: Mapping[str, Any] | None = None,
        forgotten_silences: Iterable[str] = (),
    ) -> None:
        """The engine's small state (active alerts, pending groups), its new
        history events, and the notifications it just handed out (one outbox
        row per plugin), in one transaction. Silences are saved one by one
        (:meth:`put_silence`), never here."""
        plugins = list(plugins)
        rows: dict[str, Any] = {
            "active": [a.to_json() for a in engine.active.values()],
            "groups": engine.pending_groups(),
        }
        if extra is not None:
            rows["extra"] = dict(extra)
        new_events = engine.unsaved_history(self._history_saved)
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO engine (name, json) VALUES (?, ?)",
                [(name, json.dumps(value)) for name, value in rows.items()],
            )
            if new_events:
                db.executemany(
                    "INSERT INTO history (json) VALUES (?)", [(json.dumps(e),) for e in new_events]
                )
                db.execute(
                    "DELETE FROM history WHERE seq <= (SELECT MAX(seq) FROM history) - ?", (MAX_HISTORY,)
                )
            db.executemany("DELETE FROM silences WHERE id = ?", [(i,) for i in forgotten_silences])
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
        self._history_saved = engine.history_count
        engine.changed = False

    # -- silences: one row each, so that adding one costs the same with 1 or 1,000 kept --------

    def put_silence(self, silence: Silence, forgotten: Iterable[str] = ()) -> None:
        """Save a new or changed silence, and forget the ``forgotten`` ones."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO silences (id, ends_at, json) VALUES (?, ?, ?)",
                (silence.id, silence.ends_at, json.dumps(silence.to_json())),
            )
            db.executemany("DELETE FROM silences WHERE id = ?", [(i,) for i in forgotten])

    # -- the outbox ----------------------------------------------------------------------

    def _drop_bad_outbox_rows(self) -> None:
        """Rows that do not parse would stop every delivery after them: dropped, logged."""
        try:
            rows = list(self._db.execute("SELECT rowid, notification_id, plugin, notification FROM outbox"))
        except sqlite3.Error as exc:
            alert_logger.error("cannot read the outbox in %s: %s", self.path, exc)
            return
        for rowid, notification_id, plugin, text in rows:
            what = f"outbox row {notification_id!r} for {plugin!r}"
            if self._checked(what, text, _outbox_notification) is None or not isinstance(plugin, str):
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("DELETE FROM outbox WHERE rowid = ?", (rowid,))

    def due(self, now: float, limit: int = 100) -> list[OutboxItem]:
        """Each plugin's oldest undelivered notification, when its next attempt
        is due: a plugin takes its notifications in order (a retried "firing"
        never lands after its "resolved")."""
        cursor = self._db.execute(
            "SELECT rowid, notification, plugin, attempts, next_attempt, last_error FROM outbox AS o "
            "WHERE created_at = (SELECT MIN(created_at) FROM outbox WHERE plugin = o.plugin) "
            "AND next_attempt <= ? ORDER BY created_at LIMIT ?",
            (now, limit),
        )
        items = []
        for rowid, text, plugin, attempts, next_attempt, error in list(cursor):
            notification = self._checked(f"outbox row {rowid}", text, _outbox_notification)
            if notification is None:  # checked at start; a row changed behind our back
                self._db.execute("DELETE FROM outbox WHERE rowid = ?", (rowid,))
                continue
            items.append(OutboxItem(notification, plugin, attempts, next_attempt, error))
        return items

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


# -- checking saved rows: each raises ValueError/TypeError/KeyError when it does not fit ------


def _silence_row(text: Any) -> Silence:
    return Silence.from_json(json.loads(text))


def _group(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping) or raw.get("state") not in ("firing", "resolved"):
        raise ValueError("expected {state: firing|resolved, opened_at, alerts}")
    opened_at = raw.get("opened_at")
    if isinstance(opened_at, bool) or not isinstance(opened_at, (int, float)):
        raise TypeError(f"opened_at {opened_at!r} is not a number")
    alerts = raw.get("alerts")
    if not isinstance(alerts, list):
        raise TypeError("alerts is not a list")
    return {
        "state": raw["state"],
        "opened_at": float(opened_at),
        "alerts": [Alert.from_json(a) for a in alerts],
    }


def _history_event(event: Any) -> dict[str, Any]:
    if (
        not isinstance(event, dict)
        or not isinstance(event.get("event"), str)
        or not isinstance(event.get("at"), (int, float))
        or not isinstance(event.get("alert"), dict)
        or not isinstance(event["alert"].get("name"), str)
    ):
        raise TypeError("expected {at, event, alert: {name, ...}}")
    return event


def _extra(text: Any) -> dict[str, Any]:
    extra = json.loads(text)
    if not isinstance(extra, dict):
        raise TypeError("not an object")
    counts = extra.get("auto_disables", {})
    if not isinstance(counts, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in counts.items()
    ):
        raise ValueError("auto_disables must map app names to whole numbers")
    return extra


def _outbox_notification(text: Any) -> Notification:
    data = json.loads(text)
    if not isinstance(data, Mapping):
        raise TypeError("not an object")
    return Notification.from_json(data)
