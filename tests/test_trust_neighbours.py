"""Neighbours on the same host (issue 15, docs/SECURITY.md): what a member of
the segments' group, or another local user, can do to another app's figures,
to its profiling and to netprofd.

Real netprofd processes, real unprivileged users (made with useradd for this
module, removed after), real apps writing real segments as those users. The
daemon runs as root here (the tests' user), reading a segment directory owned
by root, group G, mode 3770, as the deployment guide makes it (with netprofd
for root). Root only: the tests are skipped otherwise.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netprof_core import read_segment
from netprof_core._layout import DAEMON_LOCK_NAME
from netprof_daemon.identity import WriterIdentity
from tests.apps.hostusers import Group, User, made_group, user_env
from tests.apps.netprofd import Netprofd, daemon_env, netprofd, netprofd_argv, write_daemon_config
from tests.apps.servers import ROOT, free_port

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: makes users, groups and their processes"),
    pytest.mark.any_core,  # (who may write which segment is the daemon's question, not the core's)
]

APP = "shop"
OWN_REQUESTS = 50  # what the real app records as it starts
FORGED_ERRORS = 200_000
SETTLE_SECONDS = 3.0  # 15 ticks: long enough for any rule to fire on what was counted

DISABLE_ON_ERRORS = f"""
[[rules]]
name = "ShopErrorsDisable"
metric = "error_rate_percent"
op = ">"
threshold = 5.0
window = "1m"
app = "{APP}"
action = "disable"
"""

# One script for every role a user plays; its first line of output is JSON.
ROLE = r"""
import fcntl, json, os, struct, sys, time
from netprof_core import ProfilingConfig, Recorder
from netprof_core import _layout as L

def say(**what):
    print(json.dumps(what), flush=True)

def recorder(segment_dir, app):
    return Recorder(ProfilingConfig(segment_dir=segment_dir, app_name=app, max_stored_requests=64))

def record(rec, count, status):
    route = rec.route_id("/a")
    for _ in range(count):
        t = time.monotonic_ns()
        rec.record(route, status, t, t + 1000)

role, args = sys.argv[1], sys.argv[2:]
keep = []
if role == "app":  # a real app: SEGMENT_DIR APP REQUESTS [STATUS]
    rec = recorder(args[0], args[1])
    record(rec, int(args[2]), int(args[3]) if len(args) > 3 else 200)
    keep.append(rec)
    say(path=str(rec.path), pid=os.getpid(), ticks=rec.header.start_ticks, uid=os.getuid())
elif role == "forge":  # STAGE SEGMENT_DIR APP PID TICKS ERRORS ENDED: a segment that claims someone else
    stage, segment_dir, app, pid, ticks, errors, ended = args
    rec = recorder(stage, app)
    record(rec, int(errors), 500)
    if ended == "ended":
        rec.close()
    fd = os.open(rec.path, os.O_RDWR)
    if int(pid):
        os.pwrite(fd, struct.pack("<Q", int(pid)), L.HEADER_OFFSETS["pid"])
        os.pwrite(fd, struct.pack("<Q", int(ticks)), L.HEADER_OFFSETS["start_ticks"])
    os.close(fd)
    dest = os.path.join(segment_dir, f"{app}-{pid or os.getpid()}-{ticks or 0}-99.npseg")
    os.rename(rec.path, dest)  # whole, under its final name: never seen half made
    keep.append(rec)  # alive, holding the segment's lock (unless ended)
    say(path=dest, pid=os.getpid())
