"""Every profiled process on the host: discovery, one snapshot per tick, and
the folding of ended processes into their application's retired totals."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from netprof_core import RouteKey, RouteStats, SegmentBusy, SegmentError, SegmentReader, SegmentSnapshot
from netprof_core._layout import DAEMON_LOCK_NAME, SEGMENT_SUFFIX

from .log import store_logger
from .totals import CounterTotals, Totals

__all__ = ("AppState", "ProcessEntry", "SegmentStore", "StoreLocked")

RETIRED_FILE = "retired.json"


class StoreLocked(RuntimeError):
    """Another netprofd already watches this segment directory."""


@dataclass(slots=True)
class ProcessEntry:
    """A live profiled process, known by pid and start time."""

    path: str
    reader: SegmentReader
    snapshot: SegmentSnapshot
    sequence: int  # the live sequence counter when ``snapshot`` was taken
    control_words: tuple[int, ...]  # the control block then

    @property
    def pid(self) -> int:
        return self.snapshot.header.pid

    @property
    def app(self) -> str:
        return self.snapshot.app_name


@dataclass(slots=True)
class AppState:
    """One application at one tick: its live processes and its cumulative
    totals (retired + live), counters and per-route statistics."""

    name: str
    processes: list[ProcessEntry] = field(default_factory=list)
    counters: CounterTotals = field(default_factory=CounterTotals)
    routes: dict[RouteKey, RouteStats] = field(default_factory=dict)
    first_seen_ns: int = 0  # the earliest segment creation seen: "since start"


class SegmentStore:
    """Reads every segment in ``segment_dir``; :meth:`refresh` is one tick.

    A segment whose process ended (closed at exit, or its pid gone or reused) is
    read one last time, added to its application's retired totals, saved, and
    only then removed. A file that is not a segment is logged once and skipped.
    """

    def __init__(
        self, segment_dir: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None = None
    ) -> None:
        self.segment_dir = Path(segment_dir)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.entries: dict[str, ProcessEntry] = {}
        self.retired: dict[str, Totals] = {}  # ended processes, per app
        self.folded: set[str] = set()  # segments in ``retired`` whose files are still there
        self.live_totals: dict[str, Totals] = {}  # running sums of the live processes' snapshots
        self._apps: dict[str, AppState] | None = None  # apps() as of the last change
        self.first_seen_ns: dict[str, int] = {}
        self._refused: dict[str, tuple[int, int]] = {}  # path -> (size, mtime) when it was refused
        self._lock_fd: int | None = None
        # Called with each process found alive, before its first tick counts.
        self.on_discover: Callable[[ProcessEntry], None] | None = None
        self.ticks = 0
        self.last_tick_ns = 0
        self.last_tick_seconds = 0.0
        self._load_retired()

    # -- the lock: apps leave ended segments to a running daemon --------------

    def lock(self) -> None:
        """Take the directory's daemon lock; StoreLocked if another daemon holds it."""
        self.segment_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(self.segment_dir / DAEMON_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreLocked(f"another netprofd is watching {self.segment_dir}") from None
            raise
        self._lock_fd = fd

    def close(self) -> None:
        for entry in self.entries.values():
            entry.reader.close()
        self.entries.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- one tick ---------------------------------------------------------------

    def refresh(self) -> None:
        started = time.perf_counter()
        present = self._listing()
        for path in list(self.entries):
            if path not in present:
                # Removed behind our back: the last snapshot is all there is.
                store_logger.warning("segment %s vanished; keeping its last counts", path)
                self._retire(self.entries.pop(path), None)
        # A folded segment that could not be removed stays folded: never counted twice.
        self.folded &= present
        found = present - self.entries.keys() - self.folded
        for path in sorted(found):
            self._discover(path)
        for path, entry in list(self.entries.items()):
            if path not in found:  # a process found now was just read
                self._update(path, entry)
        self.ticks += 1
        self.last_tick_ns = time.time_ns()
        self.last_tick_seconds = time.perf_counter() - started

    def _listing(self) -> set[str]:
        # Names, joined as os.scandir joins them (its entries cost more: one per file, at every tick).
        base = os.fspath(self.segment_dir)
        prefix = base if base.endswith("/") else base + "/"
        try:
            return {prefix + name for name in os.listdir(base) if name.endswith(SEGMENT_SUFFIX)}
        except OSError:
            return set()

    def _discover(self, path: str) -> None:
        if path in self._refused:
            fingerprint = self._fingerprint(path)
            if fingerprint is None or self._refused[path] == fingerprint:
                return  # already logged; retried when the file changes
        try:
            reader, snapshot, sequence = SegmentReader.first(path)
        except (SegmentError, OSError) as exc:
            self._refuse(path, exc)
            return
        if self._refused:
            self._refused.pop(path, None)
        entry = ProcessEntry(path, reader, snapshot, sequence, snapshot.control_words)
        header = snapshot.header
        app = header.app_name  # (entry.app, without its properties: asked of every process found)
        store_logger.info("found %s: app %s, pid %d", path, app, header.pid)
        first = self.first_seen_ns.get(app)
        created = header.created_ns
        self.first_seen_ns[app] = created if first is None or created < first else first
        if snapshot.source == "final":
            self._retire(entry, snapshot, counted=False)
        else:
            self.entries[path] = entry
            totals = self.live_totals.get(app)
            if totals is None:  # (not setdefault: a Totals is costly to make for nothing)
                totals = self.live_totals[app] = Totals()
            totals.add_snapshot(snapshot)
            self._apps = None
            if self.on_discover is not None:
                self.on_discover(entry)

    @staticmethod
    def _fingerprint(path: str) -> tuple[int, int] | None:
        try:
            info = os.stat(path)
        except OSError:
            return None
        return info.st_size, info.st_mtime_ns

    def _refuse(self, path: str, exc: Exception) -> None:
        if isinstance(exc, SegmentError) and exc.errno == errno.ENOENT:
            return  # it ended and went away between the listing and the open
        # Known by size and modification time (taken now, not before the open:
        # one stat less per segment found; a file is made at its full size).
        fingerprint = self._fingerprint(path)
        if fingerprint is None:
            return
        self._refused[path] = fingerprint
        # A SegmentError's str() already starts with the path: log its reason, not "path: path: reason".
        store_logger.warning("skipping %s: %s", path, exc.reason if isinstance(exc, SegmentError) else exc)

    def _update(self, path: str, entry: ProcessEntry) -> None:
        try:
            # Closed time and control words before the statistics: see SegmentReader.meta.
            meta, sequence = entry.reader.poll()
        except (SegmentError, OSError) as exc:
            store_logger.warning("cannot read %s any more (%s); keeping its last counts", path, exc)
            del self.entries[path]
            self._retire(entry, None)
            return
        closed_ns, control_words = meta[0], meta[1]
        # A process that recorded since the last tick was alive a moment ago;
        # only an idle one is asked (its lock, else /proc) whether it has ended.
        ended = sequence == entry.sequence and not entry.reader.writer_alive()
        # A reload, the API or the CLI may have written the control block without
        # a record since: the snapshot stands only if that is unchanged too.
        control_same = control_words == entry.control_words
        if sequence == entry.sequence and control_same and not ended and not closed_ns:
            return  # nothing recorded since the last tick: the snapshot stands
        try:
            snapshot = (
                entry.reader.snapshot(records=False, routes=False, alive=False)
                if ended
                else entry.reader.refresh(entry.snapshot, meta=meta, sequence=sequence)
            )
        except SegmentBusy as exc:
            store_logger.warning("%s; keeping the previous snapshot", exc)
            return
        except (SegmentError, OSError) as exc:
            store_logger.warning("cannot read %s any more (%s); keeping its last counts", path, exc)
            del self.entries[path]
            self._retire(entry, None)
            return
        self.live_totals[entry.app].replace_snapshot(entry.snapshot, snapshot)
        self._apps = None
        entry.snapshot = snapshot
        entry.sequence = sequence
        entry.control_words = snapshot.control_words
        if snapshot.source == "final":
            del self.entries[path]
            self._retire(entry, snapshot)

    def _retire(self, entry: ProcessEntry, final: SegmentSnapshot | None, *, counted: bool = True) -> None:
        """Fold an ended process into its app's retired totals, then remove its
        segment. ``counted``: it was live, so its last snapshot is in ``live_totals``."""
        snapshot = final or entry.snapshot
        if counted:
            self.live_totals[entry.app].subtract_snapshot(entry.snapshot)
        self.retired.setdefault(entry.app, Totals()).add_snapshot(snapshot)
        self.folded.add(entry.path)
        self._apps = None
        entry.reader.close()
        self._save_retired()
        if final is not None:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                store_logger.warning("cannot remove ended segment %s: %s", entry.path, exc)
        store_logger.info(
            "process %d of %s ended: %d requests folded into its totals",
            entry.pid,
            entry.app,
            snapshot.counters.requests,
        )

    # -- what the API and /metrics read ----------------------------------------

    def apps(self) -> dict[str, AppState]:
        """Per application, its live processes and cumulative totals (retired +
        live); built again only after something changed."""
        if self._apps is not None:
            return self._apps
        processes: dict[str, list[ProcessEntry]] = {}
        for entry in self.entries.values():
            # (entry.app, without its two properties: asked of every process)
            processes.setdefault(entry.snapshot.header.app_name, []).append(entry)
        states = {}
        for name in self.retired.keys() | self.live_totals.keys():
            parts = [
                part for part in (self.retired.get(name), self.live_totals.get(name)) if part is not None
            ]
            if len(parts) == 1:  # nothing to add up: copied as it is (routes are copied by route_stats)
                counters, routes = parts[0].counters.copy(), parts[0].route_stats()
            else:
                total = Totals()
                for part in parts:
                    total.add(part)
                counters, routes = total.counters, total.route_stats()
            states[name] = AppState(
                name, processes.get(name, []), counters, routes, self.first_seen_ns.get(name, 0)
            )
        self._apps = states
        return states

    def live(self, app: str | None = None) -> Iterator[ProcessEntry]:
        for entry in list(self.entries.values()):
            if app is None or entry.app == app:
                yield entry

    def app_names(self) -> set[str]:
        return {entry.app for entry in self.entries.values()} | set(self.retired)

    # -- persistence of the retired totals ---------------------------------------

    def _retired_path(self) -> Path | None:
        return self.state_dir / RETIRED_FILE if self.state_dir is not None else None

    def _load_retired(self) -> None:
        path = self._retired_path()
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self.retired = {app: Totals.from_json(totals) for app, totals in data["apps"].items()}
            self.first_seen_ns = {app: int(ns) for app, ns in data.get("first_seen_ns", {}).items()}
            self.folded = set(data.get("folded", []))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            store_logger.error("ignoring unreadable %s: %s", path, exc)

    def _save_retired(self) -> None:
        path = self._retired_path()
        if path is None:
            return
        data = {
            "apps": {app: totals.to_json() for app, totals in self.retired.items()},
            "first_seen_ns": self.first_seen_ns,
            "folded": sorted(self.folded),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".tmp")
            partial.write_text(json.dumps(data), encoding="utf-8")
            os.replace(partial, path)  # atomic: a crash leaves the old file or the new one
        except OSError as exc:
            store_logger.error("cannot save retired totals to %s: %s", path, exc)
