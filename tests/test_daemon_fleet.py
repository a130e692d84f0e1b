"""netprofd over a pre-forked app: gunicorn with two uvicorn workers, a worker
killed with SIGKILL, the daemon restarted, and /metrics read by the real
promtool and a real Prometheus server."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.apps.netprofd import NP, Netprofd, netprofd
from tests.apps.servers import (
    REQUEST_TIMEOUT,
    Server,
    free_port,
    gunicorn_argv,
    running,
    server_env,
    wait_for,
    write_config,
)
from tests.test_gunicorn import uvicorn_worker_class
from tests.tools import require_tool

APP = "fleet"
ITEMS = ("inbound", "GET", "/items/{item_id}")
WORKERS = 2


def send(base_url: str, count: int) -> None:
    """``count`` requests spread over the workers (a new connection each)."""

    def one(i: int) -> int:
        with httpx.Client(timeout=REQUEST_TIMEOUT, headers={"connection": "close"}) as http:
            return http.get(f"{base_url}/items/{i}").status_code

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(one, range(count))) == {200}


def requests_series(daemon: Netprofd) -> dict[tuple[tuple[str, str], ...], float]:
    text = daemon.get("/metrics").text
    series = {}
    for family in text_string_to_metric_families(text):
        if family.name == "network_profiling_requests":
            for sample in family.samples:
                if sample.name == "network_profiling_requests_total":
                    series[tuple(sorted(sample.labels.items()))] = sample.value
    return series


def worker_pids(daemon: Netprofd) -> list[int]:
    metrics = daemon.get(f"{NP}/production-metrics").json()
    (app,) = [a for a in metrics["applications"] if a["app"] == APP]
    return [p["pid"] for p in app["processes"]]


class Fleet:
    def __init__(self, server: Server, segment_dir: Path, tmp: Path) -> None:
        self.server = server
        self.segment_dir = segment_dir
        self.tmp = tmp


@pytest.fixture
def fleet(tmp_path: Path, implementation: str) -> Iterator[Fleet]:
    worker_class = uvicorn_worker_class()
    if worker_class is None:
        pytest.skip("no gunicorn worker class for uvicorn")
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    config = write_config(tmp_path / "app.toml", segment_dir, APP)
    port = free_port()
    argv = gunicorn_argv("tests.apps.starlette_app:app", port, workers=WORKERS, worker_class=worker_class)
    with running(
        argv, env=server_env(implementation, config=config), port=port, log_path=tmp_path / "app.log"
    ) as server:
        yield Fleet(server, segment_dir, tmp_path)


def test_a_killed_worker_loses_no_count_and_no_counter_goes_back(fleet: Fleet) -> None:
    with netprofd(fleet.tmp, fleet.segment_dir) as daemon:
        send(fleet.server.base_url, 120)
        daemon.wait_until(lambda: daemon.route_counts(APP) == {ITEMS: 120}, what="120 requests")
        before = requests_series(daemon)
        assert sum(before.values()) == 120

        busy = [pid for pid in worker_pids(daemon) if pid != fleet.server.pid]
        victim = busy[0]
        os.kill(victim, signal.SIGKILL)
        # The daemon folds the dead worker's segment into the app's totals and removes it.
        wait_for(
            lambda: not any(f"-{victim}-" in p.name for p in fleet.segment_dir.glob("*.npseg")),
            timeout=15,
            what=f"the killed worker {victim}'s segment to be folded and removed",
        )
        assert victim not in worker_pids(daemon)
        assert daemon.route_counts(APP) == {ITEMS: 120}
        after = requests_series(daemon)
        assert all(after.get(labels, 0) >= value for labels, value in before.items()), (before, after)
        assert sum(after.values()) == 120

        # gunicorn replaces the worker; the new one's requests add up.
        wait_for(
            lambda: len([p for p in worker_pids(daemon) if p != victim]) >= WORKERS,
            timeout=30,
            what="a new worker",
        )
        send(fleet.server.base_url, 40)
        daemon.wait_until(lambda: daemon.route_counts(APP) == {ITEMS: 160}, what="160 requests")


def test_a_daemon_restart_goes_unnoticed(fleet: Fleet) -> None:
    port = free_port()
    with netprofd(fleet.tmp, fleet.segment_dir, port=port) as daemon:
        send(fleet.server.base_url, 50)
        daemon.wait_until(lambda: daemon.route_counts(APP) == {ITEMS: 50}, what="50 requests")
    # No daemon: the app goes on serving and recording.
    send(fleet.server.base_url, 30)
    with netprofd(fleet.tmp, fleet.segment_dir, port=port) as daemon:
        daemon.wait_until(
            lambda: daemon.route_counts(APP) == {ITEMS: 80}, what="80 requests after the restart"
        )
        send(fleet.server.base_url, 20)
        daemon.wait_until(lambda: daemon.route_counts(APP) == {ITEMS: 100}, what="100 requests")


def test_metrics_pass_promtool_and_add_up(fleet: Fleet) -> None:
    promtool = require_tool("promtool")
    with netprofd(fleet.tmp, fleet.segment_dir) as daemon:
        send(fleet.server.base_url, 60)
        httpx.get(f"{fleet.server.base_url}/boom", headers={"connection": "close"}, timeout=REQUEST_TIMEOUT)
        daemon.wait_until(lambda: sum(daemon.route_counts(APP).values()) == 61, what="61 requests")
        text = daemon.get("/metrics").text

    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    complaints = [line for line in (checked.stdout + checked.stderr).splitlines() if line.strip()]
    # The one kind allowed: the guide's own _mb / _ms names (their base-unit twins sit beside them).
    assert all("abbreviated units" in line for line in complaints), complaints
    assert {line.split()[0] for line in complaints} == {
        "network_profiling_memory_mb",
        "network_profiling_overhead_ms",
    }
    for twin in ("network_profiling_memory_bytes", "network_profiling_overhead_seconds"):
        assert f"\n{twin}{{" in text

    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["network_profiling_requests"].samples
    by_status = {(s.labels["route"], s.labels["status"]): s.value for s in requests if s.labels["app"] == APP}
    assert by_status == {("/items/{item_id}", "2xx"): 60, ("/boom", "5xx"): 1}
    durations = families["network_profiling_request_duration_seconds"].samples
    items = [s for s in durations if s.labels.get("route") == "/items/{item_id}"]
    buckets = [s.value for s in items if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == 60  # cumulative, +Inf last
    (count,) = [s.value for s in items if s.name.endswith("_count")]
    (total,) = [s.value for s in items if s.name.endswith("_sum")]
    assert count == 60 and 0 < total < 60
    errors = families["network_profiling_request_errors"].samples
    assert [(s.labels["route"], s.labels["kind"], s.value) for s in errors] == [("/boom", "exception", 1)]
    (memory,) = [
        s.value for s in families["network_profiling_memory_bytes"].samples if s.labels["app"] == APP
    ]
    assert memory == sum(p.stat().st_size for p in fleet.segment_dir.glob("*.npseg"))
    assert [
        s.value for s in families["network_profiling_auto_disables"].samples if s.labels["app"] == APP
    ] == [0]


def test_a_real_prometheus_scrapes_netprofd_and_loads_the_guides_rules(fleet: Fleet) -> None:
    prometheus = require_tool("prometheus")
    rules = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "network_profiling_rules.yml"
    with netprofd(fleet.tmp, fleet.segment_dir) as daemon:
        send(fleet.server.base_url, 25)
        daemon.wait_until(lambda: daemon.route_counts(APP) == {ITEMS: 25}, what="25 requests")
        prom_port = free_port()
        config = fleet.tmp / "prometheus.yml"
        config.write_text(
            f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{rules}"]
scrape_configs:
  - job_name: netprofd
    static_configs:
      - targets: ["127.0.0.1:{daemon.port}"]
""",
            encoding="utf-8",
        )
        argv = [
            prometheus, f"--config.file={config}", f"--storage.tsdb.path={fleet.tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ]  # fmt: skip
        with running(
            argv, env=dict(os.environ), port=prom_port, log_path=fleet.tmp / "prometheus.log"
        ) as prom:
            api = f"{prom.base_url}/api/v1"

            def query(expr: str) -> list[dict[str, object]]:
                body = httpx.get(f"{api}/query", params={"query": expr}, timeout=REQUEST_TIMEOUT).json()
                assert body["status"] == "success", body
                return body["data"]["result"]  # type: ignore[no-any-return]

            def scraped() -> bool:
                result = query(f'sum(network_profiling_requests_total{{app="{APP}"}})')
                return bool(result) and float(result[0]["value"][1]) == 25  # type: ignore[index]

            wait_for(scraped, timeout=30, what="Prometheus to scrape 25 requests", server=prom)
            groups = httpx.get(f"{api}/rules", timeout=REQUEST_TIMEOUT).json()["data"]["groups"]
            loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
            assert set(loaded) == {
                "NetworkProfilingHighMemory",
                "NetworkProfilingAutoDisabled",
                "NetworkProfilingHighOverhead",
            }
            wait_for(
                lambda: all(
                    r["health"] == "ok"
                    for g in httpx.get(f"{api}/rules", timeout=REQUEST_TIMEOUT).json()["data"]["groups"]
                    for r in g["rules"]
                ),
                timeout=15,
                what="the guide's rules to evaluate without error",
                server=prom,
            )
            # Nothing is wrong, so nothing fires.
            assert httpx.get(f"{api}/alerts", timeout=REQUEST_TIMEOUT).json()["data"]["alerts"] == []
            # The duration buckets are usable by PromQL as they are.
            (p95,) = query(
                f'histogram_quantile(0.95, sum by (le) (network_profiling_request_duration_seconds_bucket{{app="{APP}"}}))'
            )
            assert 0 < float(p95["value"][1]) < 5  # type: ignore[index]
