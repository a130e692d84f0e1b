"""Issue 15, "a process with many routes": a daemon reading processes of
4096 routes each must keep its memory bounded, serve /metrics without
blocking its event loop, and keep its windows exact.

The daemon tests run real writer processes (a Recorder with max_routes=4096,
every route recording at every tick) and the real netprofd. The windows'
tests use real segments with the checkpoint times given explicitly (minutes
of history without waiting for them).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import gzip
import random
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from netprof_core import Histogram, Recorder
from netprof_daemon.store import SegmentStore
from netprof_daemon.windows import WindowHistory
from tests.apps.netprofd import NP, Netprofd, daemon_env, netprofd
from tests.apps.servers import ROOT

S = 1_000_000_000  # ns
MiB = 2**20

# -- the windows: exact, and bounded ------------------------------------------

STATUSES = (200, 200, 200, 201, 404, 500, 503)


class Timeline:
    """Requests recorded second by second into real segments, a checkpoint
    after each second, and the truth: every request with its second."""

    def __init__(
        self, make_recorder: Callable[..., Recorder], segment_dir: Path, history: WindowHistory
    ) -> None:
        self.recorder = make_recorder(app_name="exact", max_routes=16, log_slow_requests=False)
        self.store = SegmentStore(segment_dir)
        self.history = history
        self.templates: dict[int, str] = {}
        self.truth: list[tuple[int, int, int, int]] = []  # (second, route id, duration ns, status)
        self.second = 0

    def route(self, template: str) -> int:
        route = self.recorder.route_id(template)
        self.templates[route] = template
        return route

    def tick(self, requests: list[tuple[int, int, int]]) -> None:
        """One second: ``requests`` as (route id, duration ns, status), then a checkpoint."""
        self.second += 1
        for route, duration, status in requests:
            start = time.monotonic_ns()
            self.recorder.record(route, status, start, start + duration)
            self.truth.append((self.second, route, duration, status))
        self.store.refresh()
        self.history.add(self.second * S, self.store.apps())

    def check(self, seconds: float) -> float:
        """The window of the last ``seconds`` against the truth, bucket by
        bucket; the span it says it covers."""
        window = self.history.window(self.store.apps(), self.second * S, seconds)["exact"]
        since = self.second - window.seconds  # the base checkpoint's second
        assert since == int(since)
        expected: dict[str, list[tuple[int, int]]] = {}
        largest_before: dict[str, int] = {}
        for second, route, duration, status in self.truth:
            template = self.templates[route]
            if second > since:
                expected.setdefault(template, []).append((duration, status))
            else:
                largest_before[template] = max(largest_before.get(template, 0), duration)
        shown = {key.template: route for key, route in window.routes.items() if route.count}
        assert set(shown) == set(expected), seconds
        for template, requests in expected.items():
            got, durations = shown[template], [d for d, _ in requests]
            assert got.count == len(requests), (seconds, template)
            assert got.errors == sum(1 for _, s in requests if s >= 500)
            assert got.status_classes[2] == sum(1 for _, s in requests if 200 <= s < 300)
            assert got.status_classes[4] == sum(1 for _, s in requests if 400 <= s < 500)
            assert got.sum_ns == sum(durations)
            assert got.histogram.counts == Histogram.from_durations(durations).counts, (seconds, template)
            # The window's largest is told when the largest ever grew within it (else unknown).
            grew = max(durations) > largest_before.get(template, 0)
            assert got.histogram.max_ns == (max(durations) if grew else None), (seconds, template)
        assert window.counters.requests == sum(len(r) for r in expected.values())
        return window.seconds


def test_windows_stay_exact_through_thinning_and_expiry(
    make_recorder: Callable[..., Recorder], segment_dir: Path
) -> None:
    """25 minutes of uneven traffic (a busy route, a rare one, one that goes
    quiet, one new after 10 minutes), a checkpoint a second: every window,
    of every length, holds exactly the requests after its base checkpoint,
    histograms bucket by bucket, and covers what it was asked for plus at
    most one checkpoint spacing (and a second of tick)."""
    from netprof_daemon import windows

    fine_spacing = getattr(windows, "FINE_SPACING", 1.0)  # (before: a checkpoint every tick)
    coarse_spacing, fine_seconds = windows.COARSE_SPACING, windows.FINE_SECONDS

    timeline = Timeline(make_recorder, segment_dir, WindowHistory())
    busy, rare, quiet = (timeline.route(t) for t in ("/busy", "/rare", "/quiet"))
    late = None
    rng = random.Random(15)
    checked = 0
    for second in range(1, 25 * 60 + 1):
        if second == 600:
            late = timeline.route("/late")
        requests = [
            (busy, int(rng.lognormvariate(15, 1.5)), rng.choice(STATUSES)) for _ in range(rng.randrange(6))
        ]
        if rng.random() < 0.05:
            requests.append((rare, rng.randrange(1_000, 10**10), rng.choice(STATUSES)))
        if second < 400:
            requests.append((quiet, rng.randrange(10**5, 10**8), 200))
        if late is not None:
            requests.append((late, rng.randrange(10**6, 10**7), rng.choice(STATUSES)))
        timeline.tick(requests)
        if second % 83 == 0 or second in (1, 2, 7, 61, 299, 901, 1499):
            for asked in (30.0, 60.0, 121.0, 300.0, 900.0, 1000.0):
                covered = timeline.check(asked)
                assert covered <= windows.KEEP_SECONDS  # longer than kept (1000 s): what is kept
                if second > asked + coarse_spacing + fine_spacing and asked <= max(windows.WINDOWS.values()):
                    assert covered >= asked
                    spacing = fine_spacing if asked <= fine_seconds - fine_spacing - 1 else coarse_spacing
                    assert covered <= asked + spacing + fine_spacing + 1, (second, asked, covered)
                checked += 1
    assert checked > 100
    timeline.store.close()


def test_windows_over_their_budget_drop_the_oldest_and_say_so(
    make_recorder: Callable[..., Recorder], segment_dir: Path
) -> None:
    """Routes with requests spread over every bucket, and a small budget: the
    checkpoints never hold more than it, the oldest go first, the 15 m
    window says how much it covers (less), and what it shows stays exact."""
    history = WindowHistory(bytes_per_route=64 * 1024, min_budget_bytes=0)
    timeline = Timeline(make_recorder, segment_dir, history)
    routes = [timeline.route(f"/spread/{i}") for i in range(4)]
    rng = random.Random(7)
    for _ in range(20 * 60):
        timeline.tick([(r, int(rng.uniform(3, 40) ** 6), 200) for r in routes for _ in range(40)])
        assert history.checkpoint_bytes <= history.budget_bytes
    assert history.trimmed > 0
    assert history.covered_seconds < 900
    covered = timeline.check(900.0)
    assert covered == pytest.approx(history.covered_seconds, abs=1)
    timeline.store.close()


def deep_size(root: object, shared: object) -> int:
    """Bytes of the objects reachable from ``root`` and not from ``shared``
    (what ``root`` holds of its own), by sys.getsizeof; classes, modules and
    functions are not followed."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)

    def reachable(start: object, seen: set[int]) -> Iterator[object]:
        stack = [start]
        while stack:
            obj = stack.pop()
            if id(obj) in seen or isinstance(obj, skip):
                continue
            seen.add(id(obj))
            yield obj
            stack.extend(gc.get_referents(obj))

    excluded: set[int] = set()
    for _ in reachable(shared, excluded):
        pass
    return sum(sys.getsizeof(obj) for obj in reachable(root, excluded))


