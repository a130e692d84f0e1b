"""netprofd as a real process: its command line (``--check``, ``--listen``, the
API key), the segment directory's lock, SIGHUP reloads, systemd's notify
protocol, foreign files among the segments, and processes that end.

No mocks: each test runs ``python -m netprof_daemon`` and talks to it over
HTTP, signals and the segment files, as an operator and the apps would.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from netprof_core import Recorder, read_segment
from netprof_core._layout import HEADER_OFFSETS, LAYOUT_VERSION
from tests.apps.netprofd import (
    API_KEY,
    NP,
    START_TIMEOUT,
    Netprofd,
    daemon_env,
    netprofd,
    netprofd_argv,
    write_daemon_config,
)
from tests.apps.servers import REQUEST_TIMEOUT, ROOT, free_port, server_env

DEPLOY = ROOT / "deploy"
ROUTE = ("inbound", "GET", "/work")
FAST = {"tick_seconds": 0.1}


# -- helpers ------------------------------------------------------------------------


def run_netprofd(
    config: Path, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """netprofd run to completion (``--check``, or a start that must fail)."""
    return subprocess.run(
        netprofd_argv(config, *args),
        cwd=ROOT,
        env=dict(env if env is not None else daemon_env()),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def daemon_process(
    argv: list[str], env: Mapping[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A daemon started by hand (the tests that need its argv or its start-up
    order); SIGTERM at the end, SIGKILL if it hangs."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=dict(env), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for_health(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert proc.poll() is None, f"netprofd exited with {proc.returncode}:\n{log_path.read_text()}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200:
                return
        assert time.monotonic() < deadline, f"netprofd did not answer:\n{log_path.read_text()}"
        time.sleep(0.05)


def send(recorder: Recorder, count: int, route: str = "/work") -> None:
    rid = recorder.route_id(route, "GET")
    now = time.monotonic_ns()
    for i in range(count):
        recorder.record(rid, 200, now, now + 1_000_000 + i * 1000, 10, 100)


def counted(d: Netprofd, app: str) -> int:
    return d.route_counts(app).get(ROUTE, 0)


def app_metrics(d: Netprofd, app: str) -> dict[str, Any] | None:
    response = d.get(f"{NP}/production-metrics", app=app)
    if response.status_code != 200:
        return None
    apps = response.json()["applications"]
    return apps[0] if apps else None


def request_counters(d: Netprofd) -> dict[tuple[tuple[str, str], ...], float]:
    """Every ``network_profiling_requests_total`` series of one /metrics scrape."""
    response = d.get("/metrics")
    assert response.status_code == 200
    series = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "network_profiling_requests_total":
                series[tuple(sorted(sample.labels.items()))] = sample.value
    return series


def assert_no_counter_went_down(before: Mapping[Any, float], after: Mapping[Any, float]) -> None:
    for labels, value in before.items():
        assert labels in after, f"series {labels} disappeared"
        assert after[labels] >= value, f"series {labels} went down: {value} -> {after[labels]}"


# -- 1. the command line and the configuration ------------------------------------


def test_check_accepts_a_valid_config(tmp_path: Path) -> None:
    config = write_daemon_config(tmp_path / "ok.toml", tmp_path / "seg", tmp_path / "state", 9465)
    done = run_netprofd(config, "--check")
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout and str(config) in done.stdout
    assert not (tmp_path / "seg").exists()  # a check touches nothing


def test_check_prints_every_error(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "bad.toml",
        f"""\
[network_profiling]
segment_dir = "{tmp_path / "seg"}"
sample_rte = 0.5

