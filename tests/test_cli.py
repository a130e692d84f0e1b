"""`netprof stats` as a user runs it: a real process reading real segments."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from netprof_core import Direction

ROOT = Path(__file__).resolve().parents[1]


def netprof(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "netprof_core", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def fill(make_recorder, app: str, requests: int, errors: int) -> None:
    recorder = make_recorder(app_name=app)
    items = recorder.route_id("/items/{item_id}", "GET")
    payments = recorder.route_id("payments.internal", "POST", Direction.OUTBOUND)
    now = time.monotonic_ns()
    for i in range(requests):
        recorder.record(items, 500 if i < errors else 200, now, now + 2_000_000 + i * 1000, 100, 900)
    recorder.record(payments, 0, now, now + 3_000_000_000, 0, 0, 3)


def test_stats_table_merges_processes(make_recorder, segment_dir: Path) -> None:
    fill(make_recorder, "shop", 300, 3)
    fill(make_recorder, "shop", 200, 2)
    fill(make_recorder, "billing", 50, 0)

    result = netprof("stats", "--segment-dir", str(segment_dir))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["APP", "DIR", "METHOD", "ROUTE", "COUNT", "ERRORS", "SLOW", "P50", "P95", "P99", "MAX"]
    shop_items = next(line.split() for line in lines if line.startswith("shop") and "/items/{item_id}" in line)
    assert shop_items[:5] == ["shop", "in", "GET", "/items/{item_id}", "500"]
    assert shop_items[5] == "1.0%"  # 5 of 500
    assert shop_items[7].endswith("ms")
    payments = next(line.split() for line in lines if line.startswith("shop") and "payments.internal" in line)
    assert payments[1:5] == ["out", "POST", "payments.internal", "2"]
    assert payments[5] == "100.0%" and payments[6] == "100.0%"  # timeouts, slower than 2 s
    assert "3 process(es), 553 requests recorded" in result.stdout


def test_stats_json_counts_are_exact(make_recorder, segment_dir: Path) -> None:
    fill(make_recorder, "shop", 120, 7)

    result = netprof("stats", "--segment-dir", str(segment_dir), "--json")

    data = json.loads(result.stdout)
    assert data["processes"] == 1
    items = next(route for route in data["routes"] if route["route"] == "/items/{item_id}")
    assert (items["count"], items["errors"], items["direction"]) == (120, 7, "inbound")
    assert 2.0 <= items["p50_ms"] <= 2.2
    assert items["max_ms"] == (2_000_000 + 119 * 1000) / 1e6


def test_stats_skips_a_corrupt_segment_and_names_it(make_recorder, segment_dir: Path) -> None:
    fill(make_recorder, "shop", 10, 0)
    bad = segment_dir / "garbage-1-1-0.npseg"
    bad.write_bytes(b"not a segment" * 100)

    result = netprof("stats", "--segment-dir", str(segment_dir))

    assert result.returncode == 0
    assert "/items/{item_id}" in result.stdout
    assert str(bad) in result.stderr and "magic" in result.stderr


def test_stats_on_an_empty_directory(tmp_path: Path) -> None:
    result = netprof("stats", "--segment-dir", str(tmp_path))
    assert result.returncode == 0
    assert "no profiled processes" in result.stdout


def test_stats_reads_the_segment_dir_from_the_config(make_recorder, segment_dir: Path, tmp_path: Path) -> None:
    fill(make_recorder, "shop", 5, 0)
    config = tmp_path / "netprof.toml"
    config.write_text(f'[network_profiling]\nsegment_dir = "{segment_dir}"\n')

    result = netprof("stats", "--config", str(config))

    assert "/items/{item_id}" in result.stdout


def test_stats_with_a_bad_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "netprof.json"
    config.write_text('{"network_profiling": {"max_stored_requests": -1}}')

    result = netprof("stats", "--config", str(config))

    assert result.returncode == 2
    assert "network_profiling.max_stored_requests" in result.stderr and str(config) in result.stderr


def test_readme_first_command_shows_the_table() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "synthetic_traffic.py"), "--workers", "2", "--requests", "2000"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "2 worker processes recorded 4000 requests" in result.stdout
    assert "4000 requests recorded" in result.stdout
    for route in ("/items/{item_id}", "/orders", "payments.internal"):
        assert route in result.stdout
