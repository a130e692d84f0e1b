"""Segment files: making one, validating one, knowing whose it is, clearing old ones."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import mmap
import operator
import os
import pwd
import re
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from . import _layout as L
from ._recorder import core_module
from ._recorder_py import FLOCK_STRUCT
from .log import segment_logger

_proc_start_ticks = core_module().proc_start_ticks
_new_frozen = core_module().new_frozen
_segment_locked = core_module().segment_locked
_WHOLE_FILE_READ_LOCK = FLOCK_STRUCT.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)

__all__ = (
    "SegmentError",
    "SegmentHeader",
    "UnsafeSegmentDirectory",
    "create_segment",
    "daemon_running",
    "flock_holders",
    "format_segment",
    "lock_segment",
    "map_segment",
    "open_segment_directory",
    "parse_header",
    "process_alive",
    "process_start_ticks",
    "remove_stale_segments",
    "segment_paths",
    "writer_alive",
)

# Owner read-write, group read: netprofd reads through a shared group.
SEGMENT_MODE = 0o640
DIRECTORY_MODE = 0o750  # one the app makes itself (the documented one is netprofd's, 3770)
# Who besides root and this process's user may own the segment directory: netprofd's user (segment_dir_owner).
DEFAULT_DIRECTORY_OWNER = "netprofd"
STALE_AFTER_SECONDS = 600.0

_sequence = itertools.count()


class SegmentError(Exception):
    """A file that is not a segment netprof can read: named, with the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str, errno: int | None = None) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason
        self.errno = errno  # set when the file could not be opened


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    layout_version: int
    total_size: int
    pid: int
    start_ticks: int
    created_ns: int
    mono_offset_ns: int
    ring_capacity: int
    route_capacity: int
    requested_ring_capacity: int
    requested_route_capacity: int
    memory_shrinks: int
    app_name: str
    closed_ns: int

    @property
    def layout(self) -> L.SegmentLayout:
        return _layout(self.ring_capacity, self.route_capacity)

    @property
    def closed(self) -> bool:
        return self.closed_ns != 0


# Layouts by capacities, with their total size, live offset and route slots:
# the processes of a host have few configurations, and a layout computes its
# offsets at each use.
_layouts: dict[tuple[int, int], tuple[L.SegmentLayout, int, int, int]] = {}


def _layout_and_size(ring_capacity: int, route_capacity: int) -> tuple[L.SegmentLayout, int, int, int]:
    """The layout of these capacities, its total size, live offset and route slots."""
    found = _layouts.get((ring_capacity, route_capacity))
    if found is None:
        if len(_layouts) >= 256:
            _layouts.clear()  # a bound, not an LRU: configurations are few
        layout = L.SegmentLayout(ring_capacity, route_capacity)
        found = _layouts[ring_capacity, route_capacity] = (
            layout,
            layout.total_size,
            layout.live_offset,
            layout.route_slots,
        )
    return found


def _layout(ring_capacity: int, route_capacity: int) -> L.SegmentLayout:
    return _layout_and_size(ring_capacity, route_capacity)[0]


# Positions of the header's fields in HEADER_STRUCT's values.
_H = {name: i for i, name in enumerate(L.HEADER_FIELDS)}
_H_MAGIC, _H_VERSION, _H_HEADER_SIZE, _H_TOTAL, _H_RING, _H_ROUTES, _H_BUCKETS, _H_APP = (
    _H[name]
    for name in (
        "magic",
        "layout_version",
        "header_size",
        "total_size",
        "ring_capacity",
        "route_capacity",
        "hist_buckets",
        "app_name",
    )
)
# SegmentHeader's integer fields (all but app_name and closed_ns), in its order, by name.
_HEADER_INTS = operator.itemgetter(
    *(_H[f.name] for f in fields(SegmentHeader) if f.name in _H and f.name != "app_name")
)
_NO_MAGIC = bytes(len(L.MAGIC))
_HEADER_FIELDS = tuple(f.name for f in fields(SegmentHeader))


