"""netprofd reading many processes, beside prometheus_client's multiprocess
mode reading the same number of per-process files.

For N = 8 and 64 processes, each with 2 000 requests over 5 routes:

* ``test_daemon_cold_snapshot``: a new store maps every segment, takes a
  consistent snapshot of each and sums them per application and route (what
  netprofd does at start, and the CLI every time);
* ``test_daemon_tick``: the daemon's steady tick when every process recorded
  since the last one (idle processes cost one load each, and are skipped),
  on one of its routes; ``test_daemon_tick_all_routes``: on every route;
* ``test_multiprocess_collector``: ``MultiProcessCollector.collect()`` over N
  ``histogram_<pid>.db`` files holding the same requests in a labelled
  Histogram (what a user of prometheus_client's multiprocess mode scrapes).

The daemon process itself (RSS with 64 segments, CPU of a 1 s tick) is
measured in ``test_daemon_process_footprint``; its figures go to extra_info.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, values
from prometheus_client import Histogram as PromHistogram
from prometheus_client.multiprocess import MultiProcessCollector

from netprof_core import ProfilingConfig, Recorder
from netprof_daemon.store import SegmentStore

RECORDS = 2000
ROUTES = [f"/api/v1/resource{i}/{{id}}" for i in range(5)]
PROCESS_COUNTS = [8, 64]
ROOT = Path(__file__).resolve().parents[1]


def _durations(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [int(rng.lognormvariate(16, 1)) for _ in range(RECORDS)]  # ~9 ms median, ns


@pytest.fixture(scope="module", params=PROCESS_COUNTS, ids=lambda n: f"{n}procs")
def segments(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, list[Recorder]]]:
    n = request.param
    directory = tmp_path_factory.mktemp(f"segments{n}")
    recorders = []
    for p in range(n):
        recorder = Recorder(
            ProfilingConfig(segment_dir=str(directory), app_name="bench", max_stored_requests=RECORDS)
        )
        ids = [recorder.route_id(route) for route in ROUTES]
        for i, duration in enumerate(_durations(p)):
            start = time.monotonic_ns()
            recorder.record(ids[i % len(ids)], 200 if i % 50 else 500, start, start + duration, 120, 2400)
        recorders.append(recorder)
    yield directory, recorders
    for recorder in recorders:
        recorder.close(remove=True)


@pytest.fixture(scope="module", params=PROCESS_COUNTS, ids=lambda n: f"{n}procs")
def multiproc_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    n = request.param
    directory = tmp_path_factory.mktemp(f"prom{n}")
    saved_class, saved_env = values.ValueClass, os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    try:
        for p in range(n):
            # One file per "process", as n workers would write them.
            values.ValueClass = values.MultiProcessValue(process_identifier=lambda p=p: 10_000 + p)
            hist = PromHistogram(
                "http_request_duration_seconds",
                "d",
                ["route", "method", "status"],
                registry=CollectorRegistry(),
            )
            for i, duration in enumerate(_durations(p)):
                hist.labels(ROUTES[i % len(ROUTES)], "GET", "200" if i % 50 else "500").observe(
                    duration / 1e9
                )
    finally:
        values.ValueClass = saved_class
        if saved_env is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved_env
    yield directory


def test_daemon_cold_snapshot(benchmark, segments) -> None:
    directory, recorders = segments

    def snapshot_and_sum() -> int:
        store = SegmentStore(directory)
        try:
            store.refresh()
            apps = store.apps()
        finally:
            store.close()
        return apps["bench"].counters.requests

    assert benchmark(snapshot_and_sum) == RECORDS * len(recorders)


def test_daemon_tick(benchmark, segments) -> None:
    directory, recorders = segments
    store = SegmentStore(directory)
    store.refresh()
    route = recorders[0].route_id(ROUTES[0])

    def touch_every_segment() -> tuple[tuple[()], dict[str, object]]:
        for recorder in recorders:
            start = time.monotonic_ns()
            recorder.record(route, 200, start, start + 5_000_000)
        return (), {}

    def tick() -> None:
        store.refresh()
        store.apps()

    benchmark.pedantic(tick, setup=touch_every_segment, rounds=30, iterations=1)
    assert store.apps()["bench"].counters.requests >= RECORDS * len(recorders)
    store.close()


def test_daemon_tick_all_routes(benchmark, segments) -> None:
    """The tick when every route of every process recorded since the last one."""
    directory, recorders = segments
    store = SegmentStore(directory)
    store.refresh()
    routes = [[recorder.route_id(route) for route in ROUTES] for recorder in recorders]

    def touch_every_route() -> tuple[tuple[()], dict[str, object]]:
        for recorder, ids in zip(recorders, routes):
            for route in ids:
                start = time.monotonic_ns()
                recorder.record(route, 200, start, start + 5_000_000)
        return (), {}

    def tick() -> None:
        store.refresh()
        store.apps()

    benchmark.pedantic(tick, setup=touch_every_route, rounds=30, iterations=1)
    store.close()


def test_multiprocess_collector(benchmark, multiproc_dir) -> None:
    collector = MultiProcessCollector(None, path=str(multiproc_dir))

    def collect() -> float:
        families = list(collector.collect())
        (hist,) = [f for f in families if f.name == "http_request_duration_seconds"]
        return sum(s.value for s in hist.samples if s.name.endswith("_count"))

    expected = RECORDS * len(list(multiproc_dir.glob("histogram_*.db")))
    assert benchmark(collect) == expected


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("n", PROCESS_COUNTS, ids=lambda n: f"{n}procs")
def test_daemon_process_footprint(benchmark, n: int, tmp_path: Path) -> None:
    """A real netprofd (tick 1 s) over n segments that a writer process keeps
    recording into: its RSS, and its CPU over 10 s (a share of one core)."""
    import httpx

    from tests.apps.netprofd import daemon_env, netprofd_argv, write_daemon_config
    from tests.apps.servers import free_port

    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(segment_dir), str(n)], cwd=ROOT, env=daemon_env(None)
    )
    port = free_port()
    config = write_daemon_config(
        tmp_path / "d.toml", segment_dir, tmp_path / "state", port, daemon={"tick_seconds": 1.0}
    )
    daemon = subprocess.Popen(netprofd_argv(config), cwd=ROOT, env=daemon_env(), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while len(list(segment_dir.glob("*.npseg"))) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": "Bearer test-key-0123456789abcdef"}
        while time.monotonic() < deadline:
            try:
                stats = httpx.get(
                    f"{url}/api/v1/debug/network-profiling/production-metrics", headers=headers
                ).json()
                if stats["applications"] and stats["applications"][0]["process_count"] == n:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        # Each API call once, the heaviest (stats with the slowest requests, an export) included.
        httpx.get(f"{url}/api/v1/debug/network-stats", headers=headers)
        httpx.get(f"{url}/api/v1/debug/network-profiling/export/ndjson", headers=headers)
        httpx.get(f"{url}/metrics")
        cpu_before, wall_before = _cpu_seconds(daemon.pid), time.monotonic()
        benchmark.pedantic(lambda: time.sleep(10), rounds=1, iterations=1)
        cpu, wall = _cpu_seconds(daemon.pid) - cpu_before, time.monotonic() - wall_before
        rss_mib = _rss_kib(daemon.pid) / 1024
        benchmark.extra_info.update(
            {
                "processes": n,
                "daemon_rss_mib": round(rss_mib, 1),
                "daemon_cpu_percent_of_core": round(100 * cpu / wall, 2),
            }
        )
        print(
            f"\n{n} segments: netprofd RSS {rss_mib:.1f} MiB, CPU {100 * cpu / wall:.2f} % of a core at a 1 s tick"
        )
    finally:
        for proc in (daemon, writer):
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)


_WRITER = """
import sys, time
from netprof_core import ProfilingConfig, Recorder
directory, n = sys.argv[1], int(sys.argv[2])
recorders = [Recorder(ProfilingConfig(segment_dir=directory, app_name="bench", max_stored_requests=2000)) for _ in range(n)]
routes = [[r.route_id(f"/api/v1/resource{i}/{{id}}") for i in range(5)] for r in recorders]
i = 0
while True:  # about 100 requests a second into each segment
    for recorder, ids in zip(recorders, routes):
        start = time.monotonic_ns()
        recorder.record(ids[i % 5], 200, start, start + 7_000_000, 120, 2400)
    i += 1
    time.sleep(0.01)
"""
