"""netprofd's HTTP API against a real daemon reading a real uvicorn app.

Every call of the deployment guide is sent as printed there (curl, the bearer
header, the path), with the host replaced by the test daemon's; responses are
checked against the traffic the test sent.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.apps.netprofd import API_KEY, NP, PREFIX, Netprofd, netprofd
from tests.apps.servers import (
    REQUEST_TIMEOUT,
    Server,
    free_port,
    running,
    server_env,
    uvicorn_argv,
    write_config,
)

APP = "shop"
ITEMS = ("inbound", "GET", "/items/{item_id}")
BOOM = ("inbound", "GET", "/boom")
UNMATCHED = ("inbound", "GET", "<unmatched>")
SENT = {ITEMS: 30, BOOM: 6, UNMATCHED: 4}


class Shop:
    """A uvicorn app with the middleware, and the daemon reading its segments."""

    def __init__(self, server: Server, daemon: Netprofd, segment_dir: Path) -> None:
        self.server = server
        self.daemon = daemon
        self.segment_dir = segment_dir
        # uvicorn closes the connection after an app exception: one connection per request.
        self.http = httpx.Client(
            base_url=server.base_url, timeout=REQUEST_TIMEOUT, headers={"connection": "close"}
        )

    def send(self, plan: dict[tuple[str, str, str], int] = SENT) -> None:
        for key, count in plan.items():
            for i in range(count):
                path = {ITEMS: f"/items/{i}", BOOM: "/boom", UNMATCHED: f"/no/such/{i}"}[key]
                self.http.get(path)

    def wait_for_counts(self, expected: dict[tuple[str, str, str], int]) -> dict[tuple[str, str, str], int]:
        return self.daemon.wait_until(
            lambda: (c := self.daemon.route_counts(APP)) == expected and c, what=f"counts {expected}"
        )


@pytest.fixture
def shop(tmp_path: Path, implementation: str) -> Iterator[Shop]:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    config = write_config(tmp_path / "app.toml", segment_dir, APP)
    port = free_port()
    env = server_env(implementation, config=config)
    argv = uvicorn_argv("tests.apps.starlette_app:app", port)
    with (
        running(argv, env=env, port=port, log_path=tmp_path / "app.log") as server,
        netprofd(tmp_path, segment_dir, profiling={"app_name": "netprofd-test"}) as daemon,
    ):
        shop = Shop(server, daemon, segment_dir)
        yield shop
        shop.http.close()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("curl")
    if exe is None:
        pytest.skip("curl is not installed")
    return subprocess.run(
        [exe, "-sS", "--max-time", "20", *args], capture_output=True, text=True, check=False
    )


def curl_json(*args: str) -> Any:
    done = curl(*args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_guides_calls_as_printed(shop: Shop, tmp_path: Path) -> None:
    shop.send()
    shop.wait_for_counts(SENT)
    url = shop.daemon.url
    auth = f"Authorization: Bearer {API_KEY}"

    # Phase 1: "Test basic functionality"
    stats = curl_json("-H", auth, f"{url}/api/v1/debug/network-stats")
    (app,) = [a for a in stats["applications"] if a["app"] == APP]
    routes = {(r["direction"], r["method"], r["route"]): r for r in app["routes"]}
    assert {key: r["count"] for key, r in routes.items()} == SENT
    assert routes[BOOM]["error_percent"] == 100.0 and routes[BOOM]["status_classes"] == {"5xx": 6}
    assert routes[BOOM]["error_kinds"] == {"exception": 6}
    assert routes[ITEMS]["error_percent"] == 0.0 and routes[ITEMS]["status_classes"] == {"2xx": 30}
    assert routes[UNMATCHED]["status_classes"] == {"4xx": 4}
    assert app["inbound"]["count"] == sum(SENT.values())
    assert app["inbound"]["errors"] == 6
    for key in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms"):
        assert 0 < routes[ITEMS][key] < 5000
    assert routes[ITEMS]["p50_ms"] <= routes[ITEMS]["p99_ms"] <= routes[ITEMS]["max_ms"]
    assert routes[ITEMS]["bytes_out"] > 0
    slowest = stats["slowest_requests"]
    assert 0 < len(slowest) <= 10
    assert [r["duration_ms"] for r in slowest] == sorted((r["duration_ms"] for r in slowest), reverse=True)

    # "Test profiling control"
    enabled = curl_json("-X", "POST", "-H", auth, f"{url}/api/v1/debug/network-profiling/enable")
    assert enabled["enabled"] is True and enabled["segments"] >= 1 and enabled["failed"] == []

    # "Test export functionality", written to a file as the guide does
    out = tmp_path / "test_export.json"
    done = curl("-H", auth, f"{url}/api/v1/debug/network-profiling/export/json", "-o", str(out))
    assert done.returncode == 0, done.stderr
    export = json.loads(out.read_text())
    assert export["count"] == len(export["records"]) == sum(SENT.values())
    assert sorted(r["route"] for r in export["records"] if r["status"] == 500) == ["/boom"] * 6

    # Troubleshooting: high memory usage
    memory = curl_json("-H", auth, f"{url}/api/v1/debug/network-profiling/memory-usage")
    sizes = {p.name: p.stat().st_size for p in shop.segment_dir.glob("*.npseg")}
    assert memory["total_bytes"] == sum(sizes.values())
    assert sorted(Path(s["path"]).name for s in memory["segments"]) == sorted(sizes)
    assert memory["max_memory_mb"] == 10.0 and memory["within_limit"] is True

    cleanup = curl_json("-X", "POST", "-H", auth, f"{url}/api/v1/debug/network-profiling/force-cleanup")
    assert cleanup["segments"] >= 1
    retention = curl_json(
        "-X", "POST", "-H", auth, f"{url}/api/v1/debug/network-profiling/retention-policy?max_age_hours=12"
    )
    assert retention["max_age_hours"] == 12.0 and retention["segments"] >= 1

    # Performance issues
    metrics = curl_json("-H", auth, f"{url}/api/v1/debug/network-profiling/production-metrics")
    (app_metrics,) = [a for a in metrics["applications"] if a["app"] == APP]
    assert app_metrics["requests"] == sum(SENT.values())
    assert app_metrics["process_count"] == 1 and app_metrics["enabled"] is True
    (process,) = app_metrics["processes"]
    assert process["pid"] == shop.server.pid
    assert process["rss_mb"] > 1 and process["cpu_percent"] is not None
    assert app_metrics["consecutive_errors"] == 0 and app_metrics["internal_errors"] == 0
    assert metrics["daemon"]["uptime_seconds"] > 0
    disabled = curl_json("-X", "POST", "-H", auth, f"{url}/api/v1/debug/network-profiling/disable")
    assert disabled["enabled"] is False

    # Error recovery
    reset = curl_json("-X", "POST", "-H", auth, f"{url}/api/v1/debug/network-profiling/reset-errors")
    assert reset["segments"] >= 1
    again = curl_json("-X", "POST", "-H", auth, f"{url}/api/v1/debug/network-profiling/enable")
    assert again["enabled"] is True


def test_disable_stops_recording_enable_resumes(shop: Shop) -> None:
    shop.send()
    shop.wait_for_counts(SENT)
    assert shop.daemon.post(f"{NP}/disable").status_code == 200
    shop.send()
    shop.http.get("/items/1")  # a last request, then the daemon's next ticks
    stats = shop.daemon.wait_until(
        lambda: (
            (p := shop.daemon.get(f"{NP}/production-metrics").json()["applications"])
            and p[0]["recording_processes"] == 0
            and p
        ),
        what="recording to stop",
    )
    assert stats[0]["enabled"] is False
    assert shop.daemon.route_counts(APP) == SENT  # nothing recorded while disabled

    assert shop.daemon.post(f"{NP}/enable").status_code == 200
    shop.send()
    shop.wait_for_counts({key: 2 * n for key, n in SENT.items()})


def test_cleanup_drops_records_but_keeps_counters(shop: Shop) -> None:
    shop.send()
    shop.wait_for_counts(SENT)
    before = shop.daemon.get(f"{NP}/export/ndjson").text.splitlines()
    assert len(before) == sum(SENT.values())
    assert shop.daemon.post(f"{NP}/force-cleanup").json()["segments"] == 1
    assert shop.daemon.get(f"{NP}/export/ndjson").text == ""
    assert shop.daemon.route_counts(APP) == SENT
    shop.http.get("/items/7")
    shop.wait_for_counts({**SENT, ITEMS: SENT[ITEMS] + 1})
    (record,) = [json.loads(line) for line in shop.daemon.get(f"{NP}/export/ndjson").text.splitlines()]
    assert record["route"] == "/items/{item_id}" and record["status"] == 200


def test_exports_filter_and_agree(shop: Shop) -> None:
    shop.send()
    shop.wait_for_counts(SENT)
    d = shop.daemon
    as_json = d.get(f"{NP}/export/json").json()["records"]
    as_ndjson = [json.loads(line) for line in d.get(f"{NP}/export/ndjson").text.splitlines()]
    as_csv = list(csv.DictReader(io.StringIO(d.get(f"{NP}/export/csv").text)))
    assert as_json == as_ndjson
    assert [r["route"] for r in as_csv] == [r["route"] for r in as_json]
    assert [int(r["status"]) for r in as_csv] == [r["status"] for r in as_json]
    assert d.get(f"{NP}/export/csv").headers["content-type"].startswith("text/csv")

    errors = d.get(f"{NP}/export/json", status="5xx").json()
    assert errors["count"] == 6 and {r["route"] for r in errors["records"]} == {"/boom"}
    assert d.get(f"{NP}/export/json", status=404).json()["count"] == 4
    assert d.get(f"{NP}/export/json", route="/items/{item_id}", limit=5).json()["count"] == 5
    assert d.get(f"{NP}/export/json", app=APP, limit=1).json()["count"] == 1
    slowest = max(r["duration_ms"] for r in as_json)
    assert d.get(f"{NP}/export/json", min_duration_ms=slowest - 0.001).json()["count"] >= 1
    assert d.get(f"{NP}/export/json", min_duration_ms=slowest + 1000).json()["count"] == 0
    newest = max(r["time"] for r in as_json)
    assert d.get(f"{NP}/export/json", since=newest + 1).json()["count"] == 0
    assert d.get(f"{NP}/export/json", until=newest + 0.01).json()["count"] == len(as_json)
    assert d.get(f"{NP}/export/json", since="2000-01-01T00:00:00Z").json()["count"] == len(as_json)


def test_windows_and_app_filter(shop: Shop) -> None:
    shop.send()
    shop.wait_for_counts(SENT)
    d = shop.daemon
    for window in ("1m", "5m", "15m", "all"):
        (app,) = d.stats(window, app=APP, slowest=0)["applications"]
        assert {(r["direction"], r["method"], r["route"]): r["count"] for r in app["routes"]} == SENT
        assert app["window_seconds"] > 0
        rate = app["inbound"]["rate_per_second"]
        assert rate == pytest.approx(sum(SENT.values()) / app["window_seconds"], rel=0.01)


@pytest.mark.parametrize(
    ("method", "path", "params", "status", "parameter"),
    [
        ("GET", f"{PREFIX}/network-stats", {"window": "2h"}, 400, "window"),
        ("GET", f"{PREFIX}/network-stats", {"slowest": "-1"}, 400, "slowest"),
        ("GET", f"{PREFIX}/network-stats", {"verbose": "1"}, 400, "verbose"),
        ("GET", f"{PREFIX}/network-stats", {"app": "nosuchapp"}, 404, "app"),
        ("GET", f"{NP}/export/json", {"limit": "1" + "0" * 30}, 400, "limit"),
        ("GET", f"{NP}/export/json", {"limit": "0"}, 400, "limit"),
        ("GET", f"{NP}/export/csv", {"status": "700"}, 400, "status"),
        ("GET", f"{NP}/export/ndjson", {"since": "yesterday"}, 400, "since"),
        ("GET", f"{NP}/export/json", {"min_duration_ms": "nan"}, 400, "min_duration_ms"),
        ("POST", f"{NP}/retention-policy", {"max_age_hours": "-3"}, 400, "max_age_hours"),
        ("POST", f"{NP}/retention-policy", {"max_age_hours": "twelve"}, 400, "max_age_hours"),
        ("POST", f"{NP}/retention-policy", {}, 400, "max_age_hours"),
        ("POST", f"{NP}/disable", {"app": "nosuchapp"}, 404, "app"),
    ],
)
def test_bad_parameters_are_named(
    shop: Shop, method: str, path: str, params: dict[str, str], status: int, parameter: str
) -> None:
    response = shop.daemon.http.request(method, path, params=params)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["parameter"] == parameter and parameter in body["error"]
    assert shop.daemon.get("/healthz").status_code == 200  # and it keeps serving


def test_unknown_paths_and_methods_are_json(shop: Shop) -> None:
    d = shop.daemon
    missing = d.get(f"{PREFIX}/no-such-call")
    assert missing.status_code == 404 and "no-such-call" in missing.json()["error"]
    assert d.get(f"{NP}/export/xml").status_code == 404
    wrong = d.get(f"{NP}/enable")  # enable is a POST
    assert wrong.status_code == 405 and wrong.json()["status"] == 405


GUARDED = [
    ("GET", f"{PREFIX}/network-stats"),
    ("POST", f"{NP}/enable"),
    ("POST", f"{NP}/disable"),
    ("GET", f"{NP}/export/json"),
    ("GET", f"{NP}/export/csv"),
    ("GET", f"{NP}/export/ndjson"),
    ("GET", f"{NP}/memory-usage"),
    ("POST", f"{NP}/force-cleanup"),
    ("POST", f"{NP}/retention-policy?max_age_hours=12"),
    ("GET", f"{NP}/production-metrics"),
    ("POST", f"{NP}/reset-errors"),
    ("GET", f"{PREFIX}/no-such-call"),
]


def test_every_call_needs_the_key(shop: Shop) -> None:
    shop.send({ITEMS: 3})
    shop.wait_for_counts({ITEMS: 3})
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": API_KEY},
        {"Authorization": "Basic x"},
    ):
        with httpx.Client(base_url=shop.daemon.url, headers=headers, timeout=REQUEST_TIMEOUT) as anonymous:
            for method, path in GUARDED:
                response = anonymous.request(method, path)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "API key" in response.json()["error"]
            assert anonymous.get("/healthz").status_code == 200
            assert anonymous.get("/metrics").status_code == 200  # metrics_require_auth is off by default
    # Nothing was changed by the refused calls.
    assert shop.daemon.route_counts(APP) == {ITEMS: 3}
    assert API_KEY not in shop.daemon.log()


def test_metrics_can_require_the_key(tmp_path: Path) -> None:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    with netprofd(tmp_path, segment_dir, daemon={"metrics_require_auth": True}) as d:
        assert httpx.get(f"{d.url}/metrics").status_code == 401
        assert d.get("/metrics").status_code == 200


def test_enabling_is_refused_while_the_feature_flag_is_off(tmp_path: Path, implementation: str) -> None:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    config = write_config(tmp_path / "app.toml", segment_dir, APP, feature_flag_enabled=False)
    port = free_port()
    env = server_env(implementation, config=config)
    with running(
        uvicorn_argv("tests.apps.starlette_app:app", port), env=env, port=port, log_path=tmp_path / "app.log"
    ) as server:
        httpx.get(f"{server.base_url}/items/1")
        with netprofd(tmp_path, segment_dir) as d:
            d.wait_until(lambda: d.app_stats(APP) is not None, what="the app's segment")
            refused = d.post(f"{NP}/enable")
            assert refused.status_code == 409
            assert "feature_flag_enabled" in refused.json()["error"]
            assert d.get(f"{NP}/production-metrics").json()["applications"][0]["enabled"] is False
