"""Real unprivileged users for the tests of who may do what on a host
(tests/test_trust_app.py, tests/test_trust_neighbours.py): a group and its
members made with groupadd/useradd, removed after; an interpreter they may
run; a directory they may all enter; how to start a process as one of them."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .servers import ROOT


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Group:
    """A group made for the tests and its members, in the order asked for."""

    name: str
    gid: int
    members: tuple[User, ...]
    python: str  # an interpreter every member may run, importing this checkout's netprof_core
    shared: Path  # a directory every member may enter and read (root's, mode 0755)

    def as_member(self, user: User, implementation: str = "cython") -> dict[str, Any]:
        """Keyword arguments for subprocess.run/Popen: a process of ``user``, in the
        group, with this checkout's netprof_core and ``implementation``'s core."""
        return {
            "user": user.uid,
            "group": user.gid,
            "extra_groups": [self.gid],
            "env": user_env(implementation),
            "cwd": self.shared,
        }


def user_env(implementation: str = "cython") -> dict[str, str]:
    """A user's whole environment: none of root's variables, this checkout on the path."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    if implementation == "python":
        env["NETPROF_NO_EXTENSIONS"] = "1"
    return env


def _run(argv: Sequence[str]) -> None:
    """Run a user or group tool; again while another holds /etc/passwd's lock
    (the suite's workers may make users at the same time)."""
    for _ in range(50):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode == 0 or "lock" not in done.stderr:
            break
        time.sleep(0.1)
    done.check_returncode()


def _make_user(name: str, group: str) -> User:
    _run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--groups", group, name])
    entry = pwd.getpwnam(name)
    return User(name, entry.pw_uid, entry.pw_gid)


def _python_for(user: User, gid: int, cwd: Path, imports: str) -> str | None:
    """An interpreter ``user`` may run that imports ``imports`` from this checkout
    (the tests' own may sit under a directory only root can enter)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, os.path.realpath(sys.executable), f"/usr/bin/python{version}"):
        if not os.path.exists(candidate):
            continue
        try:
            done = subprocess.run(
                [candidate, "-c", f"import {imports}"],
                user=user.uid, group=user.gid, extra_groups=[gid], env=user_env(), cwd=cwd,
                capture_output=True, timeout=60, check=False,
            )  # fmt: skip
        except OSError:  # it cannot even be started as that user
            continue
        if done.returncode == 0:
            return candidate
    return None


@contextlib.contextmanager
def made_group(
    prefix: str,
    roles: Sequence[str],
    *,
    shared_in: str,
    imports: str = "netprof_core, netprof_core.segment",
) -> Iterator[Group]:
    """Group ``<prefix>g<tag>`` with a member ``<prefix><role><tag>`` for each of
    ``roles`` (a fresh tag each time), and a shared directory made in
    ``shared_in``; all removed when the block ends. Skips the test without root
    or useradd, or when no interpreter a member may run imports ``imports``."""
    if os.geteuid() != 0:
        pytest.skip("needs root: makes users and runs processes as them")
    if shutil.which("useradd") is None:
        pytest.skip("no useradd on this host")
    tag = uuid.uuid4().hex[:6]
    name, made = f"{prefix}g{tag}", []
    shared = Path(tempfile.mkdtemp(prefix=f"netprof-{prefix}-", dir=shared_in))
    try:
        shared.chmod(0o755)
        _run(["groupadd", name])
        gid = grp.getgrnam(name).gr_gid
        for role in roles:
            made.append(_make_user(f"{prefix}{role}{tag}", name))
        python = _python_for(made[0], gid, shared, imports)
        if python is None:
            pytest.skip("no Python interpreter that an unprivileged user can run with this checkout")
        yield Group(name, gid, tuple(made), python, shared)
    finally:
        for user in made:
            subprocess.run(["userdel", user.name], capture_output=True, check=False)
        subprocess.run(["groupdel", name], capture_output=True, check=False)
        shutil.rmtree(shared, ignore_errors=True)