def test_window_memory_does_not_grow_with_ticks(
    make_recorder: Callable[..., Recorder], segment_dir: Path
) -> None:
    """512 routes, each with a request every second, for 400 seconds of
    checkpoints: what the windows hold of their own stays within their
    stated bound, the budget plus each route's latest histogram. (Before: a
    checkpoint of every changed route at every tick, 1.6 KB a route a tick,
    over 100 MB here.)"""
    from netprof_daemon import windows

    recorder = make_recorder(app_name="many", max_routes=512, max_memory_mb=32, log_slow_requests=False)
    routes = [recorder.route_id(f"/r/{i}") for i in range(512)]
    store = SegmentStore(segment_dir)
    history = WindowHistory()
    rng = random.Random(3)
    for second in range(400):
        for route in routes:
            start = time.monotonic_ns()
            recorder.record(route, 200, start, start + int(rng.lognormvariate(15, 1.5)))
        store.refresh()
        history.add(second * S, store.apps())
    held = deep_size(history, (store, store.apps(), windows))
    per_route = getattr(windows, "LATEST_MAX_BYTES", 21_300)
    budget = max(
        getattr(windows, "MIN_BUDGET_BYTES", 32 * MiB), getattr(windows, "BYTES_PER_ROUTE", 32 * 1024) * 512
    )
    assert held <= budget + 512 * per_route, f"{held / MiB:.1f} MiB held by the windows"
    print(f"\nthe windows of 512 busy routes hold {held / MiB:.1f} MiB after 400 s")
    if hasattr(history, "nbytes"):  # what /metrics says (netprofd_window_memory_bytes) is about right
        assert history.nbytes == pytest.approx(held, rel=0.5)
    store.close()


