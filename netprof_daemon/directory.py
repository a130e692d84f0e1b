"""The segment directory as netprofd finds it at start, and the daemon's lock
file in it (docs/SECURITY.md, "Neighbours on the same host").

The documented directory is owned by netprofd's user, group ``netprof``,
mode 3770: every app of the group adds its segment (setgid: each gets the
group), and the sticky bit leaves a file's removal to its owner and to
netprofd. A directory someone else made, or that every user may write, lets
them plant or remove segments: netprofd refuses it. The lock file is the
daemon's alone (0600, never followed through a symlink): a neighbour that can
open it can lock it and keep netprofd from starting.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from netprof_core._layout import DAEMON_LOCK_NAME
from netprof_core.segment import flock_holders, user_name

from .log import store_logger

__all__ = ("LockHeld", "UnsafeSegmentDir", "open_segment_dir", "take_daemon_lock")

# What a directory netprofd makes itself gets, and what the deployment guide's tmpfiles.d line makes.
DIRECTORY_MODE = 0o3770
LOCK_MODE = 0o600
FIX = "tmpfiles.d: d {dir} 3770 netprofd netprof -"


class UnsafeSegmentDir(Exception):
    """The segment directory (or its lock file) is not as the deployment must
    make it; the message is one line, naming the path, what is wrong and the fix."""


class LockHeld(Exception):
    """The lock file is locked by what may be another netprofd."""

    def __init__(self, path: str, holders: list[tuple[int, int | None]] | None) -> None:
        super().__init__(path)
        self.path = path
        self.holders = holders  # (pid, its uid), None when the lock table cannot be read



def open_segment_dir(path: Path) -> int:
    """A descriptor on the segment directory, made (mode 3770) if it is
    missing; UnsafeSegmentDir if it is a symlink, not a directory, writable by
    every user, or owned by someone other than this user or root."""
    name = os.fspath(path)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags)
    except FileNotFoundError:
        _make(path)
        fd = os.open(name, flags)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise UnsafeSegmentDir(f"segment directory {name} {_not_a_directory(name)}; {_fix(name)}") from None
    try:
        _check(name, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return  # made meanwhile: checked as any other
    os.chmod(path, DIRECTORY_MODE)  # mkdir's mode is narrowed by the umask; the group is this process's
    store_logger.info("made the segment directory %s (mode %04o)", path, DIRECTORY_MODE)


def _not_a_directory(name: str) -> str:
    try:
        info = os.lstat(name)
    except OSError as exc:
        return f"cannot be checked ({exc.strerror})"
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.readlink(name)
        except OSError:
            target = "?"
        return f"is a symbolic link (to {target}), owned by {user_name(info.st_uid)}: not followed"
    return "is not a directory"


def _check(name: str, info: os.stat_result) -> None:
    mode = stat.S_IMODE(info.st_mode)
    owner = info.st_uid
    if owner not in (0, os.geteuid()):
        raise UnsafeSegmentDir(
            f"segment directory {name} is owned by {user_name(owner)}, not by netprofd's user "
            f"({user_name(os.geteuid())}) or root: another user made it first; remove it, then {_fix(name)}"
        )
    if mode & stat.S_IWOTH:
        raise UnsafeSegmentDir(
            f"segment directory {name} is writable by every user (mode {mode:04o}): anyone could plant "
            f"or remove segments; chmod o-rwx {name}, or {_fix(name)}"
        )
    if mode & stat.S_IWGRP and not mode & stat.S_ISVTX:
        store_logger.warning(
            "segment directory %s is group-writable without the sticky bit (mode %04o): any app of the "
            "group can delete or replace another app's segments; chmod +t %s (%s)",
            name, mode, name, FIX.format(dir=name),
        )  # fmt: skip


def _fix(name: str) -> str:
    return f"make it as the deployment guide says ({FIX.format(dir=name)})"


# -- the daemon's lock ------------------------------------------------------------


def take_daemon_lock(dir_fd: int, directory: str) -> int:
    """Open (making it, mode 0600) and flock the lock file in the directory
    open at ``dir_fd``; its descriptor, held while the daemon runs.

    A lock file that is a symlink or not a regular file, not this user's, or
    open to others (a neighbour may hold it open, and its lock) is removed and
    made anew, if no netprofd (a process of this user or root) holds it: a
    neighbour's lock does not keep the daemon from starting. LockHeld when
    another netprofd may hold it; UnsafeSegmentDir when it cannot be replaced."""
    path = f"{directory.rstrip('/')}/{DAEMON_LOCK_NAME}"
    for _ in range(4):
        fd = _open_lock_file(dir_fd, path)
        if fd is None:
            continue  # it was replaced: open the new one
        info = os.fstat(fd)
        doubt = _doubt(info)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holders = _holders(info)
            if doubt is None or holders is None or not holders or any(_ours(uid) for _, uid in holders):
                raise LockHeld(path, holders) from None
            _replace(dir_fd, path, info, f"{doubt}, locked by {_describe(holders)}")
            continue
        if doubt is not None:
            os.close(fd)  # whoever opened it while it was open to them could lock it later
            _replace(dir_fd, path, info, doubt)
            continue
        return fd
    raise UnsafeSegmentDir(
        f"{path} is made again by another user each time netprofd replaces it; {_fix(directory)}"
    )


def _open_lock_file(dir_fd: int, path: str) -> int | None:
    """The lock file's descriptor, or None after removing what stood in its place."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(DAEMON_LOCK_NAME, flags, LOCK_MODE, dir_fd=dir_fd)
    except OSError as exc:
        # ELOOP: a symlink. EACCES: another user's file in a sticky directory (fs.protected_regular).
        if exc.errno not in (errno.ELOOP, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENXIO):
            raise
        info = os.lstat(DAEMON_LOCK_NAME, dir_fd=dir_fd)
        if stat.S_ISLNK(info.st_mode):
            try:
                target = os.readlink(DAEMON_LOCK_NAME, dir_fd=dir_fd)
            except OSError:
                target = "?"
            _replace(dir_fd, path, info, f"a symbolic link to {target} (not followed)")
        elif stat.S_ISDIR(info.st_mode):
            raise UnsafeSegmentDir(f"{path} is a directory, not netprofd's lock file; remove it") from None
        else:
            _replace(dir_fd, path, info, _doubt(info) or f"cannot be opened ({exc.strerror})")
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        info = os.fstat(fd)
        os.close(fd)
        _replace(dir_fd, path, info, "not a regular file")
        return None
    return fd


