"""Segment life cycle: one file per process (a forked child too), closed at
exit, readable after a crash, cleared when stale, bounded in size, and a
recorder that still works when no file can be made.

Every test runs against both cores (the ``implementation`` fixture)."""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from netprof_core import Direction, ProfilingConfig, Recorder, SegmentReader, read_segment
from netprof_core import _layout as L
from netprof_core._recorder import core_module
from netprof_core.segment import (
    STALE_AFTER_SECONDS,
    daemon_running,
    process_alive,
    process_start_ticks,
    remove_stale_segments,
)
from netprof_daemon.store import SegmentStore

MakeRecorder = Callable[..., Recorder]

ROOT = Path(__file__).resolve().parents[1]
T0 = 10**15
OLD_NS = time.time_ns() - int(3 * STALE_AFTER_SECONDS * 1e9)  # well past the stale bound

# A child process: records 5 requests into a segment in argv[1] with core argv[2],
# prints the segment's path, then ends as argv[3] says: "exit" (normally),
# "_exit" (os._exit: no atexit) or "wait" (until killed).
_CHILD = r"""
import os, sys, time
from netprof_core import ProfilingConfig, Recorder
directory, implementation, ending = sys.argv[1:4]
created_ns = int(sys.argv[4]) if len(sys.argv) > 4 else None
rec = Recorder(ProfilingConfig(segment_dir=directory, app_name="child-app"),
               implementation=implementation, created_ns=created_ns)
rid = rec.route_id("/child", "POST")
for i in range(5):
    rec.record(rid, 200 + i, 1000 + i, 2000 + 2 * i)
print(rec.path, flush=True)
if ending == "_exit":
    os._exit(0)
if ending == "wait":
    time.sleep(600)
"""


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def run_child(directory: Path, implementation: str, ending: str, created_ns: int | None = None) -> Path:
    args = [sys.executable, "-c", _CHILD, str(directory), implementation, ending]
    if created_ns is not None:
        args.append(str(created_ns))
    done = subprocess.run(args, env=child_env(), capture_output=True, text=True, timeout=60, check=True)
    return Path(done.stdout.strip())


def age_file(path: Path, wall_ns: int = OLD_NS) -> None:
    os.utime(path, ns=(wall_ns, wall_ns))


def set_closed_ns(path: Path, closed_ns: int) -> None:
    """Make a closed segment look closed long ago (what a process that ended
    hours ago leaves behind)."""
    with open(path, "r+b") as f:
        f.seek(L.CLOSED_NS_OFFSET)
        f.write(closed_ns.to_bytes(8, "little"))