def parse_header(
    buf: bytes | mmap.mmap | memoryview, path: str | os.PathLike[str], *, file_size: int | None = None
) -> SegmentHeader:
    """Validate the header of a segment held in ``buf``: the whole file, or its
    first HEADER_SIZE bytes with the ``file_size``."""
    if len(buf) < L.HEADER_SIZE:
        raise SegmentError(path, f"truncated: {len(buf)} bytes, shorter than a header")
    v = L.HEADER_STRUCT.unpack_from(buf, 0)
    if v[_H_MAGIC] == _NO_MAGIC:
        raise SegmentError(path, "not initialised yet (no magic)")
    if v[_H_MAGIC] != L.MAGIC:
        raise SegmentError(path, f"not a netprof segment (magic {v[_H_MAGIC]!r})")
    if v[_H_VERSION] != L.LAYOUT_VERSION:
        raise SegmentError(
            path,
            f"layout version {v[_H_VERSION]}, this netprof reads version {L.LAYOUT_VERSION}",
        )
    if v[_H_HEADER_SIZE] != L.HEADER_SIZE or v[_H_BUCKETS] != L.HIST_BUCKETS:
        raise SegmentError(path, "header sizes do not match this layout version")
    # (_layout_and_size, inline: asked for each segment found)
    found = _layouts.get((v[_H_RING], v[_H_ROUTES]))
    total_size = (found or _layout_and_size(v[_H_RING], v[_H_ROUTES]))[1]
    if v[_H_TOTAL] != total_size:
        raise SegmentError(path, f"header says {v[_H_TOTAL]} bytes, its capacities need {total_size}")
    size = len(buf) if file_size is None else file_size
    if size < total_size:
        raise SegmentError(path, f"truncated: {size} of {total_size} bytes")
    _check_capacities(v, path)
    (closed_ns,) = L.U64.unpack_from(buf, L.CLOSED_NS_OFFSET)
    app_name = v[_H_APP].rstrip(b"\0").decode("utf-8", "replace")
    # SegmentHeader(*ints, app_name, closed_ns), in one call (a header is parsed for every segment found).
    return _new_frozen(SegmentHeader, _HEADER_FIELDS, (*_HEADER_INTS(v), app_name, closed_ns))  # type: ignore[no-any-return]


# What a real writer can make (netprof_core.config's bounds, and
# SegmentLayout.fitting within max_memory_mb): a header that declares more was
# not made by one, and is not read (reading its ring would never end).
MAX_RING_CAPACITY = 1_000_000  # max_stored_requests
MAX_ROUTE_CAPACITY = 4096  # max_routes
MAX_SEGMENT_BYTES = 4096 * 2**20  # max_memory_mb
_H_WANTED_RING, _H_WANTED_ROUTES, _H_SHRINKS = (
    _H[name] for name in ("requested_ring_capacity", "requested_route_capacity", "memory_shrinks")
)


def _check_capacities(v: tuple[Any, ...], path: str | os.PathLike[str]) -> None:
    """SegmentError unless the header's capacities are ones a real writer
    makes: within the configuration's bounds, and what it asked for unless
    the memory bound shrank them (then no more than that)."""
    ring, routes = v[_H_RING], v[_H_ROUTES]
    wanted_ring, wanted_routes, shrinks = v[_H_WANTED_RING], v[_H_WANTED_ROUTES], v[_H_SHRINKS]
    if ring > MAX_RING_CAPACITY or wanted_ring > MAX_RING_CAPACITY:
        raise SegmentError(
            path, f"a ring of {max(ring, wanted_ring)} records: a writer keeps at most {MAX_RING_CAPACITY}"
        )
    if routes > MAX_ROUTE_CAPACITY or wanted_routes > MAX_ROUTE_CAPACITY:
        raise SegmentError(
            path, f"{max(routes, wanted_routes)} routes: a writer interns at most {MAX_ROUTE_CAPACITY}"
        )
    if shrinks not in (0, 1) or ring > wanted_ring or routes > wanted_routes:
        raise SegmentError(
            path, f"capacities {ring} records, {routes} routes do not follow from the {wanted_ring} "
            f"records, {wanted_routes} routes asked for (memory_shrinks {shrinks})",
        )  # fmt: skip
    if not shrinks and (ring, routes) != (wanted_ring, wanted_routes):
        raise SegmentError(
            path, f"capacities {ring} records, {routes} routes shrank from {wanted_ring} records, "
            f"{wanted_routes} routes, yet memory_shrinks is 0",
        )  # fmt: skip