[daemon]
listen = "127.0.0.1:99999"
tick_seconds = "fast"
colour = "blue"
""",
    )
    done = run_netprofd(config, "--check")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"{config}: ")]
    assert len(errors) == 4, done.stderr
    for key in ("network_profiling.sample_rte", "daemon.colour", "daemon.tick_seconds", "daemon.listen"):
        assert any(key in line for line in errors), (key, done.stderr)
    assert "sample_rate" in done.stderr  # the typo's suggestion
    assert "99999" in done.stderr
    assert "OK" not in done.stdout


def test_require_auth_off_is_refused_on_a_public_address(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "public.toml", '[daemon]\nlisten = "0.0.0.0:9465"\nrequire_auth = false\n')
    done = run_netprofd(config, "--check")
    assert done.returncode != 0
    assert "daemon.require_auth" in done.stderr and str(config) in done.stderr
    # Reported beside the file's other mistakes, not only once they are fixed.
    write_toml(config, '[daemon]\nlisten = "0.0.0.0:9465"\nrequire_auth = false\ntick_seconds = 0\n')
    done = run_netprofd(config, "--check")
    assert done.returncode != 0
    assert "daemon.require_auth" in done.stderr and "daemon.tick_seconds" in done.stderr, done.stderr


def test_no_api_key_refuses_to_start(tmp_path: Path) -> None:
    config = write_daemon_config(tmp_path / "nokey.toml", tmp_path / "seg", tmp_path / "state", free_port())
    for args in (("--check",), ()):
        done = run_netprofd(config, *args, env=daemon_env(api_key=None))
        assert done.returncode != 0
        assert "no API key" in done.stderr
        assert "NETPROF_API_KEY" in done.stderr and "api_key_file" in done.stderr  # how to fix it


def test_api_key_file(tmp_path: Path, segment_dir: Path) -> None:
    key = "key-from-a-file-0123456789"
    key_file = tmp_path / "api_key"
    key_file.write_text(key + "\n", encoding="utf-8")
    with netprofd(
        tmp_path, segment_dir, daemon={"api_key_file": str(key_file)}, api_key=key, env=daemon_env(None)
    ) as d:
        assert d.stats()["applications"] == []
        wrong = httpx.get(
            f"{d.url}/api/v1/debug/network-stats", headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert wrong.status_code == 401
        assert key not in d.log()

    empty = tmp_path / "empty_key"
    empty.write_text("\n", encoding="utf-8")
    for bad in (tmp_path / "no-such-key", empty):
        config = write_daemon_config(
            tmp_path / "bad.toml",
            segment_dir,
            tmp_path / "state",
            free_port(),
            daemon={"api_key_file": str(bad)},
        )
        for args in (("--check",), ()):
            done = run_netprofd(config, *args, env=daemon_env(None))
            assert done.returncode != 0
            assert "daemon.api_key_file" in done.stderr and str(bad) in done.stderr, done.stderr


def test_listen_overrides_the_config(tmp_path: Path, segment_dir: Path) -> None:
    in_file, given = free_port(), free_port()
    config = write_daemon_config(tmp_path / "d.toml", segment_dir, tmp_path / "state", in_file)
    done = run_netprofd(config, "--check", "--listen", f"127.0.0.1:{given}")
    assert done.returncode == 0 and f"127.0.0.1:{given}" in done.stdout, done.stderr
    bad = run_netprofd(config, "--check", "--listen", "127.0.0.1:70000")
    assert bad.returncode != 0 and "--listen" in bad.stderr

    log = tmp_path / "listen.log"
    with daemon_process(netprofd_argv(config, "--listen", f"127.0.0.1:{given}"), daemon_env(), log) as proc:
        wait_for_health(f"http://127.0.0.1:{given}", proc, log)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{in_file}/healthz", timeout=REQUEST_TIMEOUT)
    assert proc.returncode == 0


def test_require_auth_off_on_loopback_serves_without_a_key(tmp_path: Path, segment_dir: Path) -> None:
    with netprofd(
        tmp_path, segment_dir, daemon={"require_auth": False}, api_key=None, env=daemon_env(None)
    ) as d:
        response = httpx.get(f"{d.url}/api/v1/debug/network-stats", timeout=REQUEST_TIMEOUT)
        assert response.status_code == 200 and response.json()["applications"] == []


@pytest.mark.parametrize("phase", sorted(p.name for p in (DEPLOY / "phases").glob("*.json")))
def test_the_guides_phase_configs_pass_check(phase: str) -> None:
    done = run_netprofd(DEPLOY / "phases" / phase, "--check")
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


# -- 2. one daemon per segment directory -------------------------------------------


def test_a_second_daemon_on_the_same_directory_is_refused(tmp_path: Path, segment_dir: Path) -> None:
    with netprofd(tmp_path, segment_dir, daemon=FAST) as first:
        config = write_daemon_config(
            tmp_path / "second.toml", segment_dir, tmp_path / "second-state", free_port()
        )
        done = run_netprofd(config)
        assert done.returncode != 0
        assert f"another netprofd is watching {segment_dir}" in done.stderr, done.stderr
        assert first.get("/healthz").status_code == 200
    # The lock goes with the first daemon.
    with netprofd(tmp_path, segment_dir, name="second") as second:
        assert second.get("/healthz").status_code == 200


# -- 3. SIGHUP ------------------------------------------------------------------------


def test_sighup_reload_pushes_settings(
    tmp_path: Path, segment_dir: Path, make_recorder: Callable[..., Recorder]
) -> None:
    app = "reload-app"
    recorder = make_recorder(app_name=app)
    send(recorder, 10)
    with netprofd(tmp_path, segment_dir, daemon=FAST) as d:
        state_dir = tmp_path / "netprofd-state"

        def reload(**profiling: Any) -> None:
            write_daemon_config(d.config, segment_dir, state_dir, d.port, profiling=profiling, daemon=FAST)
            d.signal(signal.SIGHUP)

        def control(rec: Recorder = recorder) -> Any:
            return read_segment(rec.path, records=False).control

        d.wait_until(lambda: counted(d, app) == 10, what="the first 10 requests")

        # Feature flag off: the segment hears it, and nothing more is counted.
        reload(feature_flag_enabled=False)
        d.wait_until(lambda: not control().feature_flag_enabled, what="the feature flag to go off")
        d.wait_until(
            lambda: (m := app_metrics(d, app)) and m["enabled"] is False, what="enabled: false in the API"
        )
        send(recorder, 5)
        assert read_segment(recorder.path, records=False).counters.requests == 10
        assert counted(d, app) == 10

        # A broken file keeps the running config.
        write_toml(d.config, '[network_profiling]\nfeature_flag_enabled = "yes"\nsample_rte = 1\n')
        d.signal(signal.SIGHUP)
        d.wait_until(
            lambda: "failed; keeping the running config" in d.log(), what="the failed reload in the log"
        )
        assert "sample_rte" in d.log() and "feature_flag_enabled" in d.log()
        assert d.get("/healthz").status_code == 200
        assert not control().feature_flag_enabled and control().sample_rate == 1.0
        assert counted(d, app) == 10

        # Sample rate 0: the flag is back on, but every request is sampled out.
        reload(feature_flag_enabled=True, sample_rate=0.0)
        d.wait_until(
            lambda: control().feature_flag_enabled and control().sample_rate == 0.0, what="sample rate 0"
        )
        send(recorder, 5)
        counters = read_segment(recorder.path, records=False).counters
        assert counters.requests == 10 and counters.sampled_out == 5

        # A process that starts after the reload is given the reloaded settings.
        late = make_recorder(app_name="late-app")  # its own config says sample_rate 1.0
        d.wait_until(lambda: control(late).sample_rate == 0.0, what="the new process to get sample rate 0")
        send(late, 3)
        assert read_segment(late.path, records=False).counters.requests == 0

        # A good config brings recording back, everywhere.
        reload(feature_flag_enabled=True, enabled=True, sample_rate=1.0)
        d.wait_until(
            lambda: all(control(r).recording and control(r).sample_rate == 1.0 for r in (recorder, late)),
            what="recording to resume",
        )
        send(recorder, 7)
        send(late, 4)
        d.wait_until(
            lambda: counted(d, app) == 17 and counted(d, "late-app") == 4, what="the new requests counted"
        )
        assert "reloaded" in d.log()


# -- 4. systemd -----------------------------------------------------------------------


def test_systemd_notify_ready_watchdog_stopping(tmp_path: Path, segment_dir: Path) -> None:
    address = tmp_path / "notify.sock"
    port = free_port()
    config = write_daemon_config(tmp_path / "d.toml", segment_dir, tmp_path / "state", port, daemon=FAST)
    log = tmp_path / "d.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(address))
        sock.settimeout(START_TIMEOUT)
        env = daemon_env(NOTIFY_SOCKET=str(address), WATCHDOG_USEC="400000")

        def receive() -> list[str]:
            try:
                return sock.recv(4096).decode().split("\n")
            except TimeoutError:
                raise AssertionError(f"no notification; netprofd log:\n{log.read_text()}") from None

        with daemon_process(netprofd_argv(config), env, log) as proc:
            ready = receive()
            assert "READY=1" in ready, ready
            assert any(line.startswith("STATUS=") for line in ready), ready
            # READY=1 is sent once the API answers, not before.
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=REQUEST_TIMEOUT).status_code == 200
            for _ in range(3):
                ping = receive()
                assert "WATCHDOG=1" in ping, ping
            proc.send_signal(signal.SIGTERM)
            while "STOPPING=1" not in (message := receive()):
                assert "WATCHDOG=1" in message, message  # only pings may come before it
            assert proc.wait(20) == 0


# -- 5. files that are not segments ----------------------------------------------------


def test_bad_files_are_logged_once_and_skipped(
    tmp_path: Path, segment_dir: Path, make_recorder: Callable[..., Recorder]
) -> None:
    real = make_recorder(app_name="real")
    other = make_recorder(app_name="other")
    send(real, 12)
    send(other, 3)
    assert real.path is not None
    bad = {  # file name: the reasons the log line may give
        "garbage.npseg": ("not a netprof segment",),
        "truncated.npseg": ("truncated",),
        "version.npseg": (f"this netprof reads version {LAYOUT_VERSION}",),
        "x.npseg": ("Is a directory", "not a regular file"),
    }
    (segment_dir / "garbage.npseg").write_bytes(random.Random(7).randbytes(4096))
    truncated = segment_dir / "truncated.npseg"
    shutil.copyfile(real.path, truncated)
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    version = bytearray(real.path.read_bytes())
    offset = HEADER_OFFSETS["layout_version"]
    version[offset : offset + 4] = (LAYOUT_VERSION + 98).to_bytes(4, "little")
    (segment_dir / "version.npseg").write_bytes(bytes(version))
    (segment_dir / "x.npseg").mkdir()

    with netprofd(tmp_path, segment_dir, daemon=FAST) as d:
        d.wait_until(lambda: counted(d, "real") == 12 and counted(d, "other") == 3, what="the real segments")
        for more in range(1, 4):  # each batch seen means at least one more tick went by
            send(real, 1)
            d.wait_until(lambda more=more: counted(d, "real") == 12 + more, what="one more tick")
        log = d.log()
        for name, reasons in bad.items():
            path = str(segment_dir / name)
            lines = [line for line in log.splitlines() if path in line]
            assert len(lines) == 1, (name, lines)
            assert any(reason in lines[0] for reason in reasons), (name, lines[0])
            assert lines[0].count(path) == 1, lines[0]  # named once, not "path: path: reason"
        stats = {a["app"] for a in d.stats()["applications"]}
        assert stats == {"real", "other"}
        assert (
            d.get(f"{NP}/memory-usage").json()["total_bytes"]
            == real.path.stat().st_size + other.path.stat().st_size
        )


# -- 6. processes that end -------------------------------------------------------------

WORKER = """\
import sys, time
from netprof_core import ProfilingConfig, Recorder
segment_dir, app, count, then, implementation = sys.argv[1:]
recorder = Recorder(ProfilingConfig(segment_dir=segment_dir, app_name=app), implementation=implementation)
rid = recorder.route_id("/work", "GET")
now = time.monotonic_ns()
for i in range(int(count)):
    recorder.record(rid, 200, now, now + 1_000_000 + i * 1000, 10, 100)