@contextmanager
def daemon_lock(directory: Path) -> Iterator[None]:
    """Play netprofd: hold the exclusive lock it holds while it runs."""
    fd = os.open(directory / L.DAEMON_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


# -- one segment per process -----------------------------------------------------------------------


def test_each_recorder_gets_its_own_segment_file(make_recorder: MakeRecorder, segment_dir: Path) -> None:
    a = make_recorder(app_name="svc-a")
    b = make_recorder(app_name="svc-b")
    assert a.path is not None and b.path is not None and a.path != b.path
    assert a.path.parent == segment_dir and b.path.parent == segment_dir
    assert sorted(p.name for p in segment_dir.glob("*" + L.SEGMENT_SUFFIX)) == sorted([a.path.name, b.path.name])
    for rec, name in ((a, "svc-a"), (b, "svc-b")):
        assert rec.path.name.startswith(f"{name}-{os.getpid()}-")
        assert rec.path.name.endswith(L.SEGMENT_SUFFIX)
        header = read_segment(rec.path).header
        assert header.pid == os.getpid()
        assert header.app_name == name
        assert header.start_ticks == process_start_ticks(os.getpid())
        assert header.closed_ns == 0
        assert header.total_size == rec.path.stat().st_size


@pytest.mark.parametrize("umask", [0o077, 0o000, 0o022])
def test_segment_mode_is_0640_whatever_the_umask(make_recorder: MakeRecorder, umask: int) -> None:
    old = os.umask(umask)
    try:
        rec = make_recorder()
    finally:
        os.umask(old)
    assert stat.S_IMODE(rec.path.stat().st_mode) == 0o640


def test_records_of_two_recorders_stay_apart(make_recorder: MakeRecorder) -> None:
    a = make_recorder(app_name="a")
    b = make_recorder(app_name="b")
    a.record(a.route_id("/a"), 200, T0, T0 + 1)
    for _ in range(3):
        b.record(b.route_id("/b"), 200, T0, T0 + 1)
    assert read_segment(a.path).counters.requests == 1
    assert read_segment(b.path).counters.requests == 3


# -- fork -----------------------------------------------------------------------------------------------


def test_forked_child_records_into_its_own_new_segment(make_recorder: MakeRecorder, segment_dir: Path) -> None:
    rec = make_recorder()
    rid = rec.route_id("/fork", "GET")
    for _ in range(3):
        rec.record(rid, 200, T0, T0 + 10)
    rec.control.set_slow_request_threshold(0.5)  # a setting the child inherits
    parent_path = rec.path

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(read_fd)
            for _ in range(5):
                rec.record(rid, 201, T0, T0 + 20)
            rec.record(rec.route_id("/child-only"), 202, T0, T0 + 30)
            info = {"path": str(rec.path), "header_pid": rec.header.pid, "pid": os.getpid()}
            os.write(write_fd, json.dumps(info).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    info = json.loads(data)

    child_path = Path(info["path"])
    assert child_path != parent_path
    assert info["header_pid"] == info["pid"] == pid
    assert child_path.parent == segment_dir and child_path.exists()

    child = read_segment(child_path)
    assert child.header.pid == pid
    assert child.counters.requests == 6, "the child starts from zero counts"
    assert {r.key.template: r.count for r in child.routes} == {"<other>": 0, "/fork": 5, "/child-only": 1}
    assert [r.status for r in child.records] == [201] * 5 + [202]
    assert child.control.slow_request_threshold == pytest.approx(0.5)

    parent = rec.snapshot()
    assert parent.path == str(parent_path) and parent.header.pid == os.getpid()
    assert parent.counters.requests == 3
    assert [r.status for r in parent.records] == [200] * 3
    assert "/child-only" not in {r.key.template for r in parent.routes}
    # The parent goes on recording into its own file.
    rec.record(rid, 200, T0, T0 + 10)
    assert read_segment(parent_path).counters.requests == 4


def _mp_child(rec: Recorder, rid: int, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    for _ in range(4):
        rec.record(rid, 204, T0, T0 + 5)
    queue.put(str(rec.path))


def test_multiprocessing_fork_child_gets_its_own_segment(make_recorder: MakeRecorder) -> None:
    rec = make_recorder()
    rid = rec.route_id("/mp")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_mp_child, args=(rec, rid, queue))
    proc.start()
    child_path = Path(queue.get(timeout=60))
    proc.join(60)
    assert proc.exitcode == 0
    assert child_path != rec.path
    child = read_segment(child_path)
    assert child.header.pid == proc.pid
    assert child.counters.requests == 4
    assert rec.snapshot().counters.requests == 0


# -- process end -----------------------------------------------------------------------------------------


def test_normal_exit_marks_the_segment_closed(implementation: str, segment_dir: Path) -> None:
    path = run_child(segment_dir, implementation, "exit")
    snap = read_segment(path)
    assert snap.header.closed_ns != 0 and snap.header.closed
    assert snap.header.app_name == "child-app"
    assert snap.counters.requests == 5
    assert [r.status for r in snap.records] == [200, 201, 202, 203, 204]


def test_sigkilled_process_leaves_a_readable_unclosed_segment(implementation: str, segment_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(segment_dir), implementation, "wait"],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        path = Path(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    snap = read_segment(path)
    assert snap.header.closed_ns == 0
    assert not process_alive(snap.header.pid, snap.header.start_ticks)
    assert snap.source in ("final", "live")
    assert snap.counters.requests == 5
    assert len(snap.records) == 5
    assert {r.key.template: r.count for r in snap.routes}["/child"] == 5


def test_os_exit_skips_close_but_the_segment_stays_readable(implementation: str, segment_dir: Path) -> None:
    path = run_child(segment_dir, implementation, "_exit")
    snap = read_segment(path)
    assert snap.header.closed_ns == 0
    assert snap.counters.requests == 5


# -- the writer's lock: liveness without /proc ------------------------------------------------------------------

# A process that forks: its child lives on, it ends at once (without closing
# its segment). Prints its segment, then the child's pid and segment.
_FORKING = r"""
import os, sys, time
from netprof_core import ProfilingConfig, Recorder
rec = Recorder(ProfilingConfig(segment_dir=sys.argv[1], app_name="forking"), implementation=sys.argv[2])
print(rec.path, flush=True)
if os.fork() == 0:
    print(os.getpid(), rec.path, flush=True)
    time.sleep(600)
os._exit(0)
"""


@contextmanager
def _script(code: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A Python process running ``code``, its output piped; killed at the end if still running."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=child_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()


def _locked(implementation: str, path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return bool(core_module(implementation).segment_locked(fd))
    finally:
        os.close(fd)


def test_a_writer_holds_its_segment_lock_until_it_closes(
    make_recorder: MakeRecorder, implementation: str
) -> None:
    rec = make_recorder()
    assert _locked(implementation, rec.path)
    with SegmentReader(rec.path) as reader:
        assert reader.writer_alive()
        reader.close()  # a reader's close in the writer's own process leaves the lock alone
    assert _locked(implementation, rec.path)
    rec.close()
    assert not _locked(implementation, rec.path)


def test_a_sigkilled_writer_leaves_no_lock(implementation: str, segment_dir: Path) -> None:
    with _script(_CHILD, str(segment_dir), implementation, "wait") as proc:
        assert proc.stdout is not None
        path = Path(proc.stdout.readline().strip())
        assert _locked(implementation, path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert not _locked(implementation, path)
    with SegmentReader(path) as reader:
        assert not reader.writer_alive()


def test_a_forked_child_does_not_keep_its_parents_segment_alive(implementation: str, segment_dir: Path) -> None:
    with _script(_FORKING, str(segment_dir), implementation) as proc:
        assert proc.stdout is not None
        parent_path = Path(proc.stdout.readline().strip())
        child_pid_text, child_path_text = proc.stdout.readline().split()
        child_pid, child_path = int(child_pid_text), Path(child_path_text)
        try:
            assert proc.wait(timeout=60) == 0
            assert child_path != parent_path
            assert _locked(implementation, child_path), "the child writes its own segment, locked"
            assert not _locked(implementation, parent_path), "the parent has ended; its child closed its copy"
            with SegmentReader(parent_path) as reader:
                assert not reader.writer_alive()
                assert reader.snapshot().source == "final"
        finally:
            os.kill(child_pid, signal.SIGKILL)


_DROPPED = r"""
import gc, os, sys, time
from netprof_core import ProfilingConfig, Recorder
rec = Recorder(ProfilingConfig(segment_dir=sys.argv[1], app_name="dropped"), implementation=sys.argv[2])
print(rec.path, flush=True)
del rec
gc.collect()
if os.fork() == 0:
    print(os.getpid(), flush=True)
    time.sleep(600)
os._exit(0)
"""


def test_a_recorder_dropped_without_close_leaves_no_lock_to_children(
    implementation: str, segment_dir: Path
) -> None:
    with _script(_DROPPED, str(segment_dir), implementation) as proc:
        assert proc.stdout is not None
        path = Path(proc.stdout.readline().strip())
        child_pid = int(proc.stdout.readline())
        try:
            assert proc.wait(timeout=60) == 0
            assert not _locked(implementation, path), "the dropped recorder's lock went with it"
            with SegmentReader(path) as reader:
                assert reader.snapshot().source == "final"
        finally:
            os.kill(child_pid, signal.SIGKILL)


def test_a_writer_whose_pid_this_host_cannot_see_stays_live_while_locked(
    make_recorder: MakeRecorder, segment_dir: Path
) -> None:
    """A writer in another PID namespace (a container sharing the segment
    directory) has a pid /proc does not know: its lock says it is alive."""
    rec = make_recorder()
    rec.record(rec.route_id("/x"), 200, T0, T0 + 10)
    unseen = 2**22 + 12_345  # above any pid_max: no process here has it
    L.U64.pack_into(rec._buf, L.HEADER_OFFSETS["pid"], unseen)
    assert not process_alive(unseen, rec.header.start_ticks)
    store = SegmentStore(segment_dir)
    try:
        store.refresh()
        store.refresh()  # nothing recorded since: an idle writer is asked whether it lives
        assert [entry.snapshot.header.pid for entry in store.live()] == [unseen]
        assert store.apps()["test-app"].counters.requests == 1
        rec.close()
        store.refresh()
        assert list(store.live()) == [], "closed: folded into the retired totals"
        assert store.apps()["test-app"].counters.requests == 1
    finally:
        store.close()


# -- stale segments ------------------------------------------------------------------------------------------


def make_population(segment_dir: Path, implementation: str, live: Recorder) -> dict[str, Path]:
    """Segments of every kind, in one directory; "old_*" are past the stale bound."""
    paths = {
        "old_closed": run_child(segment_dir, implementation, "exit"),
        "young_closed": run_child(segment_dir, implementation, "exit"),
        "old_dead": run_child(segment_dir, implementation, "_exit", created_ns=OLD_NS),
        "young_dead": run_child(segment_dir, implementation, "_exit"),
        "old_live": live.path,
    }
    set_closed_ns(paths["old_closed"], OLD_NS)
    age_file(paths["old_closed"])
    age_file(paths["old_dead"])
    age_file(paths["old_live"])
    foreign = segment_dir / ("foreign" + L.SEGMENT_SUFFIX)
    foreign.write_bytes(b"not a segment at all " * 100)
    age_file(foreign)
    paths["old_foreign"] = foreign
    tiny = segment_dir / ("tiny" + L.SEGMENT_SUFFIX)
    tiny.write_bytes(b"x")
    age_file(tiny)
    paths["old_tiny_foreign"] = tiny
    other = segment_dir / "notes.txt"
    other.write_text("keep me")
    age_file(other)
    paths["old_other_file"] = other
    assert all(p.exists() for p in paths.values())
    return paths


def present(paths: dict[str, Path]) -> set[str]:
    return {name for name, path in paths.items() if path.exists()}


def test_new_recorder_removes_old_closed_and_dead_segments_only(
    make_recorder: MakeRecorder, implementation: str, segment_dir: Path
) -> None:
    live = make_recorder(app_name="live")
    paths = make_population(segment_dir, implementation, live)

    newcomer = make_recorder(app_name="newcomer")

    assert present(paths) == set(paths) - {"old_closed", "old_dead"}
    assert newcomer.path.exists()
    # The live one still works and is still read.
    live.record(live.route_id("/still"), 200, T0, T0 + 1)
    assert read_segment(live.path).counters.requests == 1


def test_remove_stale_segments_with_no_age_bound(
    make_recorder: MakeRecorder, implementation: str, segment_dir: Path
) -> None:
    closed_here = make_recorder(app_name="closed-here")  # closed, by a process still alive
    closed_here.close()
    live = make_recorder(app_name="live")
    paths = make_population(segment_dir, implementation, live)
    paths["closed_here"] = closed_here.path

    removed = remove_stale_segments(segment_dir, older_than=0)

    assert sorted(removed) == sorted(
        paths[name] for name in ("old_closed", "young_closed", "old_dead", "young_dead", "closed_here")
    )
    assert present(paths) == {"old_live", "old_foreign", "old_tiny_foreign", "old_other_file"}


def test_default_bound_keeps_young_segments(make_recorder: MakeRecorder, implementation: str, segment_dir: Path) -> None:
    young = [run_child(segment_dir, implementation, ending) for ending in ("exit", "_exit")]
    assert remove_stale_segments(segment_dir) == []
    assert all(p.exists() for p in young)


def test_nothing_is_removed_while_the_daemon_lock_is_held(
    make_recorder: MakeRecorder, implementation: str, segment_dir: Path
) -> None:
    live = make_recorder(app_name="live")
    paths = make_population(segment_dir, implementation, live)

    with daemon_lock(segment_dir):
        assert daemon_running(segment_dir)
        make_recorder(app_name="newcomer")
        assert remove_stale_segments(segment_dir, older_than=0) == []
        assert present(paths) == set(paths)

    assert not daemon_running(segment_dir)
    removed = remove_stale_segments(segment_dir)
    assert sorted(removed) == sorted([paths["old_closed"], paths["old_dead"]])


def test_daemon_running_is_false_without_lock_holder(segment_dir: Path) -> None:
    assert not daemon_running(segment_dir)
    (segment_dir / L.DAEMON_LOCK_NAME).write_text("")  # a lock file left behind
    assert not daemon_running(segment_dir)
    assert not daemon_running(segment_dir / "missing")


# -- close ----------------------------------------------------------------------------------------------


def test_close_remove_deletes_the_file_and_later_calls_do_nothing(make_recorder: MakeRecorder) -> None:
    rec = make_recorder()
    rid = rec.route_id("/x")
    hot_path = rec.record  # applications keep the bound method for speed
    rec.record(rid, 200, T0, T0 + 1)
    path = rec.path

    rec.close(remove=True)
    assert not path.exists()

    rec.record(rid, 200, T0, T0 + 1)
    rec.record("junk", None, -1, -2)
    hot_path(rid, 200, T0, T0 + 1)
    hot_path("junk", None, -1, -2)
    with rec.measure("/x"):
        pass
    with pytest.raises(KeyError), rec.measure("/x"):
        raise KeyError("still raised")
    rec.route_id("/after-close")
    rec.internal_error(RuntimeError("ignored"))
    rec.close()
    rec.close(remove=True)
    assert not path.exists()


def test_close_without_remove_leaves_a_closed_readable_segment(make_recorder: MakeRecorder) -> None:
    rec = make_recorder()
    rec.record(rec.route_id("/x"), 200, T0, T0 + 1)
    rec.close()
    snap = read_segment(rec.path)
    assert snap.header.closed
    assert snap.counters.requests == 1
    rec.record(1, 200, T0, T0 + 1)
    assert read_segment(rec.path).counters.requests == 1


def test_recorder_as_context_manager_closes(make_recorder: MakeRecorder) -> None:
    with make_recorder() as rec:
        rec.record(rec.route_id("/x"), 200, T0, T0 + 1)
    assert read_segment(rec.path).header.closed


# -- the memory bound ------------------------------------------------------------------------------------


def test_memory_bound_shrinks_the_ring(make_recorder: MakeRecorder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="netprof.recorder")
    rec = make_recorder(max_stored_requests=1_000_000, max_memory_mb=2)

    assert rec.path.stat().st_size <= 2 * 2**20
    header = read_segment(rec.path, records=False).header
    assert header.total_size == rec.path.stat().st_size
    assert header.ring_capacity < 1_000_000
    assert header.ring_capacity >= L.MIN_RING_CAPACITY
    assert header.requested_ring_capacity == 1_000_000
    assert header.route_capacity == header.requested_route_capacity == 24
    assert header.memory_shrinks == 1
    assert rec.snapshot(records=False).control.ring_capacity == header.ring_capacity

    warnings = [r for r in caplog.records if r.name == "netprof.recorder" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "max_memory_mb" in message and "1000000" in message and str(header.ring_capacity) in message

    rid = rec.route_id("/bounded")
    for i in range(header.ring_capacity + 10):
        rec.record(rid, 200, T0 + i, T0 + i + 1)
    snap = rec.snapshot()
    assert len(snap.records) == header.ring_capacity
    assert snap.counters.requests == header.ring_capacity + 10


def test_memory_bound_shrinks_routes_when_the_ring_cannot_give_enough(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(max_stored_requests=1000, max_routes=200, max_memory_mb=1)
    header = rec.header
    assert rec.path.stat().st_size <= 2**20
    assert header.route_capacity < 200 and header.requested_route_capacity == 200
    assert header.memory_shrinks == 1
    rids = [rec.route_id(f"/r{i}") for i in range(200)]
    assert max(rids) == header.route_capacity and rids.count(0) == 200 - header.route_capacity


def test_default_segment_fits_in_one_mib(make_recorder: MakeRecorder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="netprof.recorder")
    rec = make_recorder()
    assert rec.path.stat().st_size <= 2**20
    assert rec.header.memory_shrinks == 0
    assert rec.header.ring_capacity == rec.header.requested_ring_capacity == 1000
    assert not [r for r in caplog.records if r.name == "netprof.recorder"]


# -- no segment directory -------------------------------------------------------------------------------------


def test_unwritable_segment_dir_falls_back_to_private_memory(
    make_recorder: MakeRecorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="netprof.recorder")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rec = make_recorder(segment_dir=str(blocker / "segments"), graceful_degradation=True)

    assert rec.path is None
    assert any(r.name == "netprof.recorder" and r.levelno == logging.ERROR for r in caplog.records)
    rid = rec.route_id("/private")
    for _ in range(3):
        rec.record(rid, 200, T0, T0 + 100)
    with rec.measure("/private", "GET", Direction.INBOUND):
        pass
    snap = rec.snapshot()
    assert snap.counters.requests == 4
    assert len(snap.records) == 4
    assert {r.key.template: r.count for r in snap.routes}["/private"] == 4
    assert snap.header.pid == os.getpid()
    rec.control.disable()
    rec.record(rid, 200, T0, T0 + 100)
    assert rec.snapshot().counters.disabled_calls == 1
    rec.close(remove=True)


def test_unwritable_segment_dir_without_graceful_degradation_raises(implementation: str, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = ProfilingConfig(segment_dir=str(blocker / "segments"), graceful_degradation=False, app_name="strict")
    with pytest.raises(OSError):
        Recorder(config, implementation=implementation)
