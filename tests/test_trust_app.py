"""The application must never be hurt (issue 15, docs/SECURITY.md): netprof's
side inside the application's own process.

Real processes throughout: apps in subprocesses (a signal that kills one is
seen as its return code, never in the test's own process), a real small tmpfs
mounted for the test, real unprivileged users made with useradd, a real
uvicorn. Tests that need root (mount, useradd) are skipped without it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from netprof_core import _layout as L
from netprof_core import read_segment
from tests.apps.hostusers import Group, User, made_group
from tests.apps.servers import ROOT, serve_and_drive, server_env, uvicorn_argv
from tests.apps.tmpfs import mounted_tmpfs

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts a tmpfs, makes users")

SIGBUS_RETURNCODE = -signal.SIGBUS


# -- processes of the application ----------------------------------------------------------------------------

# One script for every part an application plays; each line it prints is JSON.
APP = r"""
import json, logging, os, struct, sys, time
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
from netprof_core import ProfilingConfig, Recorder
from netprof_core import _layout as L

CORE = "python" if os.environ.get("NETPROF_NO_EXTENSIONS") == "1" else "cython"

def say(**what):
    print(json.dumps(what), flush=True)

def recorder(segment_dir, **keys):
    keys = {"app_name": "trust", "log_slow_requests": False, "segment_dir": segment_dir, **keys}
    if "segment_dir_owner" not in ProfilingConfig.__dataclass_fields__:  # a netprof before the key
        keys.pop("segment_dir_owner", None)
    return Recorder(ProfilingConfig(**keys), implementation=CORE)

def durations():
    # From 1 ns to ~2**62 ns: every page of a route's histogram gets a count.
    return [int(1.03 ** k) for k in range(1460)]

def traffic(rec, templates):
    counts = {}
    for template in templates:
        route = rec.route_id(template)
        for d in durations():
            rec.record(route, 200, 1, 1 + d, 100, 200)
        counts[template] = len(durations())
    return counts

def routes_of(snapshot):
    return {r.key.template: r.count for r in snapshot.routes if r.count}

role, args = sys.argv[1], sys.argv[2:]
if role == "full":  # SEGMENT_DIR: a recorder made in a full tmpfs
    rec = recorder(args[0], max_stored_requests=4000)
    route = rec.route_id("/private")
    for i in range(500):
        rec.record(route, 200, 1000, 2000 + i)
    snap = rec.snapshot()
    say(path=str(rec.path) if rec.path else None, requests=snap.counters.requests, routes=routes_of(snap),
        records=len(snap.records), internal_errors=snap.counters.internal_errors)
elif role == "filled-later":  # SEGMENT_DIR TEMPLATES: made, then (told) heavy traffic
    rec = recorder(args[0], max_stored_requests=4000, max_routes=24)
    say(path=str(rec.path))
    sys.stdin.readline()  # the tmpfs is full now
    counts = traffic(rec, args[1].split(","))
    snap = rec.snapshot()
    say(requests=snap.counters.requests, internal_errors=snap.counters.internal_errors, sent=counts)
    rec.close()
elif role == "fork":  # SEGMENT_DIR: made, then (told) forks a child that records
    rec = recorder(args[0], max_stored_requests=4000)
    say(path=str(rec.path))
    sys.stdin.readline()  # the tmpfs is full now
    pid = os.fork()
    if pid == 0:
        route = rec.route_id("/child")
        for i in range(300):
            rec.record(route, 200, 1000, 2000 + i)
        snap = rec.snapshot()
        say(child=os.getpid(), path=str(rec.path) if rec.path else None, routes=routes_of(snap))
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    say(child_returncode=os.waitstatus_to_exitcode(status))
    route = rec.route_id("/parent")
    rec.record(route, 200, 1000, 2000)
    say(parent_routes=routes_of(rec.snapshot()))
elif role == "app":  # SEGMENT_DIR OWNER [strict]: a real app's recorder, as its user
    keys = {"segment_dir_owner": args[1], "max_stored_requests": 64}
    if len(args) > 2:
        keys["graceful_degradation"] = False
    try:
        rec = recorder(args[0], **keys)
    except Exception as exc:
        say(error=f"{type(exc).__name__}: {exc}")
        sys.exit(0)
    route = rec.route_id("/a")
    for _ in range(5):
        t = time.monotonic_ns()
        rec.record(route, 200, t, t + 1000)
    say(path=str(rec.path) if rec.path else None, requests=rec.snapshot().counters.requests, uid=os.geteuid())
elif role == "ended":  # SEGMENT_DIR: a segment of this user, closed long ago
    rec = recorder(args[0], max_stored_requests=16)
    rec.close()
    with open(rec.path, "r+b") as f:
        f.seek(L.CLOSED_NS_OFFSET)
        f.write((10**18).to_bytes(8, "little"))
    say(path=str(rec.path))