print(recorder.path, flush=True)
if then == "sleep":
    time.sleep(600)
"""


@contextlib.contextmanager
def worker(
    segment_dir: Path, app: str, count: int, then: str, implementation: str
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A profiled process that records ``count`` requests, prints its segment's
    path, then sleeps (``then="sleep"``) or exits normally (``"exit"``)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(segment_dir), app, str(count), then, implementation],
        cwd=ROOT,
        env=server_env(implementation),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        path = Path(proc.stdout.readline().strip())
        assert path.name.endswith(".npseg"), f"the worker did not start (exit code {proc.poll()})"
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_ended_processes_are_folded_and_persisted(
    tmp_path: Path, segment_dir: Path, implementation: str
) -> None:
    app, killed, exited = "worker-app", 25, 7
    with netprofd(tmp_path, segment_dir, daemon=FAST) as d:
        with worker(segment_dir, app, killed, "sleep", implementation) as (proc, path):
            d.wait_until(lambda: counted(d, app) == killed, what="the worker's requests")
            before = request_counters(d)
            assert before, "no network_profiling_requests_total series"
            proc.send_signal(signal.SIGKILL)
            proc.wait()  # reaped: a zombie still has its /proc entry
            d.wait_until(lambda: not path.exists(), what="the killed worker's segment to be removed")
            d.wait_until(
                lambda: (m := app_metrics(d, app)) and m["process_count"] == 0, what="no live process"
            )
            assert counted(d, app) == killed
            after_kill = request_counters(d)
            assert_no_counter_went_down(before, after_kill)
            assert f"process {proc.pid} of {app} ended: {killed} requests folded" in d.log()

        # A process that exits normally marks its segment closed; it is folded the same way.
        with worker(segment_dir, app, exited, "exit", implementation) as (proc, path):
            assert proc.wait(30) == 0
            d.wait_until(lambda: not path.exists(), what="the exited worker's segment to be removed")
            d.wait_until(lambda: counted(d, app) == killed + exited, what="both workers' requests")
            assert_no_counter_went_down(after_kill, request_counters(d))
    retired = json.loads((tmp_path / "netprofd-state" / "retired.json").read_text())
    assert app in retired["apps"]

    # A new daemon with the same state directory starts from the retired totals.
    with netprofd(tmp_path, segment_dir, daemon=FAST) as again:
        assert counted(again, app) == killed + exited
        assert app_metrics(again, app)["process_count"] == 0  # type: ignore[index]
        assert_no_counter_went_down(after_kill, request_counters(again))