# The largest pid_t: Linux pids stay below 2**22 (PID_MAX_LIMIT).
_MAX_PID = 2**31 - 1


def process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (/proc), None if it is gone."""
    # The daemon asks this of every idle process at every tick: the core's
    # (open, read and parse in C where the Cython core is in use).
    return _proc_start_ticks(pid)


def process_alive(pid: int, start_ticks: int) -> bool:
    """True if ``pid`` still names the process that started at ``start_ticks``
    (0: not known, when /proc was not there; then any process with that pid counts)."""
    if start_ticks == 0:
        # A header's pid is any u64: past pid_t, os.kill raises OverflowError,
        # and 0 (or a negative pid_t) would signal a process group, not a process.
        if not 0 < pid <= _MAX_PID:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _proc_start_ticks(pid) == start_ticks  # (process_start_ticks, one call less)


def writer_alive(fd: int, pid: int, start_ticks: int) -> bool:
    """True while the writer of the segment open at ``fd`` is alive: it holds
    its lock (one fcntl), or, for a segment whose lock cannot be seen (a file
    system without open file description locks), ``pid`` still names the
    process that started at ``start_ticks`` (/proc)."""
    return _segment_locked(fd) or process_alive(pid, start_ticks)


def _safe_name(app_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", app_name)[: L.APP_NAME_MAX] or "app"


def create_segment(
    directory: str | os.PathLike[str],
    app_name: str,
    layout: L.SegmentLayout,
    *,
    owner: str = DEFAULT_DIRECTORY_OWNER,
    **contents: Any,
) -> tuple[Path, mmap.mmap, int]:
    """Make, map and format a new segment file for this process (``contents``
    as for :func:`format_segment`) in ``directory``, which must be one this
    process can trust (:func:`open_segment_directory`; ``owner``: the
    ``segment_dir_owner`` setting). Its space is reserved first: a full
    tmpfs is an OSError here, never a SIGBUS later. Returns its path, its
    mapping and the file descriptor that holds the writer's lock: keep it
    open while the segment is written, close it after marking the segment closed."""
    dir_fd = open_segment_directory(directory, owner)
    try:
        pid = os.getpid()
        ticks = process_start_ticks(pid) or 0
        name, fd = _create_file(dir_fd, f"{_safe_name(app_name)}-{pid}-{ticks}")
        buf: mmap.mmap | None = None
        try:
            os.fchmod(fd, SEGMENT_MODE)  # the umask must not widen or narrow it
            # Locked before the magic is written: a reader never sees a segment
            # whose writer is alive without the lock (see process_alive).
            lock_segment(fd)
            # Every page allocated now (ftruncate would leave a sparse file,
            # whose first write to a page the tmpfs cannot back kills the process).
            os.posix_fallocate(fd, 0, layout.total_size)
            buf = mmap.mmap(fd, layout.total_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            format_segment(buf, app_name, layout, start_ticks=ticks, **contents)
        except BaseException:
            if buf is not None:
                buf.close()
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
            os.close(fd)
            raise
    finally:
        os.close(dir_fd)
    return Path(directory) / name, buf, fd


# Tries at a free name: a neighbour may have made files under the names this process would take next.
_NAME_TRIES = 8


def _create_file(dir_fd: int, stem: str) -> tuple[str, int]:
    """A new segment file ``stem-N.npseg`` in the directory open at
    ``dir_fd``: its name and descriptor. Never one that was there (O_EXCL),
    never through a symlink (O_NOFOLLOW)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt in range(_NAME_TRIES):
        name = f"{stem}-{next(_sequence)}{L.SEGMENT_SUFFIX}"
        try:
            return name, os.open(name, flags, SEGMENT_MODE, dir_fd=dir_fd)
        except FileExistsError:
            if attempt == _NAME_TRIES - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