elif role == "stale":  # SEGMENT_DIR: this user's clean-up of ended segments
    from netprof_core.segment import remove_stale_segments
    say(removed=[str(p) for p in remove_stale_segments(args[0], older_than=0)])
elif role == "signals":  # SEGMENT_DIR SECONDS: a signal handler records while the main code records
    import signal
    rec = recorder(args[0])
    main, handler_route = rec.route_id("/main"), rec.route_id("/handler")
    handled = 0
    def handler(signum, frame):
        global handled
        t = time.monotonic_ns()
        rec.record(handler_route, 200, t, t + 10)
        handled += 1
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    sent, deadline = 0, time.monotonic() + float(args[1])
    while time.monotonic() < deadline:
        t = time.monotonic_ns()
        rec.record(main, 200, t, t + 10)
        sent += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
    snap = rec.snapshot()
    say(sent=sent, handled=handled, routes=routes_of(snap), requests=snap.counters.requests)
elif role == "close-in-handler":  # SEGMENT_DIR: a SIGTERM-like handler closes the recorder mid-record
    import signal
    rec = recorder(args[0])
    main = rec.route_id("/main")
    raised = []
    def handler(signum, frame):
        try:
            rec.close()
        except BaseException as exc:
            raised.append(repr(exc))
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    sent, deadline = 0, time.monotonic() + 1
    escaped = []
    while time.monotonic() < deadline:
        t = time.monotonic_ns()
        try:
            rec.record(main, 200, t, t + 10)
        except BaseException as exc:
            escaped.append(repr(exc))
        sent += 1
    say(raised=raised, escaped=escaped, path=str(rec.path))
elif role == "slow-log":  # SEGMENT_DIR LOG_FILE HANDLER SECONDS: slow requests logged to a full disk
    class Counting(logging.FileHandler):
        attempts = 0
        def emit(self, record):
            Counting.attempts += 1
            super().emit(record)
    class Strict(Counting):  # as handlers that raise on failure do (logging.raiseExceptions, or their own)
        def handleError(self, record):
            raise
    handler = (Strict if args[2] == "strict" else Counting)(args[1])
    log = logging.getLogger("netprof.recorder")
    log.addHandler(handler)
    log.propagate = False
    rec = recorder(args[0], log_slow_requests=True, slow_request_threshold=0.001)
    route = rec.route_id("/slow")
    say(ready=True)
    sys.stdin.readline()  # the log's file system is full now
    sent = escaped = 0
    started = time.monotonic()
    while time.monotonic() - started < float(args[3]):
        t = time.monotonic_ns()
        try:
            rec.record(route, 200, t - 10**9, t)
        except BaseException as exc:
            escaped += 1
        sent += 1
    elapsed = time.monotonic() - started
    snap = rec.snapshot()
    say(sent=sent, escaped=escaped, attempts=Counting.attempts, elapsed=elapsed,
        requests=snap.counters.requests, internal_errors=snap.counters.internal_errors)
elif role == "fork-race":  # SEGMENT_DIR FORKS: forks while other threads are inside the recorder
    import signal, threading
    from netprof_core.hooks import InboundHook
    rec = recorder(args[0], max_routes=8)
    hook = InboundHook(None, rec, (), None)
    stop = threading.Event()
    def hammer(k):
        i = 0
        while not stop.is_set():
            i += 1
            route = hook.intern(f"/t{k}/{i}", "GET")
            t = time.monotonic_ns()
            rec.record(route, 200, t, t + 5)
    threads = [threading.Thread(target=hammer, args=(k,), daemon=True) for k in range(2)]
    for thread in threads:
        thread.start()
    codes = []
    for n in range(int(args[1])):
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)  # a child that hangs dies of SIGALRM
            route = hook.intern(f"/child/{n}", "GET")
            direct = rec.route_id(f"/child-direct/{n}")
            t = time.monotonic_ns()
            rec.record(route, 200, t, t + 5)
            rec.record(direct, 200, t, t + 5)
            os._exit(0 if rec.snapshot().counters.requests == 2 else 3)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    stop.set()
    say(codes=codes)
