"""``netprof`` against a real netprofd (stats --url, export, enable, disable,
cleanup, reset-errors), the live view, and ``netprof demo`` from nothing."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netprof_core import Recorder
from tests.apps.netprofd import API_KEY, Netprofd, daemon_env, netprofd

ROOT = Path(__file__).resolve().parents[1]


def netprof(*args: str, key: str | None = API_KEY, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = daemon_env(key)
    env["COLUMNS"] = "160"
    return subprocess.run(
        [sys.executable, "-m", "netprof_core.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


@pytest.fixture
def served(
    make_recorder: Callable[..., Recorder], segment_dir: Path, tmp_path: Path
) -> Iterator[tuple[Recorder, Netprofd]]:
    recorder = make_recorder(app_name="cli-shop")
    items, pay = recorder.route_id("/items/{id}"), recorder.route_id("payments.internal", "POST", 1)
    for i in range(30):
        start = time.monotonic_ns()
        recorder.record(items, 500 if i % 10 == 0 else 200, start, start + 3_000_000, 10, 200)
        recorder.record(pay, 200, start, start + 20_000_000)
    with netprofd(tmp_path, segment_dir) as daemon:
        daemon.wait_until(lambda: daemon.route_counts("cli-shop"), what="the recorder's segment")
        yield recorder, daemon


def test_stats_from_a_daemon(served: tuple[Recorder, Netprofd]) -> None:
    _, daemon = served
    table = netprof("stats", "--url", daemon.url, "--window", "all")
    assert table.returncode == 0, table.stderr
    assert "/items/{id}" in table.stdout and "payments.internal" in table.stdout and "10.0%" in table.stdout
    as_json = netprof("stats", "--url", daemon.url, "--json", "--window", "all")
    (app,) = json.loads(as_json.stdout)["applications"]
    assert app["app"] == "cli-shop" and app["inbound"]["count"] == 30 and app["outbound"]["count"] == 30


def test_export_writes_the_records(served: tuple[Recorder, Netprofd], tmp_path: Path) -> None:
    _, daemon = served
    out = tmp_path / "records.csv"
    done = netprof("export", "--url", daemon.url, "--format", "csv", "-o", str(out), "--status", "5xx")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 3 and {r["route"] for r in rows} == {"/items/{id}"}
    assert f"wrote {out.stat().st_size} bytes" in done.stderr
    ndjson = netprof("export", "--url", daemon.url, "--format", "ndjson", "-o", "-", "--limit", "5")
    assert len(ndjson.stdout.splitlines()) == 5


def test_control_commands(served: tuple[Recorder, Netprofd]) -> None:
    recorder, daemon = served
    route = recorder.route_id("/items/{id}")
    assert netprof("disable", "--url", daemon.url).stdout.strip() == "disable: 1 process(es) of every app"
    start = time.monotonic_ns()
    recorder.record(route, 200, start, start + 1000)
    assert recorder.snapshot(records=False).counters.requests == 60  # not recorded while disabled
    assert netprof("enable", "--url", daemon.url, "--app", "cli-shop").returncode == 0
    recorder.record(route, 200, start, start + 1000)
    assert recorder.snapshot(records=False).counters.requests == 61
    assert netprof("cleanup", "--url", daemon.url).returncode == 0
    assert recorder.snapshot().records == ()
    assert netprof("reset-errors", "--url", daemon.url).returncode == 0


def test_daemon_errors_are_clear(served: tuple[Recorder, Netprofd]) -> None:
    _, daemon = served
    wrong = netprof("disable", "--url", daemon.url, key="wrong")
    assert wrong.returncode == 2 and "HTTP 401" in wrong.stderr and "API key" in wrong.stderr
    unknown = netprof("enable", "--url", daemon.url, "--app", "nosuch")
    assert unknown.returncode == 2 and "unknown app 'nosuch'" in unknown.stderr
    nowhere = netprof("stats", "--url", "http://127.0.0.1:9", key=None)
    assert nowhere.returncode == 2 and "cannot reach netprofd at http://127.0.0.1:9" in nowhere.stderr


def test_the_live_view_refreshes(served: tuple[Recorder, Netprofd], segment_dir: Path) -> None:
    _, daemon = served
    local = netprof(
        "stats", "--segment-dir", str(segment_dir), "--watch", "--interval", "0.1", "--count", "2"
    )
    assert local.returncode == 0 and "/items/{id}" in local.stdout and "1 process(es)" in local.stdout
    remote = netprof(
        "stats", "--url", daemon.url, "--window", "all", "--watch", "--interval", "0.1", "--count", "1"
    )
    assert remote.returncode == 0 and "payments.internal" in remote.stdout


def _demo_leftovers() -> set[Path]:
    """The demo's directories in /dev/shm and in the temporary directory."""
    return {p for root in (Path("/dev/shm"), Path(tempfile.gettempdir())) for p in root.glob("netprof-demo-*")}


@pytest.mark.slow
@pytest.mark.any_core  # (the demo runs the accelerated core; CI runs it once more as the README does)
def test_the_demo_shows_an_alert_fire_and_resolve_and_leaves_nothing_behind() -> None:
    before = _demo_leftovers()
    done = netprof("demo", "--duration", "36", "--concurrency", "6", key=None, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for phase in ("normal", "slow", "failing", "overload", "recovery"):
        assert f"phase {phase}" in out
    assert "FIRING   DemoCheckoutErrors" in out and "RESOLVED DemoCheckoutErrors" in out
    assert "auto-disabled" in out and "POST .../enable: recording again" in out
    assert "/api/checkout" in out and "P95" in out  # the per-route table was shown
    assert "everything stopped and removed" in out
    assert _demo_leftovers() == before