# -- the directory, as a writer finds it ---------------------------------------------
# docs/SECURITY.md: the documented directory is netprofd's user's, group
# netprof, mode 3770. A writer refuses one that another user could have made
# or may write: they could plant, swap or remove segments in it.

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_owner_uids: dict[str, int | None] = {}  # segment_dir_owner -> its uid (None: no such user)


class UnsafeSegmentDirectory(PermissionError):
    """A segment directory this process will not write into; the message names
    the directory, what is wrong with it and the fix."""

    def __init__(self, directory: str, reason: str) -> None:
        super().__init__(
            f"segment directory {directory} {reason}; make it as the deployment guide says "
            f"(owned by netprofd's user, group netprof, mode 3770)"
        )
        self.directory = directory
        self.reason = reason


def open_segment_directory(directory: str | os.PathLike[str], owner: str = DEFAULT_DIRECTORY_OWNER) -> int:
    """A descriptor on the segment directory, made (mode 0750) if it is
    missing. UnsafeSegmentDirectory if it is a symlink or not a directory, if
    every user may write it, or if its owner is none of root, this process's
    user and ``owner`` (a user name or uid: netprofd's user)."""
    name = os.fspath(directory)
    made = False
    try:
        fd = os.open(name, _DIRECTORY_FLAGS)
    except FileNotFoundError:
        made = _make_directory(name)
        fd = os.open(name, _DIRECTORY_FLAGS)
    except OSError as exc:
        reason = _not_a_directory(name) if exc.errno in (errno.ELOOP, errno.ENOTDIR) else None
        if reason is None:
            raise
        raise UnsafeSegmentDirectory(name, reason) from None
    try:
        info = os.fstat(fd)
        if made and info.st_uid == os.geteuid():
            os.fchmod(fd, DIRECTORY_MODE)  # mkdir's mode is narrowed by the umask
            info = os.fstat(fd)
        _check_directory(name, info, owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_directory(name: str) -> bool:
    """Make the directory (only its owner may enter it until it is checked); False if it was made meanwhile."""
    os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)
    try:
        os.mkdir(name, 0o700)
    except FileExistsError:
        return False
    return True


def _not_a_directory(name: str) -> str | None:
    """What stands at ``name`` in place of a directory; None if nothing does
    (a component of its path is not a directory: the OS's error says so)."""
    try:
        info = os.lstat(name)
    except OSError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return f"is a symbolic link, owned by {user_name(info.st_uid)}: not followed"
    return "is not a directory"


def _check_directory(name: str, info: os.stat_result, owner: str) -> None:
    mode = stat.S_IMODE(info.st_mode)
    if mode & stat.S_IWOTH:
        raise UnsafeSegmentDirectory(
            name, f"is writable by every user (mode {mode:04o}): anyone could plant or remove segments"
        )
    if info.st_uid not in (0, os.geteuid()) and info.st_uid != _owner_uid(owner):
        raise UnsafeSegmentDirectory(
            name,
            f"is owned by {user_name(info.st_uid)}, not by root, this process's user "
            f"({user_name(os.geteuid())}) or segment_dir_owner ({owner}): another user may have made it",
        )


def _owner_uid(owner: str) -> int | None:
    """The uid ``owner`` names (a number, or a user name: looked up once per
    process, and only for a directory that is neither root's nor this user's)."""
    if owner.isascii() and owner.isdigit():
        return int(owner)
    if owner not in _owner_uids:
        try:
            _owner_uids[owner] = pwd.getpwnam(owner).pw_uid
        except KeyError:
            _owner_uids[owner] = None  # no such user here: it adds nobody
    return _owner_uids[owner]