elif role == "fork-in-get-recorder":  # NETPROF_CONFIG set: fork while another thread makes the default recorder
    import signal, threading
    from netprof_core import hooks
    maker = threading.Thread(target=hooks.get_recorder)
    maker.start()
    while not hooks._default_lock.locked() and hooks._default is None:
        pass
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)
        rec = hooks.get_recorder()
        route = rec.route_id("/child")
        t = time.monotonic_ns()
        rec.record(route, 200, t, t + 5)
        os._exit(0 if rec.snapshot().counters.requests == 1 else 3)
    maker.join()
    say(child_returncode=os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
else:
    raise SystemExit(f"unknown role {role}")
"""


@dataclass
class Done:
    returncode: int
    said: list[dict[str, Any]]
    stderr: str

    def netprof_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if "netprof" in line]


def app_script(directory: Path) -> Path:
    script = directory / "trust_app_role.py"
    if not script.exists():
        script.write_text(APP, encoding="utf-8")
        script.chmod(0o644)
    return script


def parse(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


class AppProcess:
    """The application, started in its own process; :meth:`tell` writes a line to it."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: Path, **popen: Any) -> None:
        self.proc = subprocess.Popen(
            list(argv), env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, **popen,
        )  # fmt: skip
        self.said: list[dict[str, Any]] = []

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            done = self.finish()
            raise AssertionError(
                f"the app said nothing (returncode {done.returncode}):\n{done.stderr[-3000:]}"
            )
        self.said.append(json.loads(line))
        return self.said[-1]

    def tell(self, line: str = "go") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 120) -> Done:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"the app hung:\n{err[-3000:]}") from None
        return Done(self.proc.returncode, self.said + parse(out), err)


def start_app(implementation: str, cwd: Path, role: str, *args: object) -> AppProcess:
    argv = [sys.executable, str(app_script(cwd)), role, *map(str, args)]
    return AppProcess(argv, server_env(implementation), cwd)


def run_app(implementation: str, cwd: Path, role: str, *args: object) -> Done:
    return start_app(implementation, cwd, role, *args).finish()


# -- a small tmpfs -------------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs, unmounted after the test."""
    with mounted_tmpfs(tmp_path / "shm", "2m") as mount_point:
        yield mount_point


def fill(mount_point: Path) -> None:
    """Take every free block of the file system (as another process would)."""
    with open(mount_point / f"filler-{uuid.uuid4().hex[:6]}", "wb", buffering=0) as filler:
        for chunk in (2**16, 4096):
            try:
                while True:
                    filler.write(bytes(chunk))
            except OSError:
                pass
    assert os.statvfs(mount_point).f_bavail == 0


# -- item 1: a full tmpfs ------------------------------------------------------------------------------------


def test_a_recorder_made_in_a_full_tmpfs_profiles_in_private_memory(
    implementation: str, small_tmpfs: Path, tmp_path: Path
) -> None:
    """Old code: the segment is a sparse file; formatting it writes a page the
    tmpfs cannot back, and the process dies of SIGBUS (-7) inside Recorder()."""
    segment_dir = small_tmpfs / "netprof"
    segment_dir.mkdir()
    fill(small_tmpfs)

    done = run_app(implementation, tmp_path, "full", segment_dir)

    assert done.returncode == 0, f"returncode {done.returncode}:\n{done.stderr[-3000:]}"
    (said,) = done.said
    assert said["path"] is None
    assert (said["requests"], said["records"], said["routes"]) == (500, 500, {"/private": 500})
    assert said["internal_errors"] == 0
    (line,) = done.netprof_lines()
    assert str(segment_dir) in line and "No space left on device" in line and "private memory" in line
    assert list(segment_dir.iterdir()) == []  # nothing half made is left behind


def test_a_tmpfs_filled_after_the_segment_was_made_kills_nothing(
    implementation: str, small_tmpfs: Path, tmp_path: Path
) -> None:
    """The segment is made; another process fills the tmpfs; then traffic
    writes every page of the segment (25 routes' histograms, the ring many
    times over). Old code: killed by SIGBUS mid-traffic. The counts in the
    segment are exact."""
    segment_dir = small_tmpfs / "netprof"
    segment_dir.mkdir()
    templates = [f"/r{i}" for i in range(30)]  # 24 routes, and 6 more into the overflow route
    app = start_app(implementation, tmp_path, "filled-later", segment_dir, ",".join(templates))
    path = Path(app.read()["path"])
    fill(small_tmpfs)
    from netprof_core import SegmentControl

    with SegmentControl.open(path) as control:
        control.request_publish()  # the published area's pages are written too
    app.tell()
    done = app.finish()

    assert done.returncode == 0, (
        f"returncode {done.returncode} (SIGBUS: {SIGBUS_RETURNCODE}):\n{done.stderr[-3000:]}"
    )
    sent = done.said[-1]["sent"]
    per_route = sent["/r0"]
    snap = read_segment(path)
    assert snap.counters.requests == per_route * len(templates) == done.said[-1]["requests"]
    assert snap.counters.internal_errors == 0
    expected = {t: per_route for t in templates[:24]} | {L.OVERFLOW_TEMPLATE: per_route * 6}
    assert {r.key.template: r.count for r in snap.routes if r.count} == expected
    assert all(sum(r.histogram.counts) == r.count for r in snap.routes)
    assert len(snap.records) == 4000
    assert snap.header.closed


