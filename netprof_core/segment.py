"""Segment files: making one, validating one, knowing whose it is, clearing old ones."""

from __future__ import annotations

import errno
import fcntl
import itertools
import mmap
import operator
import os
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
    "create_segment",
    "daemon_running",
    "format_segment",
    "lock_segment",
    "map_segment",
    "parse_header",
    "process_alive",
    "process_start_ticks",
    "remove_stale_segments",
    "segment_paths",
    "writer_alive",
)

# Owner read-write, group read: netprofd reads through a shared group.
SEGMENT_MODE = 0o640
DIRECTORY_MODE = 0o750
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
    (closed_ns,) = L.U64.unpack_from(buf, L.CLOSED_NS_OFFSET)
    app_name = v[_H_APP].rstrip(b"\0").decode("utf-8", "replace")
    # SegmentHeader(*ints, app_name, closed_ns), in one call (a header is parsed for every segment found).
    return _new_frozen(SegmentHeader, _HEADER_FIELDS, (*_HEADER_INTS(v), app_name, closed_ns))  # type: ignore[no-any-return]


def process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (/proc), None if it is gone."""
    # The daemon asks this of every idle process at every tick: the core's
    # (open, read and parse in C where the Cython core is in use).
    return _proc_start_ticks(pid)


def process_alive(pid: int, start_ticks: int) -> bool:
    """True if ``pid`` still names the process that started at ``start_ticks``
    (0: not known, when /proc was not there; then any process with that pid counts)."""
    if start_ticks == 0:
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
    **contents: Any,
) -> tuple[Path, mmap.mmap, int]:
    """Make, map and format a new segment file for this process (``contents``
    as for :func:`format_segment`). Returns its path, its mapping and the
    file descriptor that holds the writer's lock: keep it open while the
    segment is written, close it after marking the segment closed."""
    directory = Path(directory)
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(DIRECTORY_MODE)  # mkdir's mode is narrowed by the umask
    pid = os.getpid()
    ticks = process_start_ticks(pid) or 0
    path = directory / f"{_safe_name(app_name)}-{pid}-{ticks}-{next(_sequence)}{L.SEGMENT_SUFFIX}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, SEGMENT_MODE)
    try:
        os.fchmod(fd, SEGMENT_MODE)  # the umask must not widen or narrow it
        # Locked before the magic is written: a reader never sees a segment
        # whose writer is alive without the lock (see process_alive).
        lock_segment(fd)
        os.ftruncate(fd, layout.total_size)
        buf = mmap.mmap(fd, layout.total_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        format_segment(buf, app_name, layout, start_ticks=ticks, **contents)
    except BaseException:
        path.unlink(missing_ok=True)
        os.close(fd)
        raise
    return path, buf, fd


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
    data = text.encode()
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode()


def mark_closed(buf: mmap.mmap) -> None:
    L.U64.pack_into(buf, L.CLOSED_NS_OFFSET, time.time_ns())


def map_segment(path: str | os.PathLike[str], *, writable: bool = False) -> tuple[mmap.mmap, SegmentHeader]:
    """Map an existing segment and validate its header; SegmentError if it is not one."""
    # O_NONBLOCK: a FIFO named like a segment must not hang the caller.
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK
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
    try:
        return sorted(Path(directory).glob(f"*{L.SEGMENT_SUFFIX}"))
    except OSError:
        return []


def daemon_running(directory: str | os.PathLike[str]) -> bool:
    """True while a netprofd holds its lock in ``directory``."""
    try:
        fd = os.open(Path(directory) / L.DAEMON_LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)
    return False


def remove_stale_segments(
    directory: str | os.PathLike[str], *, older_than: float = STALE_AFTER_SECONDS
) -> list[Path]:
    """Remove segments of ended processes (closed, or whose pid is gone) that
    are older than ``older_than`` seconds. Only when no netprofd runs: a running
    daemon folds such segments into its totals and removes them itself."""
    if daemon_running(directory):
        return []
    removed = []
    now = time.time_ns()
    for path in segment_paths(directory):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    continue
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
                path.unlink()
            except OSError:
                continue
            segment_logger.info("removed stale segment %s (pid %d)", path, header.pid)
            removed.append(path)
    return removed
