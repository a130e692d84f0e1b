"""Whose a segment is: its claims (app, pid, start time) checked against what
the kernel says, so that no process of the segments' group speaks for another
(docs/SECURITY.md, "A forged segment").

A segment's file is owned by the user that made it, which the writer cannot
choose. When it is found, the segment is accepted as:

* verified: its file belongs to root or to netprofd's own user (who can do
  anything netprof could prevent), or a live writer holds its lock and the
  claimed pid lives, with the claimed start time, as the file's owner (its fs
  uid, /proc/<pid>/status);
* unverifiable: its writer is gone (closed, or no lock held), or its pid cannot
  be seen (another PID namespace, /proc hidden): accepted only when its owner
  has already been seen as a verified writer of that app name.

An app name is bound to the uids of its verified writers (the first one binds
it; saved in ``state_dir``/app_writers.json): a segment from another uid that
claims a bound name is refused, naming both. Anything else whose claims the
kernel contradicts is refused. A refused segment is not counted; the store
logs it once and counts it (reason ``identity``). Only verified processes
are reached by an auto-disable (:meth:`WriterIdentity.verified`).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from netprof_core import SegmentError
from netprof_core import _layout as L
from netprof_core._recorder import core_module
from netprof_core.segment import SegmentHeader, parse_header, user_name

from .log import store_logger

if TYPE_CHECKING:
    from .store import ProcessEntry

__all__ = ("BINDINGS_FILE", "WriterIdentity")

BINDINGS_FILE = "app_writers.json"
# Failures of the moment (no descriptor, no memory): the check is retried, never taken for a verdict.
_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN, errno.ENOBUFS})
_PRUNE_AT = 1024

_segment_locked = core_module().segment_locked


class _Transient(Exception):
    def __init__(self, exc: OSError) -> None:
        super().__init__(str(exc))
        self.errno = exc.errno


class WriterIdentity:
    """The checks, the app-name bindings, and which processes were verified."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = state_dir / BINDINGS_FILE if state_dir is not None else None
        self.trusted = frozenset({0, os.geteuid()})
        self.bindings: dict[str, set[int]] = {}  # app name -> uids of its verified writers
        self._verified: dict[str, int] = {}  # segment path -> its owner, for segments verified live
        self._inodes: dict[tuple[int, int], str] = {}  # (device, inode) -> the path it was accepted as
        self._save_failed = False
        self._unread = False  # the file could not be read: read it again before saving over it
        self._load()

    # -- the check, when a segment is found ------------------------------------------

    def check(self, path: str, header: SegmentHeader) -> SegmentError | None:
        """None if the segment read at ``path`` (with ``header``) may be
        counted; else why not, as a SegmentError (with the errno of a failure
        of the moment, to be retried: see store.is_transient)."""
        try:
            why = self._check(path, header)
        except _Transient as exc:
            return SegmentError(path, f"cannot check its writer for the moment ({exc})", exc.errno)
        return None if why is None else SegmentError(path, why)

    def _check(self, path: str, header: SegmentHeader) -> str | None:
        opened = self._open(path)
        if isinstance(opened, str):
            return opened
        fd, info = opened
        try:
            why = self._same_file(path, fd, info, header)
            if why is not None:
                return why
            owner = info.st_uid
            app = header.app_name
            if owner in self.trusted:
                self._accept(path, info, app, owner, verified=True)
                return None
            if header.closed or not _segment_locked(fd):
                return self._unverifiable(path, info, app, owner, "its writer has ended")
            running_as = self._running_as(header.pid, header.start_ticks)
            if running_as is None:
                return self._unverifiable(
                    path,
                    info,
                    app,
                    owner,
                    f"its pid {header.pid} (started at {header.start_ticks}) is not visible here",
                )
            if running_as != owner:
                return (
                    f"forged identity: the file is owned by {user_name(owner)} but claims pid {header.pid}, "
                    f"which runs as {user_name(running_as)}"
                )
            bound = self.bindings.get(app)
            if bound and owner not in bound:
                return self._bound_elsewhere(app, bound, owner, header.pid)
            self._accept(path, info, app, owner, verified=True, pid=header.pid)
            return None
        finally:
            os.close(fd)

    def _open(self, path: str) -> tuple[int, os.stat_result] | str:
        """The file at ``path`` itself (never through a symlink), or why not."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                raise _Transient(exc) from None
            if exc.errno == errno.ELOOP:
                return "a symbolic link: not followed (it would count another file under this name)"
            return f"cannot be checked: {exc.strerror}"
        try:
            return fd, os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _TRANSIENT:
                raise _Transient(exc) from None
            return f"cannot be checked: {exc.strerror}"

    def _same_file(self, path: str, fd: int, info: os.stat_result, header: SegmentHeader) -> str | None:
        """Why the file now at ``path`` is not the one that was read, or is another
        name of a file already counted; None if it is the same."""
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        try:
            head = os.pread(fd, L.HEADER_SIZE, 0)
            now = parse_header(head, path, file_size=info.st_size)
        except SegmentError as exc:
            return f"changed while being checked ({exc.reason})"
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                raise _Transient(exc) from None
            return f"cannot be checked: {exc.strerror}"
        claims = ("pid", "start_ticks", "created_ns", "app_name")
        if any(getattr(now, name) != getattr(header, name) for name in claims):
            return "replaced while being checked"
        other = self._inodes.get((info.st_dev, info.st_ino))
        if other is not None and other != path and _names(other, info):
            return f"another name (a hard link) of {other}, which is counted already"
        return None

    @staticmethod
    def _running_as(pid: int, start_ticks: int) -> int | None:
        """The fs uid of ``pid`` if it lives and started at ``start_ticks``;
        None if it cannot be seen or is another process (its pid reused, or a
        pid of another PID namespace). Both are read through one descriptor
        on /proc/<pid>, which a reused pid cannot take over."""
        if start_ticks == 0 or not 0 < pid < 2**31:
            return None
        try:
            proc = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                raise _Transient(exc) from None
            return None
        try:
            stat_line = _read_at(proc, "stat")
            status = _read_at(proc, "status")
        finally:
            os.close(proc)
        if stat_line is None or status is None:
            return None
        try:
            fields = stat_line[stat_line.rindex(b")") + 2 :].split()
            if fields[0] in (b"Z", b"X") or int(fields[19]) != start_ticks:
                return None
            for line in status.splitlines():
                if line.startswith(b"Uid:"):
                    return int(line.split()[4])  # real, effective, saved, fs: the fs uid made the file
        except (ValueError, IndexError):
            return None
        return None

    def _unverifiable(self, path: str, info: os.stat_result, app: str, owner: int, why: str) -> str | None:
        if owner in self.bindings.get(app, ()):
            self._accept(path, info, app, owner, verified=False)
            return None
        bound = self.bindings.get(app)
        known = f"bound to {_uids(bound)}" if bound else "not seen from a verified writer yet"
        return (
            f"unverifiable identity: {why}, and its owner {user_name(owner)} is not a verified writer "
            f"of app {app!r} ({known})"
        )

    def _bound_elsewhere(self, app: str, bound: set[int], owner: int, pid: int) -> str:
        shown = self.path or BINDINGS_FILE
        return (
            f"app name taken: app {app!r} is bound to {_uids(bound)}, its verified writers, and this segment "
            f"is from {user_name(owner)} (pid {pid}); if that user now runs {app!r}, add its uid to {shown} "
            "while netprofd is stopped"
        )

    def _accept(
        self, path: str, info: os.stat_result, app: str, owner: int, *, verified: bool, pid: int | None = None
    ) -> None:
        if len(self._inodes) > _PRUNE_AT or len(self._verified) > _PRUNE_AT:
            self._prune()
        self._inodes[(info.st_dev, info.st_ino)] = path
        if not verified:
            self._verified.pop(path, None)
            return
        self._verified[path] = owner
        bound = self.bindings.setdefault(app, set())
        if owner not in bound:
            bound.add(owner)
            store_logger.info(
                "app %r: %s is a verified writer%s",
                app, user_name(owner), f" (pid {pid})" if pid is not None else "",
            )  # fmt: skip
            self._save()

    def _prune(self) -> None:
        """Forget the segments that are gone (what the store has no use for any more)."""
        self._inodes = {key: path for key, path in self._inodes.items() if _names(path, key)}
        self._verified = {path: uid for path, uid in self._verified.items() if os.path.lexists(path)}

    # -- for actions ------------------------------------------------------------------

    def verified(self, entry: ProcessEntry) -> bool:
        """True if ``entry``'s writer was verified when found and still is the
        process it claims (the same pid, start time and owner)."""
        owner = self._verified.get(entry.path)
        if owner is None:
            return False
        if owner in self.trusted:
            return True
        header = entry.snapshot.header
        try:
            return self._running_as(header.pid, header.start_ticks) == owner
        except _Transient:
            return False

    def only_verified(self, entries: Iterable[ProcessEntry]) -> list[ProcessEntry]:
        return [entry for entry in entries if self.verified(entry)]

    # -- the bindings, kept in the state directory ---------------------------------------

    def _load(self) -> None:
        """Read the bindings saved, adding them to those in memory. A file that
        cannot be read is not "none": it is read again before the next save,
        which leaves it alone until then."""
        if self.path is None:
            return
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._unread = False
            return
        except OSError as exc:
            if not self._unread:
                store_logger.error("cannot read %s (%s): it is read again before it is saved", self.path, exc)
            self._unread = True
            return
        self._unread = False
        try:
            for app, uids in _parse_bindings(text).items():
                self.bindings.setdefault(app, set()).update(uids)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            try:
                os.replace(self.path, aside)
            except OSError:
                aside = self.path
            store_logger.error(
                "%s is not valid (%s): kept as %s; app names are bound afresh", self.path, exc, aside
            )

    def _save(self) -> None:
        if self.path is None:
            return
        if self._unread:
            self._load()
            if self._unread:
                return  # kept in memory: the file that could not be read is not overwritten
        data = {"apps": {app: sorted(uids) for app, uids in sorted(self.bindings.items())}}
        partial = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(
                partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
            )  # netprofd's alone
            with open(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, self.path)  # atomic: the old file or the new one
        except OSError as exc:
            if not self._save_failed:
                store_logger.error(
                    "cannot save %s (%s): the app bindings are kept in memory only", self.path, exc
                )
            self._save_failed = True
            return
        if self._save_failed:
            store_logger.info("saved %s again", self.path)
        self._save_failed = False


def _parse_bindings(text: str) -> dict[str, set[int]]:
    """``{"apps": {name: [uid, ...]}}``, strictly (the file is edited by hand):
    ValueError or TypeError naming what is not a list of uids."""
    apps = json.loads(text)["apps"]
    if not isinstance(apps, dict):
        raise TypeError(f'"apps" is {type(apps).__name__}, not an object')
    parsed: dict[str, set[int]] = {}
    for app, uids in apps.items():
        if not isinstance(uids, list) or not all(type(uid) is int and uid >= 0 for uid in uids):
            raise ValueError(f"app {app!r}: {uids!r} is not a list of uids")
        parsed[app] = set(uids)
    return parsed


def _read_at(directory: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory)
    except OSError as exc:
        if exc.errno in _TRANSIENT:
            raise _Transient(exc) from None
        return None
    try:
        return os.read(fd, 4096)
    except OSError as exc:  # ESRCH: the process ended after its directory was opened
        if exc.errno in _TRANSIENT:
            raise _Transient(exc) from None
        return None
    finally:
        os.close(fd)


def _names(path: str, file: os.stat_result | tuple[int, int]) -> bool:
    """True if ``path`` (not followed) still names that file."""
    key = (file.st_dev, file.st_ino) if isinstance(file, os.stat_result) else file
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == key


def _uids(uids: Iterable[int] | None) -> str:
    return ", ".join(user_name(uid) for uid in sorted(uids or ()))