def test_a_child_forked_when_the_tmpfs_is_full_lives(
    implementation: str, small_tmpfs: Path, tmp_path: Path
) -> None:
    """As a gunicorn worker is forked: the parent's segment was made, the
    tmpfs is full when the child makes its own. Old code: the child dies of
    SIGBUS in the fork hook."""
    segment_dir = small_tmpfs / "netprof"
    segment_dir.mkdir()
    app = start_app(implementation, tmp_path, "fork", segment_dir)
    parent_path = app.read()["path"]
    fill(small_tmpfs)
    app.tell()
    done = app.finish()

    assert done.returncode == 0, done.stderr[-3000:]
    child = next(said for said in done.said if "child" in said)
    assert [said["child_returncode"] for said in done.said if "child_returncode" in said] == [0]
    assert child["path"] is None and child["routes"] == {"/child": 300}
    (line,) = done.netprof_lines()
    assert str(segment_dir) in line and "No space left on device" in line and "private memory" in line
    assert done.said[-1]["parent_routes"] == {"/parent": 1}
    assert read_segment(parent_path).counters.requests == 1


# -- item 4: route names come from templates -----------------------------------------------------------------

MOUNT_APP = """
import contextlib
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from netprof_core.asgi import NetProfMiddleware
from tests.apps.common import note_event

async def orders(request):
    return PlainTextResponse("orders of " + request.path_params["uid"])

async def member(request):
    return PlainTextResponse("member")

async def files(scope, receive, send):  # a plain ASGI app under a mount
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"file"})

@contextlib.asynccontextmanager
async def lifespan(app):
    note_event("startup")
    yield

teams = Starlette(routes=[Mount("/teams/{team}", routes=[Route("/members/{member:int}", member)])])
app = NetProfMiddleware(Starlette(
    routes=[
        Mount("/users/{uid}", routes=[Route("/orders", orders)]),
        Mount("/files/{owner}", app=files),
        Mount("/v1", app=teams),
    ],
    lifespan=lifespan,
))
"""

# What a client may put in a path: escape sequences, formulas, markup.
HOSTILE = [
    "\x1b[2J\x1b]0;pwned\x07",
    "=cmd|'-C calc'!A0",
    "+1+1",
    "-2",
    "@SUM(A1)",
    "<img src=x onerror=alert(1)>",
    "\r\n",
]


