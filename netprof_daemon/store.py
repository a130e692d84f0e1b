"""Every profiled process on the host: discovery, one snapshot per tick, and
the folding of ended processes into their application's retired totals."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netprof_core import RouteKey, RouteStats, SegmentBusy, SegmentError, SegmentReader, SegmentSnapshot
from netprof_core._layout import SEGMENT_SUFFIX
from netprof_core.reader import TRANSIENT_ERRNOS, RecordScan, RequestRecord

from .directory import LockHeld, open_segment_dir, take_daemon_lock
from .identity import WriterIdentity
from .log import store_logger
from .totals import CounterTotals, SumRefused, Totals

__all__ = ("AppState", "ProcessEntry", "SegmentStore", "StoreLocked", "stored_records")

RETIRED_FILE = "retired.json"
# How long a tick waits for a writer caught inside an update to publish a
# consistent copy (a busy writer publishes at its next record, within
# microseconds): the tick runs on the event loop, and a forged segment stuck
# "inside an update" must cost it next to nothing. None found in time: the
# last snapshot stands (or, for a segment not read yet, it is tried again at
# the next tick).
TICK_PUBLISH_WAIT = 0.05


def is_transient(exc: BaseException) -> bool:
    """True for an OSError (or a SegmentError from one) that says nothing of
    the file, only of this moment (TRANSIENT_ERRNOS: no descriptor, no memory,
    a signal): the operation is retried at the next tick, what was known
    standing meanwhile. Never a verdict."""
    return isinstance(exc, (OSError, SegmentError)) and exc.errno in TRANSIENT_ERRNOS


# What is said when a spell of failures of an operation ends.
_RECOVERED = {
    "list": "Listing the segments",
    "open": "Opening segments",
    "read": "Reading segments",
    "busy": "Reading busy segments",
    "save": "Saving the retired totals",
}


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

    Nothing is taken for "nothing there" because an operation failed: a
    listing that fails keeps every process known (none is folded, none found);
    an open or a read that fails for the moment (no descriptor, no memory) is
    retried at the next tick, the last snapshot standing meanwhile; an ended
    process's segment stays until its fold is saved. One bad segment costs
    only its own figures: a segment whose counters go backwards, or whose sums
    would pass 2**64 - 1, is quarantined: its last good figures are kept (as
    retired), it is no longer read, and it is logged once and counted.
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
        self.quarantined: dict[str, str] = {}  # folded segments no longer read -> why
        self._lock_fd: int | None = None
        self.identity = WriterIdentity(self.state_dir)  # who may speak for which app
        # Called with each process found alive, before its first tick counts.
        self.on_discover: Callable[[ProcessEntry], None] | None = None
        self.ticks = 0
        self.last_tick_ns = 0
        self.last_tick_seconds = 0.0
        # What /metrics and /healthz tell of the store's troubles.
        self.segment_errors: Counter[str] = Counter()  # segments refused or quarantined, by reason
        self.transient_errors: Counter[str] = Counter()  # by operation: list, open, read
        self.save_failures = 0
        self.problem: str | None = None  # why the last tick was incomplete (None: it was not)
        self._failing: dict[str, str] = {}  # what is failing now -> how (logged once per spell)
        self._this_tick: dict[str, str] = {}
        # Ended segments folded into ``retired`` but not saved yet: removed once saved.
        self.awaiting_save: set[str] = set()
        self._unsaved = False
        self._saving_refused: str | None = None  # why retired.json must not be written
        self._load_retired()

    # -- the lock: apps leave ended segments to a running daemon --------------

    def lock(self) -> None:
        """Check the directory and take its daemon lock (see .directory):
        UnsafeSegmentDir if the directory is not as the deployment must make
        it, StoreLocked if another daemon holds the lock."""
        dir_fd = open_segment_dir(self.segment_dir)
        try:
            self._lock_fd = take_daemon_lock(dir_fd, os.fspath(self.segment_dir))
        except LockHeld as exc:
            raise StoreLocked(
                f"another netprofd is watching {self.segment_dir} ({exc.path} is locked)"
            ) from None
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        if self._unsaved:
            self._save_and_remove()  # (not saved: kept, and folded again at the next start)
        for entry in self.entries.values():
            entry.reader.close()
        self.entries.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- one tick ---------------------------------------------------------------

    def refresh(self) -> None:
        started = time.perf_counter()
        self.problem = None
        present = self._listing()
        found: set[str] = set()
        if present is not None:  # else nothing is known to have gone, nor to have come
            self._forget_gone(present)
            found = present - self.entries.keys() - self.folded
            for path in sorted(found):
                self._guarded(path, self._discover)
        for path, entry in list(self.entries.items()):
            if path not in found:  # a process found now was just read
                self._guarded(path, self._update, entry)
        if self._unsaved:
            self._save_and_remove()
        self._end_of_tick()
        self.ticks += 1
        self.last_tick_ns = time.time_ns()
        self.last_tick_seconds = time.perf_counter() - started

    def _listing(self) -> set[str] | None:
        """The segments in the directory; None if it cannot be listed (never
        an empty set: a failed listing is not an empty directory)."""
        # Names, joined as os.scandir joins them (its entries cost more: one per file, at every tick).
        base = os.fspath(self.segment_dir)
        prefix = base if base.endswith("/") else base + "/"
        try:
            names = os.listdir(base)
        except OSError as exc:
            self.transient_errors["list"] += 1
            self.problem = f"cannot list {base}: {exc.strerror or exc}"
            self._failed("list", f"{self.problem}; keeping every process known, retrying at each tick")
            return None
        return {prefix + name for name in names if name.endswith(SEGMENT_SUFFIX)}

    def _forget_gone(self, present: set[str]) -> None:
        """What the listing says has gone: live segments removed behind our
        back (their last snapshot is all there is), and the names kept of files
        folded, quarantined or refused."""
        for path in list(self.entries):
            if path not in present:
                store_logger.warning("segment %s vanished; keeping its last counts", path)
                self._retire(self.entries.pop(path), None)
        # A folded segment that could not be removed stays folded: never counted twice.
        self.folded &= present
        if self.quarantined.keys() - self.folded:
            self.quarantined = {path: why for path, why in self.quarantined.items() if path in self.folded}
        if self._refused.keys() - present:
            self._refused = {path: seen for path, seen in self._refused.items() if path in present}

    def _guarded(self, path: str, step: Callable[..., None], *args: Any) -> None:
        """One segment's step of the tick; an error of ours it raises costs that
        segment this tick (its last snapshot stands), never the others'."""
        try:
            step(path, *args)
        except Exception as exc:  # noqa: BLE001  (one segment must not stop every other's tick)
            self.problem = self.problem or f"reading {path} failed: {exc!r}"
            if self._failed(f"error:{path}", self.problem):
                store_logger.exception("reading %s failed; its last snapshot stands", path)

    def _discover(self, path: str) -> None:
        if path in self._refused:
            fingerprint = self._fingerprint(path)
            if fingerprint is None or self._refused[path] == fingerprint:
                return  # already logged; retried when the file changes
        try:
            reader, snapshot, sequence = SegmentReader.first(path, timeout=0.0)
        except SegmentBusy as exc:  # not a verdict: tried again at the next tick, at no wait
            self._transient("busy", path, exc)
            return
        except (SegmentError, OSError) as exc:
            if is_transient(exc):
                self._transient("open", path, exc)
            else:
                self._refuse(path, exc)
            return
        refused = self.identity.check(path, snapshot.header)  # its claims, against the kernel's word
        if refused is not None:
            reader.close()
            if is_transient(refused):
                self._transient("open", path, refused)
            else:
                self._refuse(path, refused, "identity")  # logged and counted once, retried if it changes
            return
        entry = ProcessEntry(path, reader, snapshot, sequence, snapshot.control_words)
        header = snapshot.header
        app = header.app_name  # (entry.app, without its properties: asked of every process found)
        if snapshot.source == "final":
            self._found(entry, app)
            self._retire(entry, snapshot, counted=False)
            return
        totals = self.live_totals.get(app)
        made = totals is None
        if totals is None:  # (not setdefault: a Totals is costly to make for nothing)
            totals = self.live_totals[app] = Totals()
        try:
            totals.add_snapshot(snapshot)
        except SumRefused as exc:
            reader.close()
            if made:
                del self.live_totals[app]
            self._refuse(path, exc, exc.reason)
            return
        self._found(entry, app)
        self.entries[path] = entry
        self._apps = None
        if self.on_discover is not None:
            try:
                self.on_discover(entry)
            except Exception:  # noqa: BLE001  (its figures are read all the same)
                store_logger.exception("catching up on %s failed", path)

    def _found(self, entry: ProcessEntry, app: str) -> None:
        if self._refused:
            self._refused.pop(entry.path, None)
        header = entry.snapshot.header
        store_logger.info("found %s: app %s, pid %d", entry.path, app, header.pid)
        first = self.first_seen_ns.get(app)
        created = header.created_ns
        self.first_seen_ns[app] = created if first is None or created < first else first

    @staticmethod
    def _fingerprint(path: str) -> tuple[int, int] | None:
        try:
            info = os.stat(path)
        except OSError:
            return None
        return info.st_size, info.st_mtime_ns

    def _refuse(self, path: str, exc: Exception, reason: str = "refused") -> None:
        """Skip a file that is not a segment we can count, until it changes;
        logged and counted once while it is there."""
        if isinstance(exc, SegmentError) and exc.errno == errno.ENOENT:
            return  # it ended and went away between the listing and the open
        # Known by size and modification time (taken now, not before the open:
        # one stat less per segment found; a file is made at its full size).
        fingerprint = self._fingerprint(path)
        if fingerprint is None:
            return
        again = path in self._refused
        self._refused[path] = fingerprint
        if again:
            return
        self.segment_errors[reason] += 1
        # A SegmentError's str() already starts with the path: log its reason, not "path: path: reason".
        store_logger.warning("skipping %s: %s", path, exc.reason if isinstance(exc, SegmentError) else exc)

    def _update(self, path: str, entry: ProcessEntry) -> None:
        try:
            snapshot, sequence = self._next_snapshot(entry)
        except SegmentBusy as exc:
            self._transient("busy", path, exc)
            return
        except (SegmentError, OSError) as exc:
            if is_transient(exc):
                self._transient("read", path, exc)
            else:
                self._quarantine(entry, "unreadable", f"cannot read it any more ({exc})")
            return
        if snapshot is None:
            return  # nothing recorded since the last tick: the snapshot stands
        try:
            self.live_totals[entry.app].replace_snapshot(entry.snapshot, snapshot)
        except SumRefused as exc:
            self._quarantine(entry, exc.reason, str(exc))
            return
        self._apps = None
        entry.snapshot = snapshot
        entry.sequence = sequence
        entry.control_words = snapshot.control_words
        if snapshot.source == "final":
            del self.entries[path]
            self._retire(entry, snapshot)

    @staticmethod
    def _next_snapshot(entry: ProcessEntry) -> tuple[SegmentSnapshot | None, int]:
        """The process's snapshot now, and the sequence counter read before it;
        None when nothing changed since the last one."""
        # Closed time and control words before the statistics: see SegmentReader.meta.
        meta, sequence = entry.reader.poll()
        closed_ns, control_words = meta[0], meta[1]
        # A process that recorded since the last tick was alive a moment ago;
        # only an idle one is asked (its lock, else /proc) whether it has ended.
        ended = sequence == entry.sequence and not entry.reader.writer_alive()
        # A reload, the API or the CLI may have written the control block without
        # a record since: the snapshot stands only if that is unchanged too.
        control_same = control_words == entry.control_words
        if sequence == entry.sequence and control_same and not ended and not closed_ns:
            return None, sequence
        snapshot = (
            entry.reader.snapshot(records=False, routes=False, alive=False, timeout=TICK_PUBLISH_WAIT)
            if ended
            else entry.reader.refresh(entry.snapshot, meta=meta, sequence=sequence, timeout=TICK_PUBLISH_WAIT)
        )
        return snapshot, sequence

    def _quarantine(self, entry: ProcessEntry, reason: str, detail: str) -> None:
        """Stop reading a segment whose figures cannot be trusted: its last good
        figures are kept (folded, as an ended process's), its file is left."""
        del self.entries[entry.path]
        self.quarantined[entry.path] = reason
        self.segment_errors[reason] += 1
        store_logger.error(
            "quarantined %s (app %s, pid %d): %s; its last good figures are kept, it is no longer read",
            entry.path,
            entry.app,
            entry.pid,
            detail,
        )
        self._retire(entry, None, why="quarantined")

    def _retire(
        self,
        entry: ProcessEntry,
        final: SegmentSnapshot | None,
        *,
        counted: bool = True,
        why: str = "ended",
    ) -> None:
        """Fold a process into its app's retired totals; at the end of the tick
        they are saved, and then (``final``: it has ended) its segment is
        removed. ``counted``: it was live, so its last snapshot is in ``live_totals``."""
        snapshot = final or entry.snapshot
        if counted:
            self.live_totals[entry.app].subtract_snapshot(entry.snapshot)
        # Retired totals are only ever added to: a sum past 2**64 - 1 stays there.
        self.retired.setdefault(entry.app, Totals()).add_snapshot(snapshot, saturate=True)
        self.folded.add(entry.path)
        self._apps = None
        entry.reader.close()
        if final is not None:
            self.awaiting_save.add(entry.path)
        self._unsaved = True  # saved once at the end of the tick, however many ended in it
        if why == "ended":
            store_logger.info(
                "process %d of %s ended: %d requests folded into its totals",
                entry.pid,
                entry.app,
                snapshot.counters.requests,
            )

    def _save_and_remove(self) -> None:
        """Save the retired totals; then, and only then, remove the segments
        they hold. A save that fails is retried at every tick, the segments
        kept meanwhile (folded: not counted twice while this daemon runs; after
        a restart they are folded again, once, as the save never happened)."""
        try:
            self._save_retired()
        except OSError as exc:
            self.save_failures += 1
            self._failed(
                "save",
                f"cannot save the retired totals to {self._retired_path()}: {exc}; "
                f"keeping {len(self.awaiting_save)} ended segment(s) until they are saved, retrying at each tick",
            )
            return
        self._unsaved = False
        for path in sorted(self.awaiting_save):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # saved as folded: never counted twice
                store_logger.warning("cannot remove ended segment %s: %s", path, exc)
        self.awaiting_save.clear()

    def _transient(self, operation: str, path: str, exc: BaseException) -> None:
        """An open or a read that failed for the moment: counted, retried at the
        next tick, logged once while it keeps failing."""
        self.transient_errors[operation] += 1
        if operation == "busy":  # (a SegmentError names its file)
            message = f"{exc}; keeping the last snapshot, trying again at each tick"
        else:
            message = (
                f"cannot {operation} {path} for now ({exc}); keeping what is known, retrying at each tick"
            )
        self._failed(operation, message, logging.WARNING)

    def _failed(self, what: str, message: str, level: int = logging.ERROR) -> bool:
        """Note a failure of this tick; log it if it was not failing at the
        last tick (once per spell). True when it is new."""
        self._this_tick[what] = message
        if what in self._failing:
            return False
        self._failing[what] = message
        if not what.startswith("error:"):  # (logged with its traceback by _guarded)
            store_logger.log(level, "%s", message)
        return True

    def _end_of_tick(self) -> None:
        """Close the spells of failures that did not happen again this tick."""
        for what in self._failing.keys() - self._this_tick.keys():
            del self._failing[what]
            if what in _RECOVERED:
                store_logger.info("%s works again", _RECOVERED[what])
        self._this_tick = {}

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
                    total.add(part)  # (a sum past 2**64 - 1 stays there: never backwards)
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

    @property
    def refused_count(self) -> int:
        """Files in the directory refused as segments now."""
        return len(self._refused)

    # -- persistence of the retired totals ---------------------------------------

    def _retired_path(self) -> Path | None:
        return self.state_dir / RETIRED_FILE if self.state_dir is not None else None

    def _load_retired(self) -> None:
        """The retired totals saved by the last daemon. A file that cannot be
        read as such is moved aside (never overwritten: it may be all there is
        of an app's history), and the daemon starts empty."""
        path = self._retired_path()
        if path is None:
            return
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._set_aside(path, f"cannot be read ({exc.strerror or exc})")
            return
        try:
            data = json.loads(raw)
            retired = {str(app): Totals.from_json(totals) for app, totals in data["apps"].items()}
            first_seen = {str(app): int(ns) for app, ns in data.get("first_seen_ns", {}).items()}
            folded = {str(name) for name in data.get("folded", [])}
            quarantined = {str(name): str(why) for name, why in data.get("quarantined", {}).items()}
        except Exception as exc:  # noqa: BLE001  (any flaw of the file: moved aside, the daemon serves)
            self._set_aside(path, f"is corrupt ({type(exc).__name__}: {exc})")
            return
        self.retired, self.first_seen_ns, self.folded = retired, first_seen, folded
        self.quarantined = {name: why for name, why in quarantined.items() if name in folded}

    def _set_aside(self, path: Path, why: str) -> None:
        aside = path.with_name(
            f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9}"
        )
        try:
            os.replace(path, aside)
        except OSError as exc:
            # Not moved: it must not be overwritten either; folds stay unsaved (their segments kept).
            self._saving_refused = f"{path} {why} and cannot be moved aside ({exc.strerror or exc})"
            store_logger.error("%s: starting with empty retired totals, saving none", self._saving_refused)
            return
        store_logger.error("%s %s: moved aside to %s; starting with empty retired totals", path, why, aside)

    def _save_retired(self) -> None:
        """Write the retired totals durably (the file and its directory synced)
        and atomically (a crash leaves the old file or the new one); OSError if
        that could not be done."""
        path = self._retired_path()
        if path is None:
            return
        if self._saving_refused is not None:
            raise OSError(errno.EPERM, self._saving_refused)
        data = {
            "apps": {app: totals.to_json() for app, totals in self.retired.items()},
            "first_seen_ns": self.first_seen_ns,
            "folded": sorted(self.folded),
            "quarantined": self.quarantined,
        }
        content = json.dumps(data).encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(partial, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(partial)  # a partial file on a full disk takes what room is left
            raise
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)  # the rename itself made durable
        finally:
            os.close(directory)


async def stored_records(path: str) -> AsyncGenerator[list[RequestRecord], None]:
    """The stored request records of the segment at ``path``, a chunk of ring
    slots at a time, each read in a worker thread (:class:`RecordScan`): a
    large ring never holds a thread for long, nor much memory, so it cannot
    starve every other request of the API. Use with ``contextlib.aclosing``.
    SegmentError or OSError if it cannot be read."""
    scan = await asyncio.to_thread(RecordScan, path)
    try:
        while (chunk := await asyncio.to_thread(scan.next_chunk)) is not None:
            yield chunk
    finally:
        scan.close()