def _doubt(info: os.stat_result) -> str | None:
    """Why a lock file may have been opened by someone else, or None."""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_uid != os.geteuid():
        return f"owned by {user_name(info.st_uid)}"
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return f"mode {mode:04o}, open to others"
    return None


def _replace(dir_fd: int, path: str, info: os.stat_result, why: str) -> None:
    try:
        os.unlink(DAEMON_LOCK_NAME, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UnsafeSegmentDir(
            f"{path} is {why}, owned by {user_name(info.st_uid)}, and netprofd cannot remove it "
            f"({exc.strerror}: it does not own the directory); remove it, or make the directory "
            "netprofd's (deployment guide)"
        ) from None
    store_logger.warning("replaced the lock file %s: it was %s", path, why)


def _holders(info: os.stat_result) -> list[tuple[int, int | None]] | None:
    found = flock_holders(info)
    if found is None:
        return None
    return [(pid, _uid_of(pid)) for pid, _ in found]


def _uid_of(pid: int) -> int | None:
    """The real uid of a live ``pid`` (/proc), None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _ours(uid: int | None) -> bool:
    """A holder that may be a netprofd: this user or root (a process that is
    gone may have handed its descriptor down: not ours either)."""
    return uid is not None and uid in (0, os.geteuid())


def _describe(holders: list[tuple[int, int | None]]) -> str:
    return ", ".join(f"pid {pid} ({user_name(uid) if uid is not None else 'gone'})" for pid, uid in holders)