def test_the_chunked_exposition_is_prometheus_clients_text(
    make_recorder: Callable[..., Recorder], segment_dir: Path
) -> None:
    """/metrics renders the per-route families a chunk of routes at a time:
    the text must be what prometheus_client's generate_latest makes of the
    whole families (more routes than a chunk, labels that need escaping)."""
    from prometheus_client import generate_latest

    from netprof_daemon.metrics import ROUTES_PER_CHUNK, _Families, render_gzipped, route_families

    recorder = make_recorder(app_name="chunks", max_routes=1300, max_memory_mb=64, log_slow_requests=False)
    rng = random.Random(5)
    for i in range(1300):
        route = recorder.route_id(f'/items/{i}/"quoted"\\back' if i % 97 == 0 else f"/items/{i}/{{id}}")
        for _ in range(rng.randrange(1, 4)):
            start = time.monotonic_ns()
            recorder.record(route, rng.choice(STATUSES), start, start + rng.randrange(10**5, 10**9))
    store = SegmentStore(segment_dir)
    store.refresh()
    apps = store.apps()
    assert sum(len(state.routes) for state in apps.values()) > 2 * ROUTES_PER_CHUNK
    whole = generate_latest(_Families(list(route_families(apps))))
    assert gzip.decompress(render_gzipped([apps], [])) == whole
    store.close()


# -- a real daemon, real writers ------------------------------------------------

ROUTES = 4096
_WRITER = r"""
import sys, time, random
from netprof_core import ProfilingConfig, Recorder
directory, apps, period = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])
recorders = [Recorder(ProfilingConfig(segment_dir=directory, app_name=app, max_routes=4096,
                                      max_memory_mb=256, max_stored_requests=1000, log_slow_requests=False))
             for app in apps]
routes = [[r.route_id(f"/api/v1/resource{i}/{{id}}") for i in range(4096)] for r in recorders]
rng = random.Random(1)
print("ready", flush=True)
while True:  # every route of every app, once a period
    began = time.monotonic()
    for recorder, ids in zip(recorders, routes):
        for route in ids:
            start = time.monotonic_ns()
            recorder.record(route, 200 if rng.random() < 0.97 else 500, start,
                            start + int(rng.lognormvariate(15, 1.5)), 120, 2400)
    time.sleep(max(0.0, period - (time.monotonic() - began)))
"""


@contextlib.contextmanager
def writers(segment_dir: Path, apps: list[str], period: float) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(segment_dir), ",".join(apps), str(period)],
        cwd=ROOT, env=daemon_env(None), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def wait_for_requests(daemon: Netprofd, apps: list[str], at_least: int) -> None:
    def counted() -> bool:
        found = daemon.get(f"{NP}/production-metrics").json()["applications"]
        requests = {entry["app"]: entry["requests"] for entry in found}
        return all(requests.get(app, 0) >= at_least for app in apps)

    daemon.wait_until(counted, timeout=90, what=f"{at_least} requests of {apps}")


# What the daemon may hold, as docs/NETWORK_PROFILING.md states it ("Memory of
# netprofd"): a fixed part, and per route tracked its current totals (the sums
# over processes and the tick's statistics, about 70 KiB with the allocator's
# slack) and its windows (at most the budget, 32 KiB on average, and the
# latest histogram, 21 KiB at most).
DAEMON_FIXED = 64 * MiB
PER_ROUTE = 128 * 1024
WATCH_SECONDS = 40


@pytest.mark.c_extension  # (the daemon of a production host: the pure core's takes seconds a tick here)
def test_daemon_memory_stays_bounded_with_4096_busy_routes(tmp_path: Path) -> None:
    """4096 routes, every one recording every 0.2 s, netprofd ticking every
    0.1 s, for 40 s after a warm-up: its RSS never passes the stated bound
    (64 MiB + 128 KiB a route: 576 MiB). Before: a checkpoint of every route
    at every tick, and the daemon grew by about 8 MiB a second, past the bound
    within 40 s; now checkpoints come every 5 s whatever the tick, and hold
    only what changed (measured: 330-430 MiB; the windows' own bound is
    test_window_memory_does_not_grow_with_ticks's)."""
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    bound = DAEMON_FIXED + ROUTES * PER_ROUTE
    with (
        writers(segment_dir, ["busy"], 0.2),
        netprofd(
            tmp_path, segment_dir, profiling={"max_memory_mb": 256}, daemon={"tick_seconds": 0.1}
        ) as daemon,
    ):
        assert daemon.proc is not None
        wait_for_requests(daemon, ["busy"], 5 * ROUTES)
        peak = 0
        samples = []
        started = time.monotonic()
        while time.monotonic() - started < WATCH_SECONDS:
            rss = rss_bytes(daemon.proc.pid)
            peak = max(peak, rss)
            samples.append(round(rss / MiB))
            assert rss <= bound, (
                f"netprofd RSS {rss / MiB:.0f} MiB > {bound / MiB:.0f} MiB; samples {samples}"
            )
            time.sleep(0.5)

        health = daemon.get("/healthz").json()
        assert health["ticks"] > 30, health  # it did tick all along (at most a second each)
    print(
        f"\nnetprofd RSS over {WATCH_SECONDS} s with {ROUTES} busy routes: peak {peak / MiB:.0f} MiB; samples {samples[::10]}"
    )


