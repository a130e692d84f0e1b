"""The figures never lie: netprofd's segment store under the faults an attacker
or the host can cause (issue 15, "The figures must never lie").

Each test runs the real daemon (``tests/apps/netprofd.py``) over real segments
written by real recorders, and causes the fault for real: the daemon's
descriptors exhausted through its RLIMIT_NOFILE and idle connections, the
segment directory taken away, segment words altered on disk as a hostile
writer would, a forged header over a sparse file, a full tmpfs as the state
directory, a corrupt state file. Each checks what an operator sees: the API's
counts against the true count, /metrics counters that never go backwards,
/healthz, the log and the store's own metrics.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from netprof_core import Recorder, _recorder_py
from netprof_core import _layout as L
from netprof_core._recorder import core_module
from netprof_core.reader import RouteKey, RouteSums
from tests.apps.netprofd import NP, PREFIX, Netprofd, daemon_env, netprofd
from tests.apps.servers import ROOT, server_env
from tests.apps.tmpfs import mounted_tmpfs

MakeRecorder = Callable[..., Recorder]
ROUTE = ("inbound", "GET", "/work")
FAST = {"tick_seconds": 0.1}
PROMPT = 5.0  # seconds: what "answers promptly" means here


# -- helpers -----------------------------------------------------------------------------------------


def env_for(implementation: str) -> dict[str, str]:
    """The daemon's environment, reading segments with the parametrised core."""
    return daemon_env(**({"NETPROF_NO_EXTENSIONS": "1"} if implementation == "python" else {}))


def send(recorder: Recorder, count: int) -> None:
    rid = recorder.route_id("/work", "GET")
    now = time.monotonic_ns()
    for i in range(count):
        recorder.record(rid, 200, now, now + 1_000_000 + i * 1000, 10, 100)


def counted(d: Netprofd, app: str) -> int:
    return d.route_counts(app).get(ROUTE, 0)


def scrape(d: Netprofd) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one /metrics scrape, by name and labels."""
    response = d.get("/metrics")
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def monotone(samples: Mapping[tuple[str, Any], float]) -> dict[tuple[str, Any], float]:
    """The samples a counter's rules apply to: counters and histogram buckets, counts, sums."""
    return {
        key: value
        for key, value in samples.items()
        if key[0].startswith("network_profiling_")
        and key[0].endswith(("_total", "_bucket", "_count", "_sum"))
    }


def assert_never_backwards(before: Mapping[Any, float], after: Mapping[Any, float]) -> None:
    for key, value in monotone(before).items():
        assert key in after, f"series {key} disappeared"
        assert after[key] >= value, f"series {key} went backwards: {value} -> {after[key]}"