def user_name(uid: int) -> str:
    """``uid 1000 (alice)`` for a log line or an error; the number alone for an unknown uid."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def lock_segment(fd: int) -> None:
    """Take the writer's lock: a read lock on the whole file, held by the open
    file (F_OFD_SETLK) until its last descriptor is closed. A file system
    without such locks leaves liveness to /proc."""
    setlk = getattr(fcntl, "F_OFD_SETLK", None)  # Linux only
    if setlk is None:
        return
    try:
        fcntl.fcntl(fd, setlk, _WHOLE_FILE_READ_LOCK)
    except OSError as exc:
        segment_logger.debug("cannot lock segment (liveness falls back to /proc): %s", exc)


def format_segment(
    buf: mmap.mmap,
    app_name: str,
    layout: L.SegmentLayout,
    *,
    requested: tuple[int, int],
    memory_shrinks: int,
    control: Mapping[int, int],
    route_names: Sequence[tuple[int, str, str]] = (),
    created_ns: int | None = None,
    start_ticks: int | None = None,
) -> None:
    """Write a new segment's header, control block and route table into a
    zeroed buffer. The magic is written last, so a reader never takes a
    half-made file for a segment."""
    for word, value in control.items():
        L.U64.pack_into(buf, L.CONTROL_OFFSET + word * L.WORD, value)
    write_route_name(buf, layout, L.OVERFLOW_ROUTE_ID, L.Direction.INBOUND, "", L.OVERFLOW_TEMPLATE)
    for route_id, (direction, method, template) in enumerate(route_names[1:], start=1):
        write_route_name(buf, layout, route_id, direction, method, template)
    L.ROUTE_TABLE_STRUCT.pack_into(buf, L.ROUTES_OFFSET, max(len(route_names), 1), 0)
    pid = os.getpid()
    now = time.time_ns() if created_ns is None else created_ns
    L.HEADER_STRUCT.pack_into(
        buf,
        0,
        bytes(len(L.MAGIC)),
        L.LAYOUT_VERSION,
        L.HEADER_SIZE,
        layout.total_size,
        pid,
        (process_start_ticks(pid) or 0) if start_ticks is None else start_ticks,
        now,
        time.time_ns() - time.monotonic_ns(),
        layout.ring_capacity,
        layout.route_capacity,
        requested[0],
        requested[1],
        L.HIST_BUCKETS,
        memory_shrinks,
        app_name.encode()[: L.APP_NAME_MAX],
    )
    buf[: len(L.MAGIC)] = L.MAGIC


def write_route_name(
    buf: mmap.mmap, layout: L.SegmentLayout, route_id: int, direction: int, method: str, template: str
) -> None:
    L.ROUTE_NAME_STRUCT.pack_into(
        buf,
        layout.route_name_offset(route_id),
        direction,
        _truncate_utf8(method, 12),
        _truncate_utf8(template, 112),
    )


def _truncate_utf8(text: str, limit: int) -> bytes:
    # A lone surrogate (a name decoded with surrogateescape) is kept as its
    # escape (\udcff): it cannot be UTF-8, and a name is no reason for an
    # internal error (four of them in a row would auto-disable recording).
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode()


def mark_closed(buf: mmap.mmap) -> None:
    L.U64.pack_into(buf, L.CLOSED_NS_OFFSET, time.time_ns())


def map_segment(path: str | os.PathLike[str], *, writable: bool = False) -> tuple[mmap.mmap, SegmentHeader]:
    """Map an existing segment and validate its header; SegmentError if it is not one."""
    # O_NONBLOCK: a FIFO named like a segment must not hang the caller;
    # O_NOFOLLOW: a symlink named like one must not lead to another file.
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise SegmentError(path, f"cannot open: {exc.strerror}", exc.errno) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SegmentError(path, "not a regular file")
        if info.st_size < L.HEADER_SIZE:
            raise SegmentError(path, f"truncated: {info.st_size} bytes, shorter than a header")
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        try:
            buf = mmap.mmap(fd, info.st_size, access=access)
        except OSError as exc:
            raise SegmentError(path, f"cannot map: {exc.strerror}") from exc
    finally:
        os.close(fd)
    try:
        return buf, parse_header(buf, path)
    except BaseException:
        buf.close()
        raise


def segment_paths(directory: str | os.PathLike[str]) -> list[Path]:
    """The segment files in ``directory``, none if there is no such
    directory; OSError if it cannot be listed (a listing that failed is never
    an empty directory)."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(Path(directory) / name for name in names if name.endswith(L.SEGMENT_SUFFIX))


