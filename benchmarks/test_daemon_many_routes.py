"""netprofd with many routes (issue 15): /metrics and the windows, for one
application of 4096 routes, each with ~30 requests.

The baseline is what /metrics did before: prometheus_client's
``generate_latest`` over the whole collector, on the event loop, sent as it is.
Ours: the event loop takes only the families that are not per route (the
route families are rendered in a worker thread, a chunk of routes at a time,
gzipped), so

* ``test_metrics_baseline_on_loop`` ÷ ``test_metrics_ours_on_loop``: how much
  less a scrape blocks the loop;
* ``test_metrics_baseline_on_loop`` ÷ ``test_metrics_ours_in_thread``: the
  scrape's whole CPU, before and now (the chunks and gzip cost a little);
* bytes sent (``extra_info``), plain ÷ gzipped, to a scraper that accepts gzip
  (Prometheus does).

The windows: ``test_window_60s_counts`` is what the alert rules take of them
at every tick (a 1-minute window of every route, counts only), and
``test_window_checkpoint`` the checkpoint kept every 5 s (their memory per
route is in ``extra_info``). ``test_ratios`` prints the ratios.

    pytest benchmarks/test_daemon_many_routes.py --benchmark-json=many.json -s
"""

from __future__ import annotations

import gzip
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from netprof_core import ProfilingConfig, Recorder
from netprof_daemon.config import load_daemon_config
from netprof_daemon.daemon import Daemon
from netprof_daemon.metrics import NetprofCollector, render_gzipped
from netprof_daemon.plugins import NotifierManager
from netprof_daemon.store import SegmentStore
from netprof_daemon.windows import FINE_SPACING, WindowHistory

ROUTES = 4096
Routes = tuple[
    SegmentStore, Recorder, list[int], Path
]  # the fixture: a store, its writer, its routes, the dir
S = 1_000_000_000
MEDIANS: dict[str, float] = {}
INFO: dict[str, Any] = {}


def _daemon(store_dir: Path) -> Daemon:
    """A real Daemon over the benchmark's segments, not started (no alerting,
    no listener): what /metrics reads of it."""
    config = store_dir.parent / f"{store_dir.name}.toml"
    config.write_text(
        f'[network_profiling]\nsegment_dir = "{store_dir}"\nmax_memory_mb = 256\n'
        f'[daemon]\nstate_dir = "{store_dir.parent / (store_dir.name + "-state")}"\n',
        encoding="utf-8",
    )
    settings = load_daemon_config(config)
    daemon = Daemon(settings, NotifierManager(settings.notifiers))
    daemon.store.refresh()
    daemon.apps = daemon.store.apps()
    return daemon


@pytest.fixture(scope="module")
def many_routes(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Routes]:
    directory = tmp_path_factory.mktemp("many-routes")
    recorder = Recorder(
        ProfilingConfig(
            segment_dir=str(directory), app_name="many", max_routes=ROUTES, max_memory_mb=256,
            log_slow_requests=False,
        )
    )  # fmt: skip
    routes = [recorder.route_id(f"/api/v1/resource{i}/{{id}}") for i in range(ROUTES)]
    rng = random.Random(15)
    for _ in range(30):
        for route in routes:
            start = time.monotonic_ns()
            recorder.record(
                route, 200 if rng.random() < 0.97 else 500, start, start + int(rng.lognormvariate(15, 1.5))
            )
    store = SegmentStore(directory)
    store.refresh()
    yield store, recorder, routes, directory
    store.close()
    recorder.close(remove=True)


def _keep(name: str, benchmark: Any) -> None:
    MEDIANS[name] = benchmark.stats.stats.median


def test_metrics_baseline_on_loop(benchmark: Any, many_routes: Routes) -> None:
    daemon = _daemon(many_routes[3])
    collector = NetprofCollector(daemon)
    body = benchmark(generate_latest, collector)
    INFO["plain_bytes"] = len(body)
    benchmark.extra_info["bytes"] = len(body)
    _keep("baseline_on_loop", benchmark)


def test_metrics_ours_on_loop(benchmark: Any, many_routes: Routes) -> None:
    daemon = _daemon(many_routes[3])
    others = NetprofCollector(daemon, routes=False)
    benchmark(lambda: list(others.collect()))
    _keep("ours_on_loop", benchmark)