elif role == "lock":  # PATH (made if missing): hold every lock a reader of the file may take
    fd = os.open(args[0], os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    say(locked=True, pid=os.getpid())
elif role == "unlink":  # PATH
    try:
        os.unlink(args[0])
        say(errno=0)
    except OSError as exc:
        say(errno=exc.errno)
elif role == "open":  # PATH
    try:
        os.close(os.open(args[0], os.O_RDONLY))
        say(errno=0)
    except OSError as exc:
        say(errno=exc.errno)
elif role == "symlink":  # TARGET LINK
    os.symlink(args[0], args[1])
    say(done=True)
elif role == "stale":  # SEGMENT_DIR: an ended process's segment, closed long ago; then the app's cleanup
    from netprof_core.segment import daemon_running, remove_stale_segments
    rec = recorder(args[0], "gone")
    rec.close()
    with open(rec.path, "r+b") as f:
        f.seek(L.CLOSED_NS_OFFSET)
        f.write((10**18).to_bytes(8, "little"))
    running = daemon_running(args[0])
    removed = remove_stale_segments(args[0], older_than=0)
    say(running=running, removed=[str(p) for p in removed], exists=rec.path.exists())
elif role == "running":  # SEGMENT_DIR
    from netprof_core.segment import daemon_running
    say(running=daemon_running(args[0]))
for line in sys.stdin:  # then wait, holding what it made, until told to stop (or stdin closes)
    if line.strip() == "quit":
        break
"""


# -- users, groups, their processes ------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    group: Group  # A's and B's group: its gid, an interpreter they may run, a directory on /dev/shm
    a: User  # the real app's user
    b: User  # a neighbour in the same group
    script: Path  # ROLE, in the shared directory


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with made_group("np", ("a", "b"), shared_in="/dev/shm") as group:
        script = group.shared / "role.py"
        script.write_text(ROLE, encoding="utf-8")
        script.chmod(0o644)
        a, b = group.members
        yield Host(group, a, b, script)


class UserProcess:
    """One process of a user, running a role of ROLE; ``info`` is what it said."""

    def __init__(self, host: Host, user: User, role: str, *args: object) -> None:
        self.proc = subprocess.Popen(
            [host.group.python, str(host.script), role, *map(str, args)], **host.group.as_member(user),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise AssertionError(
                f"{role} as {user.name} failed: {self.proc.stderr.read() if self.proc.stderr else ''}"
            )
        self.info: dict[str, Any] = json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def processes() -> Iterator[list[UserProcess]]:
    started: list[UserProcess] = []
    yield started
    for process in started:
        process.stop()


def run_as(host: Host, user: User, role: str, *args: object) -> dict[str, Any]:
    process = UserProcess(host, user, role, *args)
    process.stop()
    return process.info


@pytest.fixture
def segment_dir(host: Host) -> Iterator[Path]:
    """The documented directory: root's (netprofd's here), group G, mode 3770."""
    path = Path(tempfile.mkdtemp(prefix="segments-", dir=host.group.shared))
    os.chown(path, 0, host.group.gid)
    path.chmod(0o3770)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stage(host: Host) -> Iterator[Path]:
    """B's own directory on the same file system, where it prepares a forgery."""
    path = Path(tempfile.mkdtemp(prefix="stage-", dir=host.group.shared))
    os.chown(path, host.b.uid, host.b.gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- what the daemon shows -------------------------------------------------------------------------------


def metric(d: Netprofd, name: str, **labels: str) -> float:
    response = d.get("/metrics")
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def refused_for_identity(d: Netprofd) -> float:
    return metric(d, "netprofd_segment_errors_total", reason="identity")


def auto_disabled(path: str) -> bool:
    return bool(read_segment(path).control.auto_disabled)


def app_view(d: Netprofd, app: str = APP) -> dict[str, Any]:
    response = d.get("/api/v1/debug/network-profiling/production-metrics", app=app)
    if response.status_code == 404:
        return {}  # not known (yet)
    assert response.status_code == 200, response.text
    apps = response.json()["applications"]
    return apps[0] if apps else {}


def lines_naming(log: str, *words: str) -> list[str]:
    return [line for line in log.splitlines() if all(word in line for word in words)]


def start_shop(host: Host, segment_dir: Path, d: Netprofd, processes: list[UserProcess]) -> UserProcess:
    """A's real app, seen (and so verified) by the daemon."""
    shop = UserProcess(host, host.a, "app", segment_dir, APP, OWN_REQUESTS)
    processes.append(shop)
    d.wait_until(lambda: app_view(d).get("requests") == OWN_REQUESTS, what="the daemon counting the real app")
    return shop


def settle(d: Netprofd, done: Any, what: str) -> None:
    """Wait for ``done`` (whichever outcome comes first), then long enough for rules to act on it."""
    d.wait_until(done, timeout=20, what=what)
    time.sleep(SETTLE_SECONDS)


# -- (a) a forged segment ---------------------------------------------------------------------------------


def test_a_forged_segment_cannot_speak_for_another_app(
    host: Host, segment_dir: Path, stage: Path, tmp_path: Path, processes: list[UserProcess]
) -> None:
    """B (in the group) writes a segment claiming A's app name, pid and start
    time, with 200,000 errors, alive (its lock held). Old code: counted as A's,
    the disable rule fires and A's real profiling is auto-disabled."""
    with netprofd(tmp_path, segment_dir, extra=DISABLE_ON_ERRORS) as d:
        shop = start_shop(host, segment_dir, d, processes)
        real = shop.info
        forger = UserProcess(
            host, host.b, "forge", stage, segment_dir, APP, real["pid"], real["ticks"], FORGED_ERRORS, "live"
        )
        processes.append(forger)
        forged = forger.info["path"]
        settle(
            d,
            lambda: auto_disabled(real["path"]) or refused_for_identity(d) >= 1,
            "the forged segment to be refused or to disable the app",
        )

        assert not auto_disabled(real["path"]), "A's profiling was auto-disabled because of B's data"
        assert refused_for_identity(d) == 1
        view = app_view(d)
        assert view["requests"] == OWN_REQUESTS == read_segment(real["path"]).counters.requests
        assert view["process_count"] == 1 and view["auto_disabled_processes"] == 0
        assert d.get("/api/v1/debug/network-profiling/alerts").json()["active"] == []
        said = lines_naming(d.log(), forged)
        assert len(said) == 1, said  # logged once, with its reason and both users
        assert (
            "forged identity" in said[0] and f"uid {host.b.uid}" in said[0] and f"uid {host.a.uid}" in said[0]
        )


def test_an_ended_forgery_is_not_folded_into_the_apps_totals(
    host: Host, segment_dir: Path, stage: Path, tmp_path: Path, processes: list[UserProcess]
) -> None:
    """The same forgery, closed (its writer gone: nothing in /proc to check it
    against). Old code: folded into A's retired totals, for good."""
    with netprofd(tmp_path, segment_dir, extra=DISABLE_ON_ERRORS) as d:
        shop = start_shop(host, segment_dir, d, processes)
        real = shop.info
        forger = UserProcess(
            host, host.b, "forge", stage, segment_dir, APP, real["pid"], real["ticks"], 5000, "ended"
        )
        processes.append(forger)
        settle(
            d,
            lambda: app_view(d).get("requests", 0) > OWN_REQUESTS or refused_for_identity(d) >= 1,
            "the forgery",
        )

        assert app_view(d).get("requests") == OWN_REQUESTS
        assert not auto_disabled(real["path"])
        assert refused_for_identity(d) == 1
        said = lines_naming(d.log(), forger.info["path"])
        assert len(said) == 1 and "unverifiable identity" in said[0], said
        assert Path(
            forger.info["path"]
        ).exists()  # not counted, and not removed either: its owner's to remove


def test_another_user_cannot_take_a_bound_app_name(
    host: Host, segment_dir: Path, stage: Path, tmp_path: Path, processes: list[UserProcess]
) -> None:
    """B's own live process, honest about its pid, names itself "shop": the
    kernel confirms it is B's, but "shop" is bound to A's uid. Old code: B's
    errors counted as shop's, and shop auto-disabled."""
    with netprofd(tmp_path, segment_dir, extra=DISABLE_ON_ERRORS) as d:
        shop = start_shop(host, segment_dir, d, processes)
        impostor = UserProcess(host, host.b, "forge", stage, segment_dir, APP, 0, 0, 5000, "live")
        processes.append(impostor)
        settle(
            d,
            lambda: auto_disabled(shop.info["path"]) or refused_for_identity(d) >= 1,
            "the impostor to be refused or to disable the app",
        )

        assert not auto_disabled(shop.info["path"])
        assert app_view(d).get("requests") == OWN_REQUESTS
        said = lines_naming(d.log(), impostor.info["path"])
        assert len(said) == 1 and "app name taken" in said[0], said
        assert f"uid {host.a.uid}" in said[0] and f"uid {host.b.uid}" in said[0]
        bindings = json.loads((tmp_path / "netprofd-state" / "app_writers.json").read_text())
        assert bindings["apps"][APP] == [host.a.uid]


def test_a_symlink_to_an_apps_segment_is_not_counted_twice(
    host: Host, segment_dir: Path, tmp_path: Path, processes: list[UserProcess]
) -> None:
    """B links a name of its own to A's real segment (fs.protected_symlinks
    does not cover a directory that is not world-writable). Old code: A's
    requests counted twice."""
    with netprofd(tmp_path, segment_dir) as d:
        shop = start_shop(host, segment_dir, d, processes)
        link = segment_dir / f"{APP}-1-1-7.npseg"
        run_as(host, host.b, "symlink", shop.info["path"], link)
        settle(
            d,
            # (the reader refuses to follow it: refused as a file that cannot be opened)
            lambda: app_view(d).get("requests", 0) > OWN_REQUESTS
            or metric(d, "netprofd_segment_errors_total", reason="refused") >= 1,
            "the link",
        )

        assert app_view(d).get("requests") == OWN_REQUESTS
        assert app_view(d)["process_count"] == 1
        said = lines_naming(d.log(), str(link))
        assert len(said) == 1 and "symbolic link" in said[0], said


def test_the_apps_own_errors_still_auto_disable_it(
    host: Host, segment_dir: Path, tmp_path: Path, processes: list[UserProcess]
) -> None:
    """What the checks must not stop: A's verified process, failing, is
    auto-disabled by the rule (and a forged segment beside it is not
    what does it)."""
    with netprofd(tmp_path, segment_dir, extra=DISABLE_ON_ERRORS) as d:
        start_shop(host, segment_dir, d, processes)
        failing = UserProcess(host, host.a, "app", segment_dir, APP, 500, 500)
        processes.append(failing)
        d.wait_until(lambda: auto_disabled(failing.info["path"]), timeout=20, what="the rule to disable A")
        assert refused_for_identity(d) == 0


def test_a_writer_in_another_pid_namespace_is_taken_only_for_a_bound_user(
    host: Host, segment_dir: Path, stage: Path, tmp_path: Path, processes: list[UserProcess]
) -> None:
    """A process in its own PID namespace writes a pid netprofd cannot look up.
    No crash, no attribution to the host process that has that pid: A's
    (bound to "shop") is counted, B's "shop" is refused."""
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        pytest.skip("needs unshare and setpriv")
    with netprofd(tmp_path, segment_dir) as d:
        start_shop(host, segment_dir, d, processes)
        inside = []
        for user, requests in ((host.a, 7), (host.b, 9)):
            argv = [
                "unshare", "--pid", "--fork", "--mount-proc",
                "setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
                host.group.python, str(host.script), "app", str(segment_dir), APP, str(requests),
            ]  # fmt: skip
            proc = subprocess.Popen(
                argv,
                env=user_env(),
                cwd=host.group.shared,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                proc.kill()
                proc.wait()
                pytest.skip("cannot make a PID namespace here")
            inside.append((proc, json.loads(line)))
        try:
            assert all(info["pid"] < 10 for _, info in inside)  # pids of the new namespaces
            d.wait_until(
                lambda: refused_for_identity(d) >= 1, timeout=20, what="B's namespaced writer refused"
            )
            d.wait_until(
                lambda: app_view(d).get("requests") == OWN_REQUESTS + 7, what="A's namespaced writer counted"
            )
            time.sleep(1.0)
            assert app_view(d).get("requests") == OWN_REQUESTS + 7
            said = lines_naming(d.log(), inside[1][1]["path"])
            assert len(said) == 1 and "unverifiable identity" in said[0] and "not visible" in said[0], said
            assert d.get("/healthz").status_code == 200
        finally:
            for proc, _ in inside:
                proc.kill()
                proc.wait()
                for stream in (proc.stdin, proc.stdout):
                    if stream is not None:
                        stream.close()


def test_bindings_outlive_a_restart(
    host: Host, segment_dir: Path, stage: Path, tmp_path: Path, processes: list[UserProcess]
) -> None:
    """A's process ends while netprofd is down: at the next start its segment
    cannot be checked against /proc, but A's uid is a known writer of "shop"
    (kept in the state directory): it is folded in. B's ended "shop" is not."""
    with netprofd(tmp_path, segment_dir) as d:
        start_shop(host, segment_dir, d, processes)
    for process in processes:
        process.stop()  # killed: its segment stays, its lock gone
    impostor = UserProcess(host, host.b, "forge", stage, segment_dir, APP, 0, 0, 30, "ended")
    processes.append(impostor)
    with netprofd(tmp_path, segment_dir) as d:
        d.wait_until(lambda: app_view(d).get("requests") == OWN_REQUESTS, what="A's ended process folded in")
        d.wait_until(lambda: refused_for_identity(d) >= 1, what="B's ended segment refused")
        assert app_view(d).get("requests") == OWN_REQUESTS


# -- (b) removing another app's segment ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o3770, 0o2770], ids=["3770", "2770"])
def test_the_sticky_directory_keeps_neighbours_from_removing_segments(
    host: Host, segment_dir: Path, tmp_path: Path, processes: list[UserProcess], mode: int
) -> None:
    """In the documented 3770 directory B cannot remove A's segment (EPERM);
    in a 2770 one it can, and netprofd says so once, naming the fix."""
    segment_dir.chmod(mode)
    with netprofd(tmp_path, segment_dir) as d:
        shop = start_shop(host, segment_dir, d, processes)
        time.sleep(1.0)
        warned = lines_naming(d.log(), "without the sticky bit")
        removal = run_as(host, host.b, "unlink", shop.info["path"])
    if mode & stat.S_ISVTX:
        assert removal["errno"] == 1  # EPERM: only its owner, or netprofd, may
        assert Path(shop.info["path"]).exists()
        assert warned == []
    else:
        assert removal["errno"] == 0
        assert len(warned) == 1 and f"chmod +t {segment_dir}" in warned[0], warned


# -- (c) (d) the daemon's lock file ------------------------------------------------------------------------


@pytest.mark.parametrize("made_by", ["an earlier netprofd", "the neighbour"])
def test_a_neighbour_holding_the_lock_does_not_keep_netprofd_from_starting(
    host: Host, segment_dir: Path, tmp_path: Path, processes: list[UserProcess], made_by: str
) -> None:
    """B holds a flock and a POSIX lock on netprofd.lock before and while the
    daemon starts: on the group-readable file an earlier netprofd left, or on
    one B made itself. Old code: "another netprofd is watching", exit 1."""
    lock = segment_dir / DAEMON_LOCK_NAME
    if made_by == "an earlier netprofd":
        lock.touch(0o640)  # as the old daemon made it: root's, group-readable (the directory's group)
        lock.chmod(0o640)
    holder = UserProcess(host, host.b, "lock", lock)  # (B makes it when it is not there)
    processes.append(holder)
    assert os.stat(lock).st_uid == (0 if made_by == "an earlier netprofd" else host.b.uid)

    with netprofd(tmp_path, segment_dir) as d:
        info = os.lstat(lock)
        assert stat.S_ISREG(info.st_mode) and info.st_uid == 0 and stat.S_IMODE(info.st_mode) == 0o600
        replaced = lines_naming(d.log(), "replaced the lock file", str(lock))
        assert len(replaced) == 1 and f"pid {holder.info['pid']}" in replaced[0], replaced
        assert run_as(host, host.b, "open", lock)["errno"] == 13  # EACCES: B cannot open the new one
        assert run_as(host, host.a, "running", segment_dir)["running"] is True  # apps still tell it runs
        # The lock still keeps a second netprofd out.
        port = free_port()
        config = write_daemon_config(tmp_path / "second.toml", segment_dir, tmp_path / "second-state", port)
        second = subprocess.run(
            netprofd_argv(config),
            cwd=ROOT,
            env=daemon_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1 and "another netprofd is watching" in second.stderr, second.stderr
    assert run_as(host, host.a, "running", segment_dir)["running"] is False


@pytest.mark.parametrize("target", ["an existing file", "a missing file"])
def test_a_symlinked_lock_file_is_not_followed(
    host: Host, segment_dir: Path, tmp_path: Path, target: str
) -> None:
    """B replaces netprofd.lock by a symlink to a file elsewhere. Old code: the
    daemon opens (or creates) and locks the target."""
    victim = host.group.shared / f"victim-{uuid.uuid4().hex[:6]}"
    if target == "an existing file":
        victim.write_text("precious\n", encoding="utf-8")
        victim.chmod(0o644)
    lock = segment_dir / DAEMON_LOCK_NAME
    run_as(host, host.b, "symlink", victim, lock)
    try:
        with netprofd(tmp_path, segment_dir) as d:
            if target == "an existing file":
                from netprof_core.segment import flock_holders

                assert victim.read_text(encoding="utf-8") == "precious\n"
                assert stat.S_IMODE(victim.stat().st_mode) == 0o644
                assert flock_holders(victim.stat()) == []  # nobody locks it
            else:
                assert not victim.exists()
            info = os.lstat(lock)
            assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
            said = lines_naming(d.log(), "replaced the lock file")
            assert len(said) == 1 and "symbolic link" in said[0] and str(victim) in said[0], said
    finally:
        victim.unlink(missing_ok=True)


# -- (e) a directory made by someone else ---------------------------------------------------------------------


def start_refused(tmp_path: Path, segment_dir: Path) -> subprocess.CompletedProcess[str]:
    """netprofd on ``segment_dir``, which must refuse to start; a daemon that
    starts instead is stopped after 10 s and reported as such."""
    config = write_daemon_config(
        tmp_path / "refused.toml", segment_dir, tmp_path / "refused-state", free_port()
    )
    proc = subprocess.Popen(
        netprofd_argv(config), cwd=ROOT, env=daemon_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"netprofd started on {segment_dir} instead of refusing it:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def refusal_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("netprofd: ")]
    assert len(said) == 1, done.stderr
    return said[0]


@pytest.mark.parametrize("how", ["mode 0777", "a symlink", "owned by a neighbour"])
def test_netprofd_refuses_a_directory_made_by_someone_else(
    host: Host, segment_dir: Path, tmp_path: Path, how: str
) -> None:
    """A directory that another user made first (or that any user may write)
    lets them plant or remove segments. Old code: netprofd starts on it."""
    given = segment_dir
    if how == "mode 0777":
        segment_dir.chmod(0o777)
        expected = "writable by every user (mode 0777)"
    elif how == "a symlink":
        given = host.group.shared / f"link-{uuid.uuid4().hex[:6]}"
        given.symlink_to(segment_dir)
        expected = f"is a symbolic link (to {segment_dir})"
    else:
        os.chown(segment_dir, host.b.uid, host.group.gid)
        expected = f"owned by uid {host.b.uid} ({host.b.name})"
    try:
        line = refusal_line(start_refused(tmp_path, given))
    finally:
        if given != segment_dir:
            given.unlink()
    assert str(given) in line and expected in line and "3770" in line, line
    assert not (segment_dir / DAEMON_LOCK_NAME).exists()


# -- apps: is a daemon running? ---------------------------------------------------------------------------------


@pytest.mark.parametrize("proc_locks", ["readable", "unreadable"])
def test_apps_leave_ended_segments_alone_when_they_cannot_tell(
    host: Host, segment_dir: Path, proc_locks: str
) -> None:
    """An app cannot open netprofd's lock file (0600): it looks for the lock in
    /proc/locks. Where that cannot be read, it cannot tell whether a daemon
    runs, and removes nothing (a running daemon may be folding it)."""
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        pytest.skip("needs unshare and setpriv")
    (segment_dir / DAEMON_LOCK_NAME).touch(0o600)  # left by a daemon (not running: no lock on it)
    as_a = ["setpriv", f"--reuid={host.a.uid}", f"--regid={host.a.gid}", "--init-groups"]
    command = [*as_a, host.group.python, str(host.script), "stale", str(segment_dir)]
    if proc_locks == "unreadable":
        hidden = host.group.shared / "no-locks"
        hidden.touch(0o000)
        hidden.chmod(0o000)
        shell = f'mount --bind {hidden} /proc/locks && exec "$@"'
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, "sh", *command]
    proc = subprocess.Popen(
        command, env=user_env(), cwd=host.group.shared, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = proc.communicate("quit\n", timeout=60)
    if proc.returncode != 0 and "mount" in err:
        pytest.skip(f"cannot hide /proc/locks here: {err.strip()}")
    said = json.loads(out.splitlines()[0])
    if proc_locks == "unreadable":
        assert said["running"] is None
        assert said["removed"] == [] and said["exists"]
    else:
        assert said["running"] is False
        assert len(said["removed"]) == 1 and not said["exists"]


# == the bindings file, read back ===================================================================


@pytest.mark.parametrize(
    "apps",
    [
        {"shop": "1000"},  # a string: once read as the uids 1 and 0
        {"shop": [True]},
        {"shop": [1000.0]},
        {"shop": [-1]},
        {"shop": 1000},
    ],
    ids=["string", "bool", "float", "negative", "number"],
)
def test_a_bindings_file_with_uids_that_are_not_uids_is_set_aside(tmp_path: Path, apps: object) -> None:
    """app_writers.json is edited by hand (the docs say so): a value that is not
    a list of uids binds nobody, and the file is kept aside, never half-read."""
    bindings = tmp_path / "app_writers.json"
    bindings.write_text(json.dumps({"apps": apps}), encoding="utf-8")
    identity = WriterIdentity(tmp_path)
    assert identity.bindings == {}
    assert not bindings.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("app_writers.json.corrupt-")]


def test_a_bindings_file_that_cannot_be_read_is_never_overwritten(tmp_path: Path) -> None:
    """A read that fails (here EMFILE, as under the issue's idle-connection
    flood) is not "no bindings": netprofd reads the file again before it next
    saves, and a file it still cannot read is left as it was."""
    bindings = tmp_path / "app_writers.json"
    bindings.write_text(json.dumps({"apps": {"shop": [1000]}}), encoding="utf-8")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # the next open: EMFILE
    try:
        identity = WriterIdentity(tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    identity.bindings.setdefault("cart", set()).add(1001)
    identity._save()
    assert json.loads(bindings.read_text(encoding="utf-8"))["apps"] == {"cart": [1001], "shop": [1000]}
    assert identity.bindings == {"cart": {1001}, "shop": {1000}}