def flock_holders(info: os.stat_result) -> list[tuple[int, str]] | None:
    """The flock()s held on the file of ``info`` (its device and inode), from
    the kernel's lock table: (pid of the process that took it, "READ" or
    "WRITE") each; None when /proc/locks cannot be read. Any user may read the
    table, without opening the file. Waiters (lines "->") hold nothing; a lock
    taken in a PID namespace this /proc does not show is not listed."""
    try:
        with open("/proc/locks", "rb") as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 1234 00:1b:42 0 EOF": the device in hex, as the kernel prints it.
    key = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}".encode()
    holders = []
    for line in lines:
        words = line.split()
        if len(words) >= 6 and words[1] == b"FLOCK" and words[5] == key:
            try:
                holders.append((int(words[4]), words[3].decode("ascii", "replace")))
            except ValueError:
                continue
    return holders


def daemon_running(directory: str | os.PathLike[str]) -> bool | None:
    """True while a netprofd holds its lock in ``directory``, False when none
    does, None when this cannot be told (/proc/locks unreadable): then do
    nothing that only an absent daemon may do.

    The lock file is netprofd's alone (mode 0600): an app does not open it (an
    app that could open it could also hold its lock and keep the daemon from
    starting); it looks for the daemon's exclusive flock in the kernel's lock
    table instead."""
    try:
        info = os.lstat(Path(directory) / L.DAEMON_LOCK_NAME)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return False  # a symlink or another file: not one netprofd would lock (it follows no link)
    holders = flock_holders(info)
    if holders is None:
        return None
    return any(mode == "WRITE" for _, mode in holders)


def remove_stale_segments(
    directory: str | os.PathLike[str],
    *,
    older_than: float = STALE_AFTER_SECONDS,
    owner: str = DEFAULT_DIRECTORY_OWNER,
) -> list[Path]:
    """Remove segments of ended processes (closed, or whose pid is gone) that
    are older than ``older_than`` seconds. Only when no netprofd runs: a running
    daemon folds such segments into its totals and removes them itself (and
    when that cannot be told, nothing is removed). Only in a directory this
    process trusts (``owner``: as for :func:`open_segment_directory`), only
    this user's own regular files, never through a symlink."""
    if daemon_running(directory) is not False:
        return []
    try:
        dir_fd = _open_existing_directory(directory, owner)
    except (FileNotFoundError, UnsafeSegmentDirectory):
        return []
    try:
        return _remove_stale(dir_fd, Path(directory), older_than)
    finally:
        os.close(dir_fd)


def _open_existing_directory(directory: str | os.PathLike[str], owner: str) -> int:
    try:
        fd = os.open(directory, _DIRECTORY_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeSegmentDirectory(os.fspath(directory), "is not a directory") from None
        raise
    try:
        _check_directory(os.fspath(directory), os.fstat(fd), owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_stale(dir_fd: int, directory: Path, older_than: float) -> list[Path]:
    removed = []
    now = time.time_ns()
    me = os.geteuid()
    for name in sorted(os.listdir(dir_fd)):
        if not name.endswith(L.SEGMENT_SUFFIX):
            continue
        path = directory / name
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_uid != me:
                    continue  # another user's, or not a file: not this process's to delete
                header = parse_header(os.pread(fd, L.HEADER_SIZE, 0), path, file_size=info.st_size)
                alive = not header.closed and writer_alive(fd, header.pid, header.start_ticks)
            finally:
                os.close(fd)
        except (OSError, SegmentError):
            continue  # a foreign or half-made file is not ours to delete
        if header.closed:
            ended_ns = header.closed_ns
        elif alive:
            continue
        else:
            ended_ns = max(header.created_ns, info.st_mtime_ns)
        if now - ended_ns > older_than * 1e9:
            try:
                now_there = os.lstat(name, dir_fd=dir_fd)
                if (now_there.st_dev, now_there.st_ino) != (info.st_dev, info.st_ino):
                    continue  # replaced since it was read: not the file that was judged
                os.unlink(name, dir_fd=dir_fd)
            except OSError:
                continue
            segment_logger.info("removed stale segment %s (pid %d)", path, header.pid)
            removed.append(path)
    return removed