@pytest.fixture(scope="module")
def two_busy_apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Netprofd]:
    """Two apps of 4096 busy routes each (a 25 MB exposition), a daemon
    ticking every 2 s (the loop idle in between)."""
    tmp = tmp_path_factory.mktemp("scrape")
    segment_dir = tmp / "segments"
    segment_dir.mkdir()
    with (
        writers(segment_dir, ["shop", "search"], 1.0),
        netprofd(tmp, segment_dir, profiling={"max_memory_mb": 256}, daemon={"tick_seconds": 2.0}) as daemon,
    ):
        wait_for_requests(daemon, ["shop", "search"], ROUTES)
        yield daemon


ANSWERED_DURING_A_SCRAPE = 5


def test_healthz_answers_while_metrics_of_many_routes_is_scraped(two_busy_apps: Netprofd) -> None:
    """/metrics of 8192 routes is scraped (25 MB of text, seconds to make);
    /healthz, asked every 20 ms from just after the scrape, answers again and
    again while the scrape is under way (a tick may hold it up, not the
    scrape). Before: the exposition ran on the event loop, and no other
    request was answered until it was done (one sent before the scrape's was
    read may have been: hence more than a few are asked for)."""
    daemon = two_busy_apps
    scrape_done = threading.Event()
    answered_during: list[int] = []

    def poll_healthz() -> None:
        with httpx.Client(base_url=daemon.url, timeout=60) as client:
            while not scrape_done.is_set():
                status = client.get("/healthz").status_code
                if not scrape_done.is_set():
                    answered_during.append(status)
                time.sleep(0.02)

    with httpx.Client(base_url=daemon.url, timeout=120) as client:
        scrape = concurrent.futures.ThreadPoolExecutor(1).submit(client.get, "/metrics")
        time.sleep(0.1)  # (the scrape's request sent first)
        poller = threading.Thread(target=poll_healthz)
        poller.start()
        try:
            response = scrape.result()
        finally:
            scrape_done.set()
            poller.join()
    assert response.status_code == 200
    assert len(answered_during) >= ANSWERED_DURING_A_SCRAPE and set(answered_during) == {200}, answered_during
    print(f"\n/healthz answered {len(answered_during)} times during a scrape of 8192 routes")
    assert response.headers["Content-Encoding"] == "gzip"  # httpx asks for it, as Prometheus does
    text = response.text
    for app in ("shop", "search"):
        assert text.count(f'network_profiling_slow_requests_total{{app="{app}"') == ROUTES


def test_a_burst_of_scrapes_costs_one_render(two_busy_apps: Netprofd) -> None:
    """Six scrapes at once (gzip or not) get the same exposition, made once:
    a burst of scrapers cannot multiply the work. Before: each rendered its
    own (and each blocked the loop)."""
    daemon = two_busy_apps
    ticks = daemon.get("/healthz").json()["ticks"]  # after a new tick: nothing rendered for it yet
    daemon.wait_until(lambda: daemon.get("/healthz").json()["ticks"] > ticks, what="a new tick")

    def scrape(accept: str) -> httpx.Response:
        with httpx.Client(base_url=daemon.url, timeout=120) as client:
            return client.get("/metrics", headers={"Accept-Encoding": accept})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(scrape, ["gzip", "identity", "gzip", "gzip, deflate", "identity", "*;q=0"]))
    assert [r.status_code for r in responses] == [200] * 6
    bodies = {r.content for r in responses}  # (httpx decodes the gzipped ones)
    assert len(bodies) == 1
    assert b'network_profiling_requests_total{app="search"' in bodies.pop()
    encodings = [r.headers.get("Content-Encoding") for r in responses]
    assert encodings == ["gzip", None, "gzip", "gzip", None, None]