def test_route_names_under_a_mount_come_from_templates_only(implementation: str, tmp_path: Path) -> None:
    """uvicorn serving a Starlette app with Mount("/users/{uid}", ...): 50
    distinct uids, some hostile, are one route, named by the templates. Old
    code: 50 route names built from the decoded path (24 in the table, the
    rest in the overflow route), escape sequences and formulas included."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "trust_mount_app.py").write_text(MOUNT_APP, encoding="utf-8")
    uids = HOSTILE + [f"user{i}" for i in range(50 - len(HOSTILE))]

    def drive(base_url: str) -> list[int]:
        statuses = []
        with httpx.Client(base_url=base_url, timeout=10) as client:
            for uid in uids:
                statuses.append(client.get(f"/users/{quote(uid, safe='')}/orders").status_code)
            for i in range(10):
                statuses.append(
                    client.get(f"/files/{quote(HOSTILE[i % len(HOSTILE)], safe='')}{i}/a/b").status_code
                )
                statuses.append(client.get(f"/v1/teams/t{i}/members/{i}").status_code)
        return statuses

    run = serve_and_drive(
        lambda port: uvicorn_argv("trust_mount_app:app", port, "--app-dir", str(app_dir)),
        tmp_path / "run",
        implementation=implementation,
        drive=drive,
    )
    assert set(run.result) == {200}, run.log[-3000:]
    assert run.counts() == {
        ("GET", "/users/{uid}/orders"): 50,
        ("GET", "/files/{owner}/{path}"): 10,
        ("GET", "/v1/teams/{team}/members/{member}"): 10,
    }


# -- item 2: the segment directory, as an app finds it ------------------------------------------------------

# The users run the compiled core too: the interpreter they get must import it.
CORES_AS_USER = "netprof_core._recorder_c, netprof_core.segment"


@dataclass(frozen=True)
class Host:
    group: Group  # the users' group: its gid, an interpreter they may run, a directory they may all look in
    app: User  # the application's user
    neighbour: User  # another user of the host, in the group
    daemon: User  # netprofd's user (named as segment_dir_owner)


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with made_group("nt", ("a", "n", "d"), shared_in="/tmp", imports=CORES_AS_USER) as group:
        app_script(group.shared)
        yield Host(group, *group.members)


def run_as(host: Host, user: User, implementation: str, role: str, *args: object) -> Done:
    argv = [host.group.python, str(app_script(host.group.shared)), role, *map(str, args)]
    return AppProcess(argv, **host.group.as_member(user, implementation)).finish(60)


@pytest.fixture
def place(host: Host) -> Iterator[Path]:
    """A fresh directory for this test's segment directory (root's, 0755)."""
    path = Path(tempfile.mkdtemp(prefix="place-", dir=host.group.shared))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def documented_dir(path: Path, host: Host) -> Path:
    """As the deployment guide makes it: netprofd's user's, group netprof, mode 3770."""
    path.mkdir()
    os.chown(path, host.daemon.uid, host.group.gid)
    path.chmod(0o3770)
    return path


def as_neighbour_made(path: Path, host: Host, how: str) -> tuple[Path, str]:
    """The segment directory at ``path`` as another user left it; what an app must say about it."""
    if how == "mode 0777":
        path.mkdir()
        os.chown(path, host.neighbour.uid, host.neighbour.gid)
        path.chmod(0o777)
        return path, "is writable by every user (mode 0777)"
    if how == "a symlink":
        target = path.parent / "neighbours-own"
        target.mkdir()
        os.chown(target, host.neighbour.uid, host.neighbour.gid)
        target.chmod(0o777)
        path.symlink_to(target)
        os.lchown(path, host.neighbour.uid, host.neighbour.gid)
        return path, f"is a symbolic link, owned by uid {host.neighbour.uid} ({host.neighbour.name})"
    path.mkdir()
    os.chown(path, host.neighbour.uid, host.group.gid)
    path.chmod(0o3770)
    return path, f"is owned by uid {host.neighbour.uid} ({host.neighbour.name}), not by root"


@pytest.mark.parametrize("how", ["mode 0777", "a symlink", "owned by a neighbour"])
def test_an_app_refuses_a_segment_directory_someone_else_made(
    host: Host, place: Path, implementation: str, how: str
) -> None:
    """Old code: the app writes its segment into it without a word (where the
    neighbour may swap, remove or plant segments)."""
    segment_dir, reason = as_neighbour_made(place / "netprof", host, how)

    done = run_as(host, host.app, implementation, "app", segment_dir, host.daemon.name)

    assert done.returncode == 0, done.stderr
    (said,) = done.said
    assert said["path"] is None and said["requests"] == 5  # profiling, in private memory
    (line,) = done.netprof_lines()
    assert f"segment directory {segment_dir} {reason}" in line, line
    assert "private memory" in line and "3770" in line
    assert not [p for p in segment_dir.resolve().iterdir() if p.owner() == host.app.name]


@pytest.mark.parametrize("how", ["mode 0777", "a symlink", "owned by a neighbour"])
def test_without_graceful_degradation_the_refusal_is_an_error_naming_the_directory(
    host: Host, place: Path, implementation: str, how: str
) -> None:
    segment_dir, reason = as_neighbour_made(place / "netprof", host, how)
    done = run_as(host, host.app, implementation, "app", segment_dir, host.daemon.name, "strict")
    (said,) = done.said
    assert said["error"].startswith("UnsafeSegmentDirectory: ") and f"{segment_dir} {reason}" in said["error"]


@pytest.mark.parametrize("owner", ["name", "uid"])
def test_the_documented_directory_is_used(host: Host, place: Path, implementation: str, owner: str) -> None:
    """netprofd's user's, group netprof, 3770, named by segment_dir_owner
    (its name, or its uid): the app's segment is made there, the app's, in
    the group (setgid), 0640."""
    segment_dir = documented_dir(place / "netprof", host)
    named = host.daemon.name if owner == "name" else str(host.daemon.uid)

    done = run_as(host, host.app, implementation, "app", segment_dir, named)

    assert done.returncode == 0 and done.netprof_lines() == [], done.stderr
    (said,) = done.said
    path = Path(said["path"])
    assert path.parent == segment_dir
    info = path.lstat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (host.app.uid, host.group.gid, 0o640)
    assert read_segment(path).counters.requests == 5


def test_a_directory_of_a_user_not_named_as_its_owner_is_refused(
    host: Host, place: Path, implementation: str
) -> None:
    """The same directory, with segment_dir_owner naming no user of this host."""
    segment_dir = documented_dir(place / "netprof", host)
    done = run_as(host, host.app, implementation, "app", segment_dir, f"nosuch{uuid.uuid4().hex[:6]}")
    (said,) = done.said
    assert said["path"] is None
    (line,) = done.netprof_lines()
    assert f"is owned by uid {host.daemon.uid} ({host.daemon.name})" in line


def test_a_directory_the_app_makes_is_its_own_and_0750(host: Host, place: Path, implementation: str) -> None:
    segment_dir = place / "made-by-the-app"
    place.chmod(0o777)
    done = run_as(host, host.app, implementation, "app", segment_dir, host.daemon.name)
    (said,) = done.said
    assert Path(said["path"]).parent == segment_dir
    info = segment_dir.lstat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (host.app.uid, 0o750)


def test_clean_up_removes_only_the_apps_own_regular_files(
    host: Host, place: Path, implementation: str
) -> None:
    """In a group-writable directory without the sticky bit (the old
    documented 2770), an app's clean-up of ended segments leaves a
    neighbour's ended segment alone, and a symlink named like a segment too.
    Old code: both removed."""
    segment_dir = place / "netprof"
    segment_dir.mkdir()
    os.chown(segment_dir, 0, host.group.gid)
    segment_dir.chmod(0o2770)
    theirs = Path(run_as(host, host.neighbour, implementation, "ended", segment_dir).said[0]["path"])
    elsewhere = place / "apps-own"
    elsewhere.mkdir()
    os.chown(elsewhere, host.app.uid, host.app.gid)
    target = Path(run_as(host, host.app, implementation, "ended", elsewhere).said[0]["path"])
    link = segment_dir / "link.npseg"
    link.symlink_to(target)
    mine = Path(run_as(host, host.app, implementation, "ended", segment_dir).said[0]["path"])

    done = run_as(host, host.app, implementation, "stale", segment_dir)

    assert done.said[0]["removed"] == [str(mine)]
    assert theirs.exists() and link.is_symlink() and target.exists() and not mine.exists()


# -- item 3: other ways netprof could hurt the application ----------------------------------------------------


def test_a_signal_handler_that_records_while_the_app_records_neither_hangs_nor_loses_a_count(
    implementation: str, tmp_path: Path
) -> None:
    """A SIGALRM handler (every 0.5 ms) records while the main code is inside
    record(). Old code, pure-Python core: the handler waits for the lock its
    own thread holds, forever (a deadlock; here, more signals nest until a
    RecursionError). Every request is counted, on its own route."""
    segment_dir = tmp_path / "segments"
    done = start_app(implementation, tmp_path, "signals", segment_dir, 2).finish(timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    (said,) = done.said
    assert said["handled"] > 100
    assert said["routes"] == {"/main": said["sent"], "/handler": said["handled"]}
    assert said["requests"] == said["sent"] + said["handled"]


@pytest.mark.parametrize("handler", ["file", "strict"])
def test_slow_request_logging_to_a_full_disk_never_reaches_the_request(
    implementation: str, small_tmpfs: Path, tmp_path: Path, handler: str
) -> None:
    """Slow requests are logged to a file on a full file system for 2.5 s.
    The handler fails each time (ENOSPC); one that raises on failure
    ("strict") raised out of record() into the application in old code.
    Logging stays within its rate (one line a second)."""
    app = start_app(
        implementation, tmp_path, "slow-log", tmp_path / "segments", small_tmpfs / "app.log", handler, 2.5
    )
    app.read()
    fill(small_tmpfs)
    app.tell()
    done = app.finish()

    assert done.returncode == 0, done.stderr[-3000:]
    said = done.said[-1]
    assert said["escaped"] == 0
    assert said["requests"] == said["sent"] and said["internal_errors"] == 0
    assert 1 <= said["attempts"] <= said["elapsed"] + 1
    assert done.stderr.count("--- Logging error ---") <= said["attempts"]


def test_forks_while_other_threads_are_inside_the_recorder_leave_children_that_record(
    implementation: str, tmp_path: Path
) -> None:
    """100 forks while two threads intern routes and record (the recorder's
    locks, and the old hook's route-cache lock, taken all the time): every
    child interns and records at once (a child that hangs is killed by its
    alarm). Old code: about one fork in a thousand lands while the hook's
    lock is held, and that child hangs; the hook now takes no lock."""
    done = start_app(implementation, tmp_path, "fork-race", tmp_path / "segments", 100).finish(timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.said[0]["codes"] == [0] * 100


def test_a_fork_while_another_thread_makes_the_default_recorder_leaves_a_child_that_records(
    implementation: str, tmp_path: Path
) -> None:
    """The fork lands while another thread holds get_recorder()'s lock. Old
    code: the child waits on that lock forever (its holder does not exist
    there; killed by its alarm here)."""
    segment_dir = tmp_path / "segments"
    config = tmp_path / "netprof.toml"
    # A big segment: making it takes long enough for the fork to land inside.
    config.write_text(
        f'[network_profiling]\nsegment_dir = "{segment_dir}"\napp_name = "forked"\n'
        "max_stored_requests = 200000\nmax_memory_mb = 64\nlog_slow_requests = false\n",
        encoding="utf-8",
    )
    argv = [sys.executable, str(app_script(tmp_path)), "fork-in-get-recorder"]
    env = server_env(implementation, config=config)
    done = AppProcess(argv, env, tmp_path).finish(timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.said[0]["child_returncode"] == 0


# Content-Length values a client (or a server, for an outbound request) may send.
HOSTILE_LENGTHS = [
    "9" * 5000,  # int() refuses more than 4300 digits (ValueError)
    "1" + "0" * 25,  # beyond 2**64
    str(2**64),  # one more than a counter holds
    "\u0663\u0664",  # Arabic-Indic digits: str.isdigit(), not HTTP
    "-5",
    "0" * 5000 + "7",  # a valid 7, padded
    str(2**63),  # valid: beyond a C int64, within a counter
]
VALID_LENGTHS = 7 + 2**63  # the bytes in the hostile lengths count


def raw_request(base_url: str, path: str, content_length: str) -> int:
    """One request over a socket of its own, with this Content-Length and no
    body (the routes used do not read one); the response's status."""
    import socket

    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        header = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        sock.sendall(header.encode() + b"Content-Length: " + content_length.encode("utf-8") + b"\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize(("target", "path", "template"), [
    ("tests.apps.flask_app:app", "/users/u/orders/1", "/users/<user>/orders/<int:order_id>"),
    ("tests.apps.django_app:application", "/users/u/orders/1", "/users/<str:user>/orders/<int:order_id>"),
], ids=["wsgi-flask", "django"])  # fmt: skip
def test_a_hostile_content_length_is_not_an_internal_error(
    implementation: str, tmp_path: Path, target: str, path: str, template: str
) -> None:
    """Real wsgiref servers (the WSGI middleware on Flask; Django's
    middleware): each hostile Content-Length is a request with no bytes
    counted in, not an internal error. Old code: 5000 digits and values past
    2**63 were internal errors, and four in a row auto-disabled profiling."""
    from tests.apps.servers import wsgiref_argv

    run = serve_and_drive(
        lambda port: wsgiref_argv(target, port),
        tmp_path,
        implementation=implementation,
        drive=lambda base_url: [raw_request(base_url, path, value) for value in HOSTILE_LENGTHS],
    )
    assert set(run.result) == {200}, run.log[-3000:]
    (snap,) = run.snapshots
    assert (snap.counters.internal_errors, snap.counters.auto_disable_events) == (0, 0), run.log[-3000:]
    (route,) = [r for r in snap.routes if r.count]
    assert (route.key.template, route.count, route.bytes_in) == (
        template,
        len(HOSTILE_LENGTHS),
        VALID_LENGTHS,
    )