def metric(samples: Mapping[tuple[str, Any], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def lines_naming(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


# A real profiled process: records until told to stop, then says how many.
TRAFFIC = """\
import sys, time, select
from netprof_core import ProfilingConfig, Recorder
segment_dir, app, implementation = sys.argv[1:]
recorder = Recorder(ProfilingConfig(segment_dir=segment_dir, app_name=app), implementation=implementation)
rid = recorder.route_id("/work", "GET")
print(recorder.path, flush=True)
count = 0
while not select.select([sys.stdin], [], [], 0.003)[0]:
    now = time.monotonic_ns()
    for i in range(20):
        recorder.record(rid, 200, now, now + 1_000_000 + i, 10, 100)
    count += 20
sys.stdin.readline()
print(count, flush=True)
if sys.stdin.readline().strip() == "exit":
    sys.exit(0)
"""


class Traffic:
    """A profiled process sending requests until :meth:`stop`; it then
    stays alive (its segment live) until :meth:`exit`."""

    def __init__(self, segment_dir: Path, app: str, implementation: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TRAFFIC, str(segment_dir), app, implementation],
            cwd=ROOT,
            env=server_env(implementation),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.path = Path(self.proc.stdout.readline().strip())
        assert self.path.name.endswith(".npseg"), f"the traffic process did not start ({self.proc.poll()})"

    def stop(self) -> int:
        """Stop sending; the number of requests it recorded."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        assert self.proc.wait(30) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextlib.contextmanager
def traffic(segment_dir: Path, apps: list[str], implementation: str) -> Iterator[list[Traffic]]:
    started: list[Traffic] = []
    try:
        for app in apps:
            started.append(Traffic(segment_dir, app, implementation))
        yield started
    finally:
        for process in started:
            process.kill()


WORKER = """\
import sys, time
from netprof_core import ProfilingConfig, Recorder
segment_dir, app, count, implementation = sys.argv[1:]
recorder = Recorder(ProfilingConfig(segment_dir=segment_dir, app_name=app), implementation=implementation)
rid = recorder.route_id("/work", "GET")
now = time.monotonic_ns()
for i in range(int(count)):
    recorder.record(rid, 200, now, now + 1_000_000 + i, 10, 100)
print(recorder.path, flush=True)
"""


def run_worker(segment_dir: Path, app: str, count: int, implementation: str) -> Path:
    """A profiled process that records ``count`` requests and exits normally; its segment."""
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(segment_dir), app, str(count), implementation],
        cwd=ROOT, env=server_env(implementation), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return Path(done.stdout.strip())


def open_fds(pid: int) -> set[int]:
    return {int(name) for name in os.listdir(f"/proc/{pid}/fd")}


@contextlib.contextmanager
def descriptors_exhausted(d: Netprofd, idle_connections: int = 40) -> Iterator[None]:
    """The daemon out of file descriptors, for real: idle TCP connections
    (no request, no key) hold some, then its soft RLIMIT_NOFILE is lowered to
    its lowest free descriptor, and more connections wait to take any slot that
    frees. Everything is given back when the block ends."""
    assert d.proc is not None
    pid = d.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    held: list[socket.socket] = []
    try:
        for _ in range(idle_connections):
            held.append(socket.create_connection(("127.0.0.1", d.port)))
        time.sleep(0.3)  # accepted
        used = open_fds(pid)
        lowest_free = min(set(range(len(used) + 1)) - used)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        for _ in range(idle_connections):  # in the backlog: any descriptor freed is taken at once
            held.append(socket.create_connection(("127.0.0.1", d.port)))
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        for sock in held:
            sock.close()


# -- 1. a listing that fails is never an empty directory ---------------------------------------------


def test_exhausted_descriptors_never_inflate_the_counts(
    tmp_path: Path, segment_dir: Path, implementation: str
) -> None:
    """The issue's attack: 12,860 real requests showed as 40,078 once the
    daemon's descriptors ran out (every live process folded at each failed
    listing, found again at the next). The counts must equal the real count,
    during and after, and after a restart."""
    apps = ["alpha", "beta", "gamma"]
    with (
        netprofd(tmp_path, segment_dir, daemon=FAST, env=env_for(implementation)) as d,
        traffic(segment_dir, apps, implementation) as processes,
    ):
        d.wait_until(lambda: all(counted(d, app) for app in apps), what="every app's first requests")
        before = scrape(d)
        with descriptors_exhausted(d):
            time.sleep(1.5)  # fifteen ticks without a descriptor; the traffic goes on
        sent = {app: process.stop() for app, process in zip(apps, processes)}
        d.wait_until(
            lambda: {app: counted(d, app) for app in apps} == sent,
            what=f"the real counts {sent} (seen: { {app: counted(d, app) for app in apps} })",
        )
        time.sleep(0.5)  # and they stay so
        assert {app: counted(d, app) for app in apps} == sent
        after = scrape(d)
        assert_never_backwards(before, after)
        for app in apps:
            labels = {"app": app, "route": "/work", "method": "GET", "direction": "inbound", "status": "2xx"}
            series = metric(after, "network_profiling_requests_total", **labels)
            assert series == sent[app], (app, series, sent[app])
        log = d.log()
        assert not lines_naming(log, "vanished"), "a live segment was taken for gone"
        failed = lines_naming(log, f"cannot list {segment_dir}")
        assert 1 <= len(failed) <= 2, failed  # logged once (per spell of failures), not per tick
        assert metric(after, "netprofd_transient_errors_total", operation="list") >= 1
        for process in processes:
            process.exit()
        d.wait_until(
            lambda: not any(p.path.exists() for p in processes), what="the ended processes to be folded"
        )
        assert {app: counted(d, app) for app in apps} == sent
    with netprofd(tmp_path, segment_dir, daemon=FAST, env=env_for(implementation)) as again:
        assert {app: counted(again, app) for app in apps} == sent


def test_a_segment_directory_that_cannot_be_listed_folds_nothing_and_is_reported(
    tmp_path: Path, segment_dir: Path, implementation: str
) -> None:
    """The directory taken away under the daemon: its listing fails (ENOENT);
    nothing is folded, /healthz says why, and once it is back the counts are
    the real ones, not doubled."""
    moved = tmp_path / "moved-away"
    with (
        netprofd(tmp_path, segment_dir, daemon=FAST, env=env_for(implementation)) as d,
        traffic(segment_dir, ["alpha"], implementation) as (process,),
    ):
        d.wait_until(lambda: counted(d, "alpha"), what="the first requests")
        assert d.get("/healthz").status_code == 200
        segment_dir.rename(moved)
        try:
            failing = d.wait_until(
                lambda: (r := d.get("/healthz")).status_code == 503 and r.json(),
                what="/healthz to report the failing listing",
            )
            assert str(segment_dir) in failing["reason"], failing
            # The process is still known, and still read through its open file.
            stats = d.get(f"{NP}/production-metrics", app="alpha").json()["applications"][0]
            assert stats["process_count"] == 1
        finally:
            moved.rename(segment_dir)
        d.wait_until(lambda: d.get("/healthz").status_code == 200, what="/healthz to recover")
        sent = process.stop()
        d.wait_until(lambda: counted(d, "alpha") == sent, what=f"the real count {sent}")
        time.sleep(0.5)
        assert counted(d, "alpha") == sent
        assert not lines_naming(d.log(), "vanished")


# -- 2. one bad segment costs its own figures, never everyone else's ---------------------------------


def alter_route(recorder: Recorder, words: Mapping[int, int], route: str = "/work") -> None:
    """Write words of a route's block in the segment file, as a hostile or
    broken writer would (``words``: by index within the block: the route's
    header words, then its histogram buckets from ROUTE_HEADER_WORDS on)."""
    assert recorder.path is not None
    rid = recorder.route_id(route, "GET")
    layout = recorder.layout
    live = layout.live_offset
    fd = os.open(recorder.path, os.O_RDWR)
    try:
        for index, value in words.items():
            if index < L.ROUTE_HEADER_WORDS:
                word = layout.route_header(rid) + index
            else:
                word = layout.route_histogram(rid) + index - L.ROUTE_HEADER_WORDS
            os.pwrite(fd, struct.pack("<Q", value), live + word * L.WORD)
    finally:
        os.close(fd)


def route_words(recorder: Recorder, route: str = "/work") -> tuple[int, int]:
    """The route's count and its first nonzero histogram bucket, as written."""
    assert recorder.path is not None
    rid = recorder.route_id(route, "GET")
    layout = recorder.layout
    data = recorder.path.read_bytes()
    live = layout.live_offset
    count = struct.unpack_from("<Q", data, live + (layout.route_header(rid) + L.R_COUNT) * L.WORD)[0]
    start = live + layout.route_histogram(rid) * L.WORD
    buckets = struct.unpack_from(f"<{L.HIST_BUCKETS}Q", data, start)
    first = next(i for i, n in enumerate(buckets) if n)
    return count, first


def test_a_sum_past_2_64_quarantines_the_segment_and_spares_the_others(
    tmp_path: Path, segment_dir: Path, make_recorder: MakeRecorder, implementation: str
) -> None:
    """Two segments whose counts add past 2**64: the sum must not wrap (a
    counter going backwards), and a block that can no longer be subtracted
    must not stop every later tick (the others' figures frozen, /healthz ok)."""
    evil1, evil2 = make_recorder(app_name="evil"), make_recorder(app_name="evil")
    good = make_recorder(app_name="good")
    send(evil1, 5)
    send(evil2, 5)
    send(good, 10)
    assert evil2.path is not None
    huge = 2**63 + 5
    with netprofd(tmp_path, segment_dir, daemon=FAST, env=env_for(implementation)) as d:
        d.wait_until(lambda: counted(d, "evil") == 10 and counted(d, "good") == 10, what="the first counts")
        first = scrape(d)
        alter_route(evil1, {L.R_COUNT: huge, L.R_STATUS_CLASSES + 2: huge})
        send(evil1, 1)
        d.wait_until(lambda: counted(d, "evil") == huge + 1 + 5, what="evil1's altered count")
        second = scrape(d)
        assert_never_backwards(first, second)
        # The second one takes the sum past 2**64.
        alter_route(evil2, {L.R_COUNT: huge, L.R_STATUS_CLASSES + 2: huge})
        send(evil2, 1)
        time.sleep(0.5)
        send(evil2, 1)  # its block moves again: what was added must now be taken away
        time.sleep(0.5)
        send(good, 7)
        d.wait_until(lambda: counted(d, "good") == 17, what="the good app's figures to go on", timeout=5)
        third = scrape(d)
        assert_never_backwards(second, third)
        assert counted(d, "evil") == huge + 1 + 5  # evil2's last good figures are kept
        assert metric(third, "netprofd_segments_quarantined") == 1
        assert metric(third, "netprofd_segment_errors_total", reason="overflow") == 1
        health = d.get("/healthz")
        assert health.status_code == 200, health.text
        # The bad writer gone: nothing changes for the others.
        evil2.close()
        send(good, 3)
        d.wait_until(lambda: counted(d, "good") == 20, what="the good app after the bad writer ended")
        assert_never_backwards(third, scrape(d))
        quarantined = lines_naming(d.log(), f"quarantined {evil2.path}")
        assert len(quarantined) == 1, quarantined
        assert "2**64" in quarantined[0] or "overflow" in quarantined[0], quarantined[0]


@pytest.mark.parametrize("what", ["count", "bucket"])
def test_a_counter_that_goes_backwards_quarantines_its_segment(
    tmp_path: Path, segment_dir: Path, make_recorder: MakeRecorder, implementation: str, what: str
) -> None:
    """A writer whose count (or one histogram bucket, its count still rising)
    goes down between two snapshots: /metrics must not follow it down."""
    bad, good = make_recorder(app_name="bad"), make_recorder(app_name="good")
    send(bad, 10)
    send(good, 10)
    with netprofd(tmp_path, segment_dir, daemon=FAST, env=env_for(implementation)) as d:
        d.wait_until(lambda: counted(d, "bad") == 10 and counted(d, "good") == 10, what="the first counts")
        before = scrape(d)
        _, bucket = route_words(bad)
        if what == "count":
            alter_route(bad, {L.R_COUNT: 3, L.R_STATUS_CLASSES + 2: 3})
        else:
            alter_route(bad, {L.ROUTE_HEADER_WORDS + bucket: 0})
        send(bad, 1)
        time.sleep(0.5)
        send(good, 5)
        d.wait_until(lambda: counted(d, "good") == 15, what="the good app's figures to go on")
        after = scrape(d)
        assert_never_backwards(before, after)
        assert counted(d, "bad") == 10  # its last good figures
        assert metric(after, "netprofd_segments_quarantined") == 1
        assert metric(after, "netprofd_segment_errors_total", reason="backwards") == 1
        assert d.get("/healthz").status_code == 200
        assert len(lines_naming(d.log(), f"quarantined {bad.path}")) == 1


# -- 3. headers bounded by what a real writer makes; reads bounded ----------------------------------


def forge(source: Path, target: Path, **fields: int | bytes) -> Path:
    """A segment file made from the head of a real one (header, control block,
    route table, statistics) with header fields replaced, extended (sparse)
    to the size its header declares."""
    data = bytearray(source.read_bytes())
    formats = dict(L._HEADER_SPEC)
    for name, value in fields.items():
        struct.pack_into("<" + formats[name], data, L.HEADER_OFFSETS[name], value)
    ring, routes = (
        struct.unpack_from("<I", data, L.HEADER_OFFSETS[name])[0]
        for name in ("ring_capacity", "route_capacity")
    )
    layout = L.SegmentLayout(ring, routes)
    struct.pack_into("<Q", data, L.HEADER_OFFSETS["total_size"], layout.total_size)
    with open(target, "wb") as f:
        f.write(data[: layout.ring_offset])
        f.truncate(layout.total_size)
    return target


def test_absurd_capacities_are_refused_and_every_other_app_answers(
    tmp_path: Path, segment_dir: Path, make_recorder: MakeRecorder, implementation: str
) -> None:
    """A forged header declaring a ring of 2**32 - 1 records over a sparse
    file: reading it never finished, the API's worker threads filled, and
    every app's stats and exports hung."""
    real = make_recorder(app_name="real")
    send(real, 20)
    assert real.path is not None
    forged = forge(
        real.path, segment_dir / "forged-1-1-0.npseg",
        ring_capacity=2**32 - 1, requested_ring_capacity=2**32 - 1, app_name=b"forged",
    )  # fmt: skip
    with netprofd(tmp_path, segment_dir, daemon=FAST, env=env_for(implementation)) as d:
        d.wait_until(lambda: counted(d, "real") == 20, what="the real app")

        # Anyone may ask for every app's slowest requests, and export the forged one, many times over.
        def ask_everything() -> None:
            with contextlib.suppress(httpx.HTTPError):
                d.http.get(f"{PREFIX}/network-stats", params={"window": "all"}, timeout=1.0)
            with contextlib.suppress(httpx.HTTPError):
                d.http.get(f"{NP}/export/json", timeout=1.0)

        askers = [threading.Thread(target=ask_everything) for _ in range(10)]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        started = time.monotonic()
        stats = d.http.get(f"{PREFIX}/network-stats", params={"app": "real", "window": "all"}, timeout=PROMPT)
        assert stats.status_code == 200 and time.monotonic() - started < PROMPT
        export = d.http.get(f"{NP}/export/json", params={"app": "real"}, timeout=PROMPT)
        assert export.status_code == 200 and export.json()["count"] == 20
        samples = scrape(d)
        assert "forged" not in {a["app"] for a in d.stats()["applications"]}
        assert metric(samples, "netprofd_segments_refused") == 1
        assert metric(samples, "netprofd_segment_errors_total", reason="refused") == 1
        refused = lines_naming(d.log(), str(forged))
        assert len(refused) == 1 and "ring" in refused[0], refused


def test_segments_that_are_never_consistent_cost_the_tick_little(
    tmp_path: Path, segment_dir: Path, make_recorder: MakeRecorder, implementation: str
) -> None:
    """Forged segments whose live sequence counter is stuck odd (a writer
    forever inside an update), claiming a live process, and touched at every
    tick so that each is tried again: each cost the tick (on the event loop)
    a full second of waiting for a publish that never comes, and the API
    answered no one meanwhile."""
    real = make_recorder(app_name="real")
    send(real, 20)
    assert real.path is not None
    live = L.U64.unpack_from(real.path.read_bytes(), real.layout.live_offset)[0]
    forged = []
    for i in range(5):
        path = forge(real.path, segment_dir / f"stuck-{i}.npseg", app_name=b"stuck")
        with open(path, "r+b") as f:
            f.seek(real.layout.live_offset)
            f.write(L.U64.pack(live | 1))  # odd: inside an update, forever
        forged.append(path)
    stop = threading.Event()

    def touch() -> None:
        while not stop.wait(0.05):
            for path in forged:
                os.utime(path)

    toucher = threading.Thread(target=touch)
    toucher.start()
    try:
        with netprofd(tmp_path, segment_dir, daemon=FAST, env=env_for(implementation)) as d:
            d.wait_until(lambda: counted(d, "real") == 20, what="the real app")
            slowest = 0.0
            for _ in range(10):
                started = time.monotonic()
                d.http.get(f"{PREFIX}/network-stats", params={"app": "real", "slowest": "0"}, timeout=PROMPT)
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.1)
            assert slowest < 0.5, f"an API call waited {slowest:.2f} s behind the tick"
            send(real, 5)
            d.wait_until(lambda: counted(d, "real") == 25, what="the real app's next requests", timeout=3)
            samples = scrape(d)
            assert metric(samples, "netprofd_tick_duration_seconds") < 0.2
    finally:
        stop.set()
        toucher.join()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# A ring of 100,000 records, exported by 4 clients at once: read whole, that was
# 100 MB more in the daemon (an object per record, measured); a chunk at a
# time, 17 MB.
RING = 100_000
EXPORTERS = 4
GROWTH_MB = 50


def test_reading_large_rings_is_bounded_in_memory_and_never_starves_the_api(
    tmp_path: Path, segment_dir: Path, make_recorder: MakeRecorder, implementation: str
) -> None:
    """A ring as large as a writer may keep, exported by many clients at once:
    each export read the whole ring into memory (an object per record) in one
    worker thread, so the daemon's memory grew by hundreds of MB and every
    other call waited for a thread."""
    big = make_recorder(app_name="big", max_stored_requests=RING, max_memory_mb=64)
    small = make_recorder(app_name="small")
    rid = big.route_id("/work", "GET")
    now = time.monotonic_ns()
    for i in range(RING):
        big.record(rid, 200, now, now + 1000 + i, 10, 100)
    send(small, 20)
    with netprofd(tmp_path, segment_dir, daemon=FAST, env=env_for(implementation)) as d:
        assert d.proc is not None
        d.wait_until(lambda: counted(d, "big") == RING and counted(d, "small") == 20, what="both apps")
        before = peak_rss_mb(d.proc.pid)

        def export_big() -> None:
            with (
                contextlib.suppress(httpx.HTTPError),
                httpx.stream(
                    "GET",
                    f"{d.url}{NP}/export/ndjson",
                    params={"app": "big"},
                    headers=d.http.headers,
                    timeout=60,
                ) as response,
            ):
                for _ in response.iter_bytes():
                    pass

        exporters = [threading.Thread(target=export_big) for _ in range(EXPORTERS)]
        for exporter in exporters:
            exporter.start()
        time.sleep(0.3)
        waited = []
        for _ in range(5):
            started = time.monotonic()
            answer = d.http.get(f"{PREFIX}/network-stats", params={"app": "small"}, timeout=30)
            waited.append(time.monotonic() - started)
            assert answer.status_code == 200
        for exporter in exporters:
            exporter.join()
        grown = peak_rss_mb(d.proc.pid) - before
        assert grown < GROWTH_MB, f"the daemon's peak memory grew by {grown:.0f} MB for {EXPORTERS} exports"
        # (Generous: the exports' own formatting shares the CPU and the GIL on a busy machine.)
        assert max(waited) < 5.0, f"another app's stats waited {max(waited):.2f} s behind the exports"
        export = d.http.get(f"{NP}/export/json", params={"app": "big"}, timeout=60).json()
        assert export["count"] == RING
        indexes = [r["time"] for r in export["records"]]
        assert indexes == sorted(indexes), "oldest first"


# -- 4. nothing is removed before what it holds is durable ------------------------------------------


def fill(directory: Path) -> Path:
    """Take every free byte of the file system holding ``directory``."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    os.write(fd, bytes(size))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        (directory / "probe").write_bytes(b"x" * 8192)
    assert full.value.errno == errno.ENOSPC
    (directory / "probe").unlink(missing_ok=True)
    return filler


def test_an_unsavable_fold_keeps_the_segment_until_it_is_saved(
    tmp_path: Path, segment_dir: Path, implementation: str
) -> None:
    """The state directory full: a process that ends is folded, but its
    segment stays until the fold is saved; the totals survive restarts, and
    are never counted twice."""
    state = tmp_path / "netprofd-state"  # what the netprofd helper names it
    with mounted_tmpfs(state, "512k", mode="0700"):
        with netprofd(tmp_path, segment_dir, daemon=FAST, env=env_for(implementation)) as d:
            filler = fill(state)
            path = run_worker(segment_dir, "worker", 3406, implementation)
            d.wait_until(lambda: counted(d, "worker") == 3406, what="the ended process's requests")
            time.sleep(1.0)  # ten ticks, each retrying the save
            assert path.exists(), "the segment was removed although its fold was never saved"
            assert counted(d, "worker") == 3406
            samples = scrape(d)
            assert metric(samples, "netprofd_state_save_failures_total") >= 1
            assert metric(samples, "netprofd_segments_awaiting_save") == 1
            assert len(lines_naming(d.log(), "cannot save the retired totals")) == 1
        # A restart while the disk is still full: folded again, exactly once.
        with netprofd(tmp_path, segment_dir, daemon=FAST, env=env_for(implementation)) as d:
            assert counted(d, "worker") == 3406
            time.sleep(0.5)
            assert counted(d, "worker") == 3406 and path.exists()
            filler.unlink()  # room again: the next tick saves, then removes the segment
            d.wait_until(lambda: not path.exists(), what="the segment to be removed once saved")
            assert counted(d, "worker") == 3406
        with netprofd(tmp_path, segment_dir, daemon=FAST, env=env_for(implementation)) as d:
            assert counted(d, "worker") == 3406


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b'{"apps": {"worker": {"counters": {"requests": 5', id="truncated"),
        pytest.param(
            json.dumps(
                {
                    "apps": {
                        "worker": {
                            "counters": {"requests": 1, "overhead_histogram": []},
                            "routes": [
                                {
                                    "direction": 0,
                                    "method": "GET",
                                    "template": "/work",
                                    "max_ns": 1,
                                    "words": [[0, -3]],
                                }
                            ],
                        }
                    }
                }
            ).encode(),
            id="bad-row",
        ),
        pytest.param(b"\xff\xfe not json", id="binary"),
    ],
)
def test_a_corrupt_state_file_is_moved_aside_never_overwritten(
    tmp_path: Path, segment_dir: Path, content: bytes, implementation: str
) -> None:
    state = tmp_path / "netprofd-state"
    state.mkdir()
    (state / "retired.json").write_bytes(content)
    with netprofd(tmp_path, segment_dir, daemon=FAST, env=env_for(implementation)) as d:
        aside = list(state.glob("retired.json.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == content
        assert len(lines_naming(d.log(), "retired.json.corrupt-")) == 1
        run_worker(segment_dir, "worker", 12, implementation)
        d.wait_until(lambda: counted(d, "worker") == 12, what="the ended process")
    assert aside[0].read_bytes() == content
    saved = json.loads((state / "retired.json").read_text())
    assert "worker" in saved["apps"]


# -- the sums themselves, in both cores: a carry is detected, never wrapped ---------------------------

BIG = st.one_of(st.integers(0, 5), st.integers(2**64 - 5, 2**64 - 1), st.integers(0, 2**64 - 1))


def packed_of(words: Mapping[int, int], order: list[int] | None = None) -> bytes:
    """Packed words (the cores' format), in the given index order (default: ascending)."""
    idx = order if order is not None else sorted(words)
    vals = [words[i] for i in idx]
    return struct.pack("<II", len(idx), 0) + array("Q", vals).tobytes() + array("H", idx).tobytes()


def test_add_counts_refuses_a_carry_in_both_cores(core: Any) -> None:
    into = array("Q", [2**64 - 2, 7, 0])
    assert not core.add_counts(into, array("Q", [1, 0, 0])) is False  # exactly 2**64 - 1: fine
    assert list(into) == [2**64 - 1, 7, 0]
    assert core.add_counts(into, array("Q", [1, 1, 1])) is False  # one lane would carry
    assert list(into) == [2**64 - 1, 7, 0]  # unchanged, and no carry into the next lane


@settings(max_examples=300, deadline=None)
@given(
    into=st.lists(BIG, min_size=6, max_size=6),
    then=st.dictionaries(st.integers(0, 5), BIG, max_size=6),
    now=st.dictionaries(st.integers(0, 5), BIG, max_size=6),
    monotone=st.booleans(),
    shuffle=st.booleans(),
)
def test_replace_packed_is_exact_or_refused_alike_in_both_cores(
    into: list[int], then: dict[int, int], now: dict[int, int], monotone: bool, shuffle: bool
) -> None:
    """Every word checked before anything changes; the reason the same in
    both cores; the result the exact sum, never a wrapped one."""
    order = (lambda words: sorted(words, reverse=True)) if shuffle else sorted
    old, new = packed_of(then, order(then)), packed_of(now, order(now))
    results = {}
    for name in ("cython", "python"):
        words = array("Q", into)
        results[name] = (core_module(name).replace_packed(words, old, new, monotone), list(words))
    assert results["cython"] == results["python"]
    refused, words = results["python"]
    exact = [x - then.get(i, 0) + now.get(i, 0) for i, x in enumerate(into)]
    if refused is None:
        assert words == exact
        assert not monotone or all(now.get(i, 0) >= then.get(i, 0) for i in range(6))
    else:
        assert words == into
        assert refused in ("unsubtractable", "backwards", "overflow")
        assert (
            any(x < then.get(i, 0) for i, x in enumerate(into))
            or any(v > 2**64 - 1 for v in exact)
            or (monotone and any(now.get(i, 0) < then.get(i, 0) for i in range(6)))
        )


def _sums(n: int) -> list[RouteSums]:
    return [RouteSums(RouteKey(L.Direction.INBOUND, "GET", f"/r{i}")) for i in range(n)]


def test_replace_blocks_is_all_or_nothing_in_both_cores(core: Any) -> None:
    """A refused route leaves every route's sum as it was, the routes swapped
    before it included; the minimum's word may go down, no other."""
    block = core.PackedBlock
    first = tuple(block(1, 10, packed_of({L.R_COUNT: 1, L.R_MIN_NS: 10, L.R_MAX_NS: 10})) for _ in range(3))
    sums = _sums(3)
    assert core.replace_blocks((), first, sums) is None
    before = [(s.words.tobytes(), s.max_ns) for s in sums]
    # Routes 0 and 1 move forward (route 1's minimum down), route 2's count goes back.
    moved = (
        block(2, 20, packed_of({L.R_COUNT: 2, L.R_MIN_NS: 10, L.R_MAX_NS: 20})),
        block(2, 10, packed_of({L.R_COUNT: 2, L.R_MIN_NS: 3, L.R_MAX_NS: 10})),
        block(0, 10, packed_of({L.R_MIN_NS: 10, L.R_MAX_NS: 10})),
    )
    assert core.replace_blocks(first, moved, sums) == (2, "backwards")
    assert [(s.words.tobytes(), s.max_ns) for s in sums] == before
    assert core.replace_blocks(first[:2], moved[:2], sums) is None
    assert [s.words[L.R_COUNT] for s in sums] == [2, 2, 1] and sums[0].max_ns == 20
    # A second process of the same routes whose counts would carry past 2**64 - 1.
    huge = (block(2**64 - 2, 5, packed_of({L.R_COUNT: 2**64 - 2})),)
    assert core.replace_blocks((), huge, sums) == (0, "overflow")
    assert sums[0].words[L.R_COUNT] == 2


def test_saturated_merges_never_go_backwards() -> None:
    """Sums that are only ever added to (the retired totals, and the apps'
    totals made from them) stop at 2**64 - 1 rather than wrap."""
    from netprof_daemon.totals import Totals

    key = RouteKey(L.Direction.INBOUND, "GET", "/work")
    a, b = Totals(), Totals()
    for totals, count in ((a, 2**63), (b, 2**63 + 7)):
        route = totals.sums[key] = RouteSums(key)
        route.words[L.R_COUNT] = count
        totals.counters.requests = count
    merged = Totals()
    merged.add(a)
    merged.add(b)
    assert merged.sums[key].count == 2**64 - 1
    assert merged.counters.requests == 2**64 + 7  # Python ints: exact
    assert _recorder_py.MASK64 == 2**64 - 1