def test_metrics_ours_in_thread(benchmark: Any, many_routes: Routes) -> None:
    daemon = _daemon(many_routes[3])
    others = list(NetprofCollector(daemon, routes=False).collect())
    body = benchmark(lambda: render_gzipped([daemon.apps], others))
    INFO["gzip_bytes"] = len(body)
    benchmark.extra_info["bytes"] = len(body)
    assert gzip.decompress(body).startswith(b"# HELP network_profiling_requests_total")
    _keep("ours_in_thread", benchmark)  # (its text is generate_latest's: tests/test_trust_many_routes.py)


def _history(store: SegmentStore, recorder: Recorder, routes: list[int], seconds: int) -> WindowHistory:
    """A history of ``seconds`` ticks, every route recording at each."""
    history = WindowHistory()
    rng = random.Random(1)
    for second in range(seconds):
        for route in routes:
            start = time.monotonic_ns()
            recorder.record(route, 200, start, start + int(rng.lognormvariate(15, 1.5)))
        store.refresh()
        history.add((10_000 + second) * S, store.apps())
    return history


def test_window_60s_counts(benchmark: Any, many_routes: Routes) -> None:
    store, recorder, routes, _ = many_routes
    history = _history(store, recorder, routes, 90)
    apps, now = store.apps(), (10_000 + 89) * S
    benchmark(lambda: history.window(apps, now, 60.0, histograms=False))
    INFO["window_bytes_per_route_90s"] = history.nbytes / ROUTES
    benchmark.extra_info["window_bytes_per_route_after_90s"] = round(history.nbytes / ROUTES)
    _keep("window_60s_counts", benchmark)


def test_window_checkpoint(benchmark: Any, many_routes: Routes) -> None:
    store, recorder, routes, _ = many_routes
    history = _history(store, recorder, routes, 10)
    rng = random.Random(2)
    at = [20_000 * S]

    def one_more_second() -> tuple[tuple[()], dict[str, Any]]:
        for route in routes:
            start = time.monotonic_ns()
            recorder.record(route, 200, start, start + int(rng.lognormvariate(15, 1.5)))
        store.refresh()
        at[0] += int(FINE_SPACING * S)  # each call keeps a checkpoint
        return (), {}

    benchmark.pedantic(
        lambda: history.add(at[0], store.apps()), setup=one_more_second, rounds=15, iterations=1
    )
    _keep("window_checkpoint", benchmark)


def test_ratios() -> None:
    """The side-by-side figures of this module (run it with -s to see them)."""
    m = MEDIANS
    lines = [f"{ROUTES} routes, one application"]
    if {"baseline_on_loop", "ours_on_loop", "ours_in_thread"} <= m.keys():
        loop = m["baseline_on_loop"] / m["ours_on_loop"]
        lines.append(
            f"/metrics on the event loop: baseline {m['baseline_on_loop'] * 1e3:.0f} ms, "
            f"ours {m['ours_on_loop'] * 1e3:.2f} ms: {loop:.0f}x less"
        )
        lines.append(
            f"/metrics CPU in all: baseline {m['baseline_on_loop'] * 1e3:.0f} ms, ours (thread) "
            f"{m['ours_in_thread'] * 1e3:.0f} ms: {m['baseline_on_loop'] / m['ours_in_thread']:.2f}x"
        )
    if {"plain_bytes", "gzip_bytes"} <= INFO.keys():
        lines.append(
            f"/metrics bytes: plain {INFO['plain_bytes'] / 2**20:.1f} MiB, gzipped "
            f"{INFO['gzip_bytes'] / 2**20:.2f} MiB: {INFO['plain_bytes'] / INFO['gzip_bytes']:.0f}x fewer"
        )
    if "window_60s_counts" in m:
        lines.append(f"a 1-minute window of every route, counts only: {m['window_60s_counts'] * 1e3:.1f} ms")
    if "window_checkpoint" in m:
        lines.append(f"a checkpoint (every {FINE_SPACING:g} s): {m['window_checkpoint'] * 1e3:.1f} ms")
    if "window_bytes_per_route_90s" in INFO:
        lines.append(f"the windows after 90 s: {INFO['window_bytes_per_route_90s'] / 1024:.1f} KiB a route")
    print("\n" + "\n".join(lines))
