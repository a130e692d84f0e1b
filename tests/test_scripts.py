"""The deployment guide's scripts, run as the guide runs them, against real
processes: scripts/load_test.py (with the demo app it starts itself, and
against a running demo app toggled through a real netprofd) and
scripts/monitor_network_profiling.py (against a real netprofd reading a
real app). Overhead values are noisy: only structure, exit codes and what is
printed are checked."""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from netprof_core import IMPLEMENTATION, SegmentControl
from netprof_core.segment import segment_paths
from tests.apps.netprofd import API_KEY, NP, Netprofd, daemon_env, netprofd
from tests.apps.servers import (
    REQUEST_TIMEOUT,
    ROOT,
    Server,
    free_port,
    running,
    server_env,
    uvicorn_argv,
    write_config,
)

LOAD_TEST = ROOT / "scripts" / "load_test.py"
MONITOR = ROOT / "scripts" / "monitor_network_profiling.py"
APP = "demo-shop"
LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ memory_mb=(?P<memory>[\d.]+) overhead_ms=(?P<overhead>[\d.]+|-)"
    r" error_rate=(?P<errors>[\d.]+|-)% consecutive_errors=(?P<consecutive>\d+)"
    r" auto_disables=(?P<auto>\d+) processes=(?P<processes>\d+)  (?P<tail>.+)$"
)