def hostile_server(lengths: Sequence[str]) -> Iterator[str]:
    """A server that answers each connection with the next Content-Length of
    ``lengths`` (and a two-byte body); its base URL."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for value in lengths:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: "
                    + value.encode()
                    + b"\r\nConnection: close\r\n\r\nok"
                )
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    thread.join(10)


def test_a_server_answering_a_hostile_content_length_is_not_an_internal_error(make_recorder) -> None:
    """requests through an instrumented session, to a real server that sends
    hostile Content-Lengths (http.client leaves them in the headers)."""
    import requests

    from netprof_core.clients import instrument_requests_session

    recorder = make_recorder()
    session = instrument_requests_session(requests.Session(), recorder)
    for base_url in hostile_server(HOSTILE_LENGTHS):
        for _ in HOSTILE_LENGTHS:
            try:
                session.get(base_url + "/", timeout=10, stream=True).close()
            except requests.RequestException:
                pass  # the client's own verdict on the response: not netprof's business
    snap = recorder.snapshot()
    assert (snap.counters.internal_errors, snap.counters.auto_disable_events) == (0, 0)
    (route,) = [r for r in snap.routes if r.count]
    assert route.count == len(HOSTILE_LENGTHS) and route.bytes_in == VALID_LENGTHS


def test_an_httpx_response_with_a_hostile_content_length_is_not_an_internal_error(make_recorder) -> None:
    """httpx's WSGI transport hands a response's headers over as the app set them."""
    from netprof_core.clients import instrument_httpx_client

    sent = [value for value in HOSTILE_LENGTHS if value.isascii()]  # httpx refuses others itself
    lengths = iter(sent)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Length", next(lengths))])
        return [b"ok"]

    recorder = make_recorder()
    with instrument_httpx_client(httpx.Client(transport=httpx.WSGITransport(app=app)), recorder) as client:
        for _ in sent:
            client.get("http://app.test/")
    snap = recorder.snapshot()
    assert (snap.counters.internal_errors, snap.counters.auto_disable_events) == (0, 0)
    (route,) = [r for r in snap.routes if r.count]
    assert route.count == len(sent) and route.bytes_in == VALID_LENGTHS


FLASK_BLUEPRINT_APP = """
from flask import Blueprint, Flask
from netprof_core.wsgi import NetProfMiddleware
from tests.apps.common import note_event

users = Blueprint("users", __name__, url_prefix="/users/<uid>")

@users.route("/orders")
def orders(uid):
    return "orders of " + uid

flask_app = Flask(__name__)
flask_app.register_blueprint(users)
app = NetProfMiddleware(flask_app)
note_event("startup")
"""

DJANGO_INCLUDE_APP = """
import django
from django.conf import settings
from django.http import HttpResponse
from django.urls import include, path

settings.configure(
    DEBUG=False, SECRET_KEY="netprof-tests-only", ALLOWED_HOSTS=["127.0.0.1"], ROOT_URLCONF=__name__,
    MIDDLEWARE=["netprof_core.django.NetProfMiddleware"], INSTALLED_APPS=[], DATABASES={}, LOGGING_CONFIG=None,
)
django.setup()

def orders(request, uid):
    return HttpResponse("orders of " + uid)

urlpatterns = [path("users/<str:uid>/", include([path("orders", orders)]))]

from django.core.wsgi import get_wsgi_application
from tests.apps.common import note_event

application = get_wsgi_application()
note_event("startup")
"""


@pytest.mark.parametrize(
    ("source", "template"),
    [(FLASK_BLUEPRINT_APP, "/users/<uid>/orders"), (DJANGO_INCLUDE_APP, "/users/<str:uid>/orders")],
    ids=["flask-blueprint-prefix", "django-include"],
)
def test_wsgi_route_names_under_prefixes_come_from_templates_only(
    implementation: str, tmp_path: Path, source: str, template: str
) -> None:
    """A Flask blueprint whose url_prefix has a variable, a Django include()
    with a converter: 30 distinct uids (some hostile), one route."""
    from tests.apps.servers import wsgiref_argv

    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "trust_prefix_app.py").write_text(source, encoding="utf-8")
    uids = HOSTILE + [f"user{i}" for i in range(30 - len(HOSTILE))]

    def drive(base_url: str) -> list[int]:
        with httpx.Client(base_url=base_url, timeout=10) as client:
            return [client.get(f"/users/{quote(uid, safe='')}/orders").status_code for uid in uids]

    target = "trust_prefix_app:" + ("app" if source is FLASK_BLUEPRINT_APP else "application")
    run = serve_and_drive(
        lambda port: wsgiref_argv(target, port),
        tmp_path / "run",
        implementation=implementation,
        drive=drive,
        extra_env={"PYTHONPATH": f"{ROOT}{os.pathsep}{app_dir}"},
    )
    assert set(run.result) == {200}, run.log[-3000:]
    assert run.counts() == {("GET", template): 30}


class Opaque(Exception):
    """An application's exception that cannot be looked at: asking it for an
    attribute it lacks raises (a lazy proxy's, say)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)  # (what Python and pytest ask of every exception)
        raise RuntimeError(f"no {name} here")


def test_an_asgi_apps_exception_that_cannot_be_looked_at_goes_on_unchanged(make_recorder) -> None:
    """Old code: netprof's look at the exception (is it a disconnect?) raised;
    the pure-Python core's await wrapper then replaced the application's
    exception by that error, the Cython one dropped the request."""
    import asyncio

    from netprof_core.asgi import NetProfMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise Opaque()

    recorder = make_recorder()
    middleware = NetProfMiddleware(app, recorder=recorder)
    scope = {"type": "http", "method": "GET", "path": "/x", "raw_path": b"/x", "root_path": "",
             "query_string": b"", "headers": [], "asgi": {"version": "3.0"}}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    with pytest.raises(Opaque):
        asyncio.run(middleware(scope, receive, send))
    snap = recorder.snapshot()
    assert (snap.counters.requests, snap.counters.internal_errors) == (1, 0)
    (record,) = snap.records
    assert record.error_kind == L.ErrorKind.EXCEPTION


def test_an_outbound_failure_that_cannot_be_looked_at_is_the_requests_not_netprofs(make_recorder) -> None:
    """A transport raising such an exception: recorded as an EXCEPTION, not
    an internal error of netprof's (four in a row auto-disable profiling)."""
    from netprof_core.clients import instrument_httpx_client

    def handler(request: httpx.Request) -> httpx.Response:
        raise Opaque()

    recorder = make_recorder()
    with instrument_httpx_client(httpx.Client(transport=httpx.MockTransport(handler)), recorder) as client:
        for _ in range(5):
            with pytest.raises(Opaque):
                client.get("http://upstream.test/")
    snap = recorder.snapshot()
    assert (snap.counters.requests, snap.counters.internal_errors, snap.counters.auto_disable_events) == (
        5,
        0,
        0,
    )
    assert {record.error_kind for record in snap.records} == {L.ErrorKind.EXCEPTION}


def test_closing_the_recorder_in_a_signal_handler_mid_record_raises_nothing(
    implementation: str, tmp_path: Path
) -> None:
    """A shutdown handler closes the recorder while the main code is inside
    record(). Old code, pure-Python core: a deadlock (the handler waits for
    the lock its own thread holds)."""
    done = start_app(implementation, tmp_path, "close-in-handler", tmp_path / "segments").finish(timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    (said,) = done.said
    assert (said["raised"], said["escaped"]) == ([], [])
    snap = read_segment(said["path"])
    assert snap.header.closed