def run_script(
    script: Path, *args: str, timeout: float = 60.0, api_key: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The script as an operator runs it: ``python scripts/x.py ...`` from the repository."""
    env = daemon_env(api_key=api_key)  # no NETPROF_* of ours, except the key when given
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Shop:
    """The demo app under uvicorn, and a netprofd reading its segments."""

    def __init__(self, server: Server, daemon: Netprofd, segment_dir: Path) -> None:
        self.server = server
        self.daemon = daemon
        self.segment_dir = segment_dir
        self.http = httpx.Client(base_url=server.base_url, timeout=REQUEST_TIMEOUT)

    def traffic(self, items: int = 10, checkouts: int = 0) -> None:
        for i in range(items):
            assert self.http.get(f"/api/items/{i}").status_code == 200
        for _ in range(checkouts):
            self.http.post("/api/checkout", json={"amount": 42})

    def mode(self, mode: str) -> None:
        assert self.http.post("/_demo/mode", params={"mode": mode}).status_code == 200

    def metrics(self) -> dict[str, Any] | None:
        response = self.daemon.get(f"{NP}/production-metrics", app=APP)
        if response.status_code == 404:  # the daemon has not seen the app yet
            return None
        assert response.status_code == 200, response.text
        (app,) = response.json()["applications"]
        return app  # type: ignore[no-any-return]

    def wait_for_requests(self, at_least: int) -> None:
        self.daemon.wait_until(
            lambda: (m := self.metrics()) is not None and m["requests"] >= at_least,
            what=f"{at_least} requests recorded",
        )


@contextlib.contextmanager
def shop_running(tmp_path: Path) -> Iterator[Shop]:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    config = write_config(tmp_path / "app.toml", segment_dir, APP)
    port = free_port()
    env = server_env("cython" if IMPLEMENTATION == "cython" else "python", config=config)
    argv = uvicorn_argv("netprof_core.demo.app:app", port)
    with (
        running(argv, env=env, port=port, log_path=tmp_path / "app.log") as server,
        netprofd(tmp_path, segment_dir) as daemon,
    ):
        shop = Shop(server, daemon, segment_dir)
        shop.traffic(items=5)
        shop.wait_for_requests(5)
        yield shop
        shop.http.close()


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    with shop_running(tmp_path) as shop:
        yield shop


# -- load_test.py ------------------------------------------------------------------


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def assert_state_figures(figures: dict[str, Any]) -> None:
    assert figures["requests"] > 0
    assert figures["requests_per_second"] > 0
    assert figures["errors"] == 0
    latency = figures["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert latency["mean"] > 0


def load_script(name: str) -> ModuleType:
    """A script imported as a module (scripts/ on sys.path for its _common)."""
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module(name)


def test_the_guides_command_lines_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    load_test = load_script("load_test")
    args = load_test.parse_args(["--duration", "3600", "--concurrent", "50"])
    assert (args.duration, args.concurrent, args.slice, args.warmup, args.url) == (3600, 50, 60, 5, None)
    assert load_test.slice_plan(args.duration, args.slice) == (60, 60.0)
    assert load_test.slice_plan(10, 3) == (2, 5.0)  # an even number of equal slices

    monitor = load_script("monitor_network_profiling")
    monkeypatch.setenv("NETPROF_API_KEY", "from-env")
    api_key = "s3cret"  # the guide's $API_KEY, expanded by the shell
    args = monitor.parse_args(
        ["--url", "http://staging.example.com", "--api-key", api_key, "--continuous", "--interval", "30"]
    )
    assert (args.url, args.api_key, args.continuous, args.interval, args.count) == (
        "http://staging.example.com", "s3cret", True, 30.0, None,
    )  # fmt: skip
    assert monitor.parse_args(["--url", "https://api.example.com"]).api_key == "from-env"


def test_load_test_with_its_own_demo_app(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    done = run_script(LOAD_TEST, "--duration", "6", "--concurrent", "4", "--slice", "1.5", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    result = load_json(out)
    assert result["started_demo_app"] is True
    assert result["slices"] == 4 and result["concurrent"] == 4
    assert set(result["states"]) == {"on", "off"}
    for state in ("on", "off"):
        figures = result["states"][state]
        assert_state_figures(figures)
        assert figures["slices"] == 2
        assert figures["cpu_ms_per_request"] > 0  # the server's /proc/<pid>/stat was read
    counted = sum(s["requests"] for s in result["states"].values())
    assert result["requests_sent"] == counted + result["requests_discarded"]
    overhead = result["overhead"]
    assert overhead["judged_on"] == "cpu" and overhead["judged_ms"] == overhead["cpu_ms"]
    assert isinstance(overhead["latency_ms"], float)
    memory = result["memory"]
    assert [s["state"] for s in memory["samples"]] == ["on", "off", "on", "off"]
    assert all(s["memory_mb"] > 0 for s in memory["samples"])
    assert memory["growth_mb"] == 0  # segments have a fixed size
    assert {c["name"]: c["passed"] for c in result["checks"]} == {
        "overhead": True, "memory": True, "memory growth": True, "errors": True,
    }  # fmt: skip
    assert result["passed"] is True
    assert "PASSED" in done.stdout and "ON - OFF" in done.stdout
    # It removed its temporary directory (and so its segments).
    assert not Path(memory["source"].removeprefix("segment files in ")).exists()


def test_load_test_fails_a_criterion_it_cannot_meet(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    done = run_script(
        LOAD_TEST, "--duration", "2", "--concurrent", "2", "--slice", "0.5", "--max-memory-mb", "0.001",
        "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    checks = {c["name"]: c for c in load_json(out)["checks"]}
    assert checks["memory"]["passed"] is False and checks["memory"]["value"] > 0.001
    assert "FAIL  memory" in done.stdout and "FAILED" in done.stdout


def test_load_test_toggles_a_running_app_through_netprofd(tmp_path: Path) -> None:
    with shop_running(tmp_path) as shop:
        toggle_through_netprofd(shop, tmp_path)


def toggle_through_netprofd(shop: Shop, tmp_path: Path) -> None:
    seen: list[int] = []
    stop = threading.Event()

    def poll() -> None:  # what the daemon shows while the load test runs
        while not stop.is_set():
            try:
                metrics = shop.metrics()
            except (httpx.HTTPError, AssertionError):
                return  # the daemon died: the test says so
            if metrics is not None:
                seen.append(metrics["recording_processes"])
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    out = tmp_path / "out.json"
    try:
        done = run_script(
            LOAD_TEST, "--url", shop.server.base_url, "--demo-mix", "--daemon-url", shop.daemon.url,
            "--server-pid", str(shop.server.pid), "--duration", "4", "--concurrent", "4", "--slice", "1",
            "--json", str(out),
            api_key=API_KEY,  # from NETPROF_API_KEY
        )  # fmt: skip
    finally:
        stop.set()
        poller.join()
    assert shop.daemon.proc is not None and shop.daemon.proc.poll() is None, shop.daemon.fail("netprofd died")
    assert done.returncode == 0, done.stdout + done.stderr
    assert 0 in seen and 1 in seen, "recording was not switched off and on"
    # Read once more now the script has ended: the poller may have stopped
    # between the script's last switch and its exit.
    final = shop.metrics()
    assert final is not None and final["recording_processes"] == 1, "profiling was not switched back on at the end"
    result = load_json(out)
    assert result["started_demo_app"] is False
    for state in ("on", "off"):
        assert_state_figures(result["states"][state])
    assert result["overhead"]["judged_on"] == "cpu"  # --server-pid
    memory = result["memory"]
    assert memory["source"].startswith("netprofd memory-usage")
    assert len(memory["samples"]) == 4 and memory["max_mb"] > 0
    # The OFF slices were not recorded: item pages are 6 in 10 requests sent,
    # the daemon counted about half of them (the warm-up and the ON slices).
    routes = {r["route"]: r["count"] for r in shop.daemon.stats("all")["applications"][0]["routes"]}
    assert 0 < routes["/api/items/{item_id}"] < result["requests_sent"] * 0.5


@pytest.mark.parametrize(
    "args",
    [
        ["--duration", "0"],
        ["--concurrent", "0"],
        ["--duration", "6", "--slice", "4"],  # one slice: no ON and OFF
        ["--daemon-url", "http://127.0.0.1:9"],  # needs --url
        ["--url", "http://127.0.0.1:9", "--daemon-url", "http://127.0.0.1:9"],  # needs a key
        ["--url", "127.0.0.1:9"],
        ["--path", "/x"],  # needs --url
        ["--no-such-option"],
    ],
)
def test_load_test_bad_arguments(args: Sequence[str]) -> None:
    done = run_script(LOAD_TEST, *args, timeout=20)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error:" in done.stderr


def test_load_test_unreachable_app_is_exit_2() -> None:
    done = run_script(LOAD_TEST, "--url", f"http://127.0.0.1:{free_port()}", "--duration", "2", timeout=20)
    assert done.returncode == 2
    assert "cannot reach the app" in done.stderr


# -- monitor_network_profiling.py -------------------------------------------------------


def parse_lines(stdout: str) -> list[re.Match[str]]:
    lines = stdout.splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), stdout
    return matches  # type: ignore[return-value]


def test_monitor_continuous_prints_a_line_per_interval(shop: Shop) -> None:
    done = run_script(
        MONITOR, "--url", shop.daemon.url, "--api-key", API_KEY, "--continuous", "--interval", "0.5",
        "--count", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = parse_lines(done.stdout)
    assert len(lines) == 2
    for line in lines:
        assert float(line["memory"]) > 0
        assert line["processes"] == "1"
        assert float(line["overhead"]) >= 0
        assert float(line["errors"]) == 0.0
        assert line["consecutive"] == "0" and line["auto"] == "0"
        assert line["tail"] == "ok"
    # Once, healthy: exit 0, the key from NETPROF_API_KEY.
    once = run_script(MONITOR, "--url", shop.daemon.url, api_key=API_KEY)
    assert once.returncode == 0, once.stdout + once.stderr
    assert parse_lines(once.stdout)[0]["tail"] == "ok"


def test_monitor_in_the_background_as_the_guide_runs_it(shop: Shop, tmp_path: Path) -> None:
    """`... --continuous --interval N > monitoring.log 2>&1 &`: each line reaches
    the file as it is printed, and SIGTERM ends the monitor cleanly."""
    log = tmp_path / "monitoring.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(MONITOR), "--url", shop.daemon.url, "--continuous", "--interval", "0.3"],
            cwd=ROOT, env=daemon_env(API_KEY), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while len(log.read_text().splitlines()) < 2:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no lines in {log}: {log.read_text()!r}"
            time.sleep(0.05)
        assert proc.poll() is None  # still running: the lines were not held in a buffer
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(parse_lines(log.read_text())) >= 2


def test_monitor_once_exits_1_on_a_breach(shop: Shop) -> None:
    shop.mode("failing")  # half of the payments fail: their checkouts answer 502
    shop.traffic(items=0, checkouts=20)
    shop.daemon.wait_until(
        lambda: shop.daemon.app_stats(APP, "1m")["inbound"]["errors"] > 0, what="errors in the last minute"
    )
    done = run_script(MONITOR, "--url", shop.daemon.url, "--api-key", API_KEY)
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = parse_lines(done.stdout)
    assert float(line["errors"]) > 5
    assert "! error_rate>5%" in line["tail"]

    # The same error rate under a looser threshold, and a segment auto-disabled.
    (path,) = segment_paths(shop.segment_dir)
    with SegmentControl.open(path) as control:
        control.auto_disable()
    shop.daemon.wait_until(
        lambda: (m := shop.metrics()) and m["auto_disabled_processes"] == 1, what="the auto-disable"
    )
    done = run_script(MONITOR, "--url", shop.daemon.url, "--api-key", API_KEY, "--max-error-rate", "100")
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = parse_lines(done.stdout)
    assert line["tail"] == "! auto_disable"


def test_monitor_wrong_key_is_exit_2(shop: Shop) -> None:
    done = run_script(
        MONITOR, "--url", shop.daemon.url, "--api-key", "not-the-key", "--continuous", "--count", "3"
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"{shop.daemon.url}{NP}/production-metrics: HTTP 401" in done.stderr
    assert "NETPROF_API_KEY" in done.stderr


def test_monitor_unreachable_daemon_is_exit_2() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = run_script(MONITOR, "--url", url, "--api-key", API_KEY, timeout=20)
    assert done.returncode == 2
    assert f"{url}{NP}/production-metrics" in done.stderr and "cannot reach netprofd" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],  # --url is required
        ["--url", "localhost:9465"],
        ["--url", "http://x", "--count", "2"],  # --count needs --continuous
        ["--url", "http://x", "--interval", "0"],
    ],
)
def test_monitor_bad_arguments(args: Sequence[str]) -> None:
    done = run_script(MONITOR, *args, timeout=20)
    assert done.returncode == 2
    assert "error:" in done.stderr
