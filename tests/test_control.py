"""Run-time controls: every setting of the control block takes effect on the
recorder's next request, whether it is set in-process (``rec.control``) or by
another process (netprofd, the CLI) through ``SegmentControl.open(path)``.

Every test runs against both cores, and each control test once in-process
("local") and once from a separate Python process ("remote")."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netprof_core import ControlState, Recorder, SegmentControl, read_segment
from netprof_core.reader import Counters

MakeRecorder = Callable[..., Recorder]

ROOT = Path(__file__).resolve().parents[1]
T0 = 10**15
SECOND = 10**9

# A child process that applies SegmentControl calls it reads from stdin, one
# JSON request a line, and answers each with one JSON line.
_SERVER = r"""
import dataclasses, json, os, sys
from netprof_core import SegmentControl
print(json.dumps({"pid": os.getpid()}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    try:
        with SegmentControl.open(request["path"]) as control:
            result = getattr(control, request["method"])(*request["args"])
            if dataclasses.is_dataclass(result):
                result = dataclasses.asdict(result)
        answer = {"ok": True, "result": result}
    except Exception as exc:
        answer = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    print(json.dumps(answer), flush=True)
"""


class ControlServer:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = json.loads(self._readline())["pid"]

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"control server exited with {self.proc.wait()}")
        return line

    def call(self, path: Path, method: str, *args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"path": str(path), "method": method, "args": list(args)}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self._readline())
        if answer["ok"]:
            return answer["result"]
        exc_type = {"ValueError": ValueError, "SegmentError": OSError}.get(answer["type"], RuntimeError)
        raise exc_type(f"{answer['type']}: {answer['message']}")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class RemoteControl:
    """The SegmentControl API, each call made by the server process."""

    def __init__(self, server: ControlServer, path: Path) -> None:
        self._server = server
        self._path = path

    def __getattr__(self, method: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            return self._server.call(self._path, method, *args)

        return call


@pytest.fixture(scope="module")
def control_server() -> Iterator[ControlServer]:
    server = ControlServer()
    assert server.pid != os.getpid()
    yield server
    server.close()


@pytest.fixture(params=["local", "remote"])
def control_of(request: pytest.FixtureRequest) -> Callable[[Recorder], Any]:
    """``control_of(rec)``: the recorder's SegmentControl, in this process or in another."""
    if request.param == "local":
        return lambda rec: rec.control
    server = request.getfixturevalue("control_server")

    def remote(rec: Recorder) -> RemoteControl:
        assert rec.path is not None, "a remote process needs the segment file"
        return RemoteControl(server, rec.path)

    return remote


def counters(rec: Recorder) -> Counters:
    return rec.snapshot(records=False).counters


def state(rec: Recorder) -> ControlState:
    return rec.snapshot(records=False).control


def record_n(rec: Recorder, rid: int, n: int, *, end: int = T0, duration: int = 1000, status: int = 200) -> None:
    for i in range(n):
        rec.record(rid, status, end + i - duration, end + i)


# -- the remote process is real ---------------------------------------------------------------


def test_remote_controls_come_from_another_process(make_recorder: MakeRecorder, control_server: ControlServer) -> None:
    rec = make_recorder()
    assert control_server.pid != os.getpid()
    remote = RemoteControl(control_server, rec.path)
    remote.disable()
    assert not state(rec).enabled
    answer = remote.state()
    assert answer["enabled"] is False and answer["ring_capacity"] == rec.header.ring_capacity


# -- enable / disable / feature flag -------------------------------------------------------------


def test_disable_then_enable(make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any]) -> None:
    rec = make_recorder()
    rid = rec.route_id("/x")
    record_n(rec, rid, 3)
    control_of(rec).disable()
    assert not state(rec).enabled and not state(rec).recording

    record_n(rec, rid, 10)
    c = counters(rec)
    assert (c.requests, c.disabled_calls) == (3, 10)
    assert len(rec.snapshot().records) == 3

    control_of(rec).enable()
    assert state(rec).enabled and state(rec).recording
    record_n(rec, rid, 5)
    c = counters(rec)
    assert (c.requests, c.disabled_calls) == (8, 10)
    assert len(rec.snapshot().records) == 8


def test_measure_and_timed_obey_disable(make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any]) -> None:
    rec = make_recorder()
    control_of(rec).disable()

    @rec.timed("/fn")
    def fn() -> int:
        return 1

    with rec.measure("/block"):
        pass
    assert fn() == 1
    c = counters(rec)
    assert (c.requests, c.disabled_calls) == (0, 2)


def test_feature_flag_off_overrides_enabled(make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any]) -> None:
    rec = make_recorder()
    rid = rec.route_id("/x")
    control_of(rec).set_feature_flag(False)
    s = state(rec)
    assert s.enabled and not s.feature_flag_enabled and not s.recording

    control_of(rec).enable()  # enabled is already on; the flag still wins
    record_n(rec, rid, 7)
    assert (counters(rec).requests, counters(rec).disabled_calls) == (0, 7)

    control_of(rec).set_feature_flag(True)
    assert state(rec).recording
    record_n(rec, rid, 2)
    assert (counters(rec).requests, counters(rec).disabled_calls) == (2, 7)


def test_feature_flag_off_in_config(make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any]) -> None:
    rec = make_recorder(feature_flag_enabled=False)
    rid = rec.route_id("/x")
    record_n(rec, rid, 4)
    assert counters(rec).requests == 0
    control_of(rec).set_feature_flag(True)
    record_n(rec, rid, 4)
    assert counters(rec).requests == 4


def test_config_enabled_false_is_a_canary_switched_on_at_run_time(
    make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any]
) -> None:
    rec = make_recorder(enabled=False)
    rid = rec.route_id("/canary")
    assert not state(rec).enabled
    record_n(rec, rid, 20)
    snap = rec.snapshot()
    assert snap.counters.requests == 0 and snap.records == ()
    assert snap.counters.disabled_calls == 20
    assert all(r.count == 0 for r in snap.routes)

    control_of(rec).enable()
    record_n(rec, rid, 6)
    snap = rec.snapshot()
    assert snap.counters.requests == 6 and len(snap.records) == 6
    assert [r.count for r in snap.routes if r.key.template == "/canary"] == [6]


def test_enable_from_another_process_lifts_an_auto_disable(
    make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any]
) -> None:
    rec = make_recorder(auto_disable_on_error=True)
    rid = rec.route_id("/x")
    for _ in range(4):
        rec.record(rid, None, T0, T0 + 1)
    assert state(rec).auto_disabled
    control_of(rec).reset_errors()
    assert not state(rec).auto_disabled and counters(rec).consecutive_errors == 0
    record_n(rec, rid, 1)
    assert counters(rec).requests == 1


# -- sampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75, 1.0])
def test_sample_rate_records_that_fraction(
    make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any], rate: float
) -> None:
    rec = make_recorder()
    rid = rec.route_id("/sampled")
    control_of(rec).set_sample_rate(rate)
    assert state(rec).sample_rate == pytest.approx(rate)

    calls = 40_000
    record_n(rec, rid, calls)
    c = counters(rec)
    assert c.requests + c.sampled_out == calls
    assert c.disabled_calls == 0 and c.internal_errors == 0
    assert c.requests / calls == pytest.approx(rate, abs=0.02)
    if rate == 1.0:
        assert c.sampled_out == 0
    route = next(r for r in rec.snapshot(records=False).routes if r.key.template == "/sampled")
    assert route.count == c.requests


def test_sample_rate_from_config(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(sample_rate=0.5)
    rid = rec.route_id("/sampled")
    record_n(rec, rid, 20_000)
    c = counters(rec)
    assert c.requests + c.sampled_out == 20_000
    assert c.requests / 20_000 == pytest.approx(0.5, abs=0.02)


def test_sample_rate_zero_records_nothing(make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any]) -> None:
    rec = make_recorder()
    rid = rec.route_id("/none")
    control_of(rec).set_sample_rate(0)
    assert state(rec).sample_rate == 0.0
    record_n(rec, rid, 5000)
    snap = rec.snapshot()
    assert snap.counters.requests == 0 and snap.records == ()
    assert snap.counters.sampled_out == 5000

    control_of(rec).set_sample_rate(1.0)
    record_n(rec, rid, 10)
    assert counters(rec).requests == 10


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), float("inf"), True, "0.5", None])
def test_set_sample_rate_rejects_bad_values(
    make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any], bad: Any
) -> None:
    rec = make_recorder(sample_rate=0.75)
    with pytest.raises(ValueError, match="sample_rate"):
        control_of(rec).set_sample_rate(bad)
    assert state(rec).sample_rate == pytest.approx(0.75)


# -- retention ----------------------------------------------------------------------------------


def test_retention_hides_old_records_but_counters_keep_them(
    make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any]
) -> None:
    rec = make_recorder()
    rid = rec.route_id("/r")
    now = time.monotonic_ns()
    old_end = max(now - 3600 * SECOND, 1000)
    assert now - old_end > 10 * SECOND, "the monotonic clock is too young for this test"
    for i in range(5):
        rec.record(rid, 200, old_end - 1000 + i, old_end + i)  # an hour ago
    for i in range(3):
        rec.record(rid, 201, now - 1000 + i, now + i)  # just now
    assert len(rec.snapshot().records) == 8, "no age limit by default"

    control_of(rec).set_retention(60)
    assert state(rec).retention_seconds == 60.0
    snap = rec.snapshot()
    assert [r.status for r in snap.records] == [201, 201, 201]
    assert snap.counters.requests == 8
    route = next(r for r in snap.routes if r.key.template == "/r")
    assert route.count == 8 and route.histogram.count == 8

    control_of(rec).set_retention(0)
    assert len(rec.snapshot().records) == 8


def test_retention_from_config(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(retention_hours=1 / 3600)  # one second
    assert state(rec).retention_seconds == pytest.approx(1.0)
    rid = rec.route_id("/r")
    now = time.monotonic_ns()
    old_end = now - 30 * SECOND
    assert old_end > 0
    rec.record(rid, 500, old_end - 5, old_end)
    rec.record(rid, 200, now - 5, now)
    snap = rec.snapshot()
    assert [r.status for r in snap.records] == [200]
    assert snap.counters.requests == 2


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "60", None])
def test_set_retention_rejects_bad_values(
    make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any], bad: Any
) -> None:
    rec = make_recorder()
    with pytest.raises(ValueError, match="retention"):
        control_of(rec).set_retention(bad)
    assert state(rec).retention_seconds == 0.0


def test_set_retention_too_large_raises_valueerror(make_recorder: MakeRecorder) -> None:
    rec = make_recorder()
    for huge in (1e11, 1e300):
        with pytest.raises(ValueError, match="retention"):
            rec.control.set_retention(huge)


# -- ring capacity --------------------------------------------------------------------------------


def test_set_ring_capacity_lowers_the_records_served(
    make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any]
) -> None:
    rec = make_recorder(max_stored_requests=200)
    rid = rec.route_id("/ring")
    record_n(rec, rid, 100)
    assert len(rec.snapshot().records) == 100

    control_of(rec).set_ring_capacity(10)
    assert state(rec).ring_capacity == 10
    records = rec.snapshot().records
    assert [r.index for r in records] == list(range(90, 100))

    for more in (1, 4, 9, 10, 25, 333):
        record_n(rec, rid, more)
        records = rec.snapshot().records
        total = counters(rec).requests
        assert len(records) == 10
        assert [r.index for r in records] == list(range(total - 10, total))

    assert counters(rec).requests == 100 + 1 + 4 + 9 + 10 + 25 + 333

    control_of(rec).set_ring_capacity(200)
    record_n(rec, rid, 400)
    records = rec.snapshot().records
    total = counters(rec).requests
    assert [r.index for r in records] == list(range(total - 200, total))


def test_ring_never_serves_more_than_capacity(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(max_stored_requests=50)
    rid = rec.route_id("/ring")
    record_n(rec, rid, 1234)
    records = rec.snapshot().records
    assert len(records) == 50
    assert records[-1].index == 1233


@pytest.mark.parametrize("bad", ["zero", "over", -1, 2.5, True, "10", None])
def test_set_ring_capacity_rejects_bad_values(
    make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any], bad: Any
) -> None:
    rec = make_recorder(max_stored_requests=100)
    value = 0 if bad == "zero" else rec.header.ring_capacity + 1 if bad == "over" else bad
    with pytest.raises(ValueError, match="ring capacity"):
        control_of(rec).set_ring_capacity(value)
    assert state(rec).ring_capacity == 100


# -- cleanup --------------------------------------------------------------------------------------


def test_cleanup_drops_records_but_keeps_counters_and_histograms(
    make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any]
) -> None:
    rec = make_recorder()
    rid = rec.route_id("/c")
    record_n(rec, rid, 30, duration=5000)
    before = rec.snapshot()
    assert len(before.records) == 30

    control_of(rec).cleanup()
    after = rec.snapshot()
    assert after.records == ()
    assert after.control.clean_floor == 30
    assert after.counters.requests == 30
    assert after.routes == before.routes
    route = next(r for r in after.routes if r.key.template == "/c")
    assert route.count == 30 and route.histogram.count == 30 and route.sum_ns == 30 * 5000

    record_n(rec, rid, 4, end=T0 + SECOND)
    snap = rec.snapshot()
    assert [r.index for r in snap.records] == [30, 31, 32, 33]
    assert snap.counters.requests == 34


# -- slow requests ----------------------------------------------------------------------------------


def slow_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "netprof.recorder" and r.levelno == logging.WARNING and "slow request" in r.getMessage()
    ]


def test_log_slow_requests_on_and_off_at_run_time(
    make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="netprof.recorder")
    rec = make_recorder(log_slow_requests=False, slow_request_threshold=1.0)
    rid = rec.route_id("/slow")
    end = T0

    def slow_request() -> None:
        nonlocal end
        end += 10 * SECOND  # well apart: the rate limit plays no part here
        rec.record(rid, 200, end - 2 * SECOND, end)

    slow_request()
    assert slow_lines(caplog) == []

    control_of(rec).set_log_slow_requests(True)
    assert state(rec).log_slow_requests
    slow_request()
    assert len(slow_lines(caplog)) == 1

    control_of(rec).set_log_slow_requests(False)
    assert not state(rec).log_slow_requests
    slow_request()
    slow_request()
    assert len(slow_lines(caplog)) == 1
    slow_stats = next(r for r in rec.snapshot(records=False).routes if r.key.template == "/slow")
    assert slow_stats.slow == 4


def test_slow_threshold_at_run_time(make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any]) -> None:
    rec = make_recorder(slow_request_threshold=2.0, log_slow_requests=False)
    rid = rec.route_id("/t")
    rec.record(rid, 200, T0, T0 + SECOND // 2)
    control_of(rec).set_slow_request_threshold(0.25)
    assert state(rec).slow_request_threshold == pytest.approx(0.25)
    rec.record(rid, 200, T0, T0 + SECOND // 2)
    assert [r.slow for r in rec.snapshot().records] == [False, True]
    with pytest.raises(ValueError):
        control_of(rec).set_slow_request_threshold(0)
    with pytest.raises(ValueError):
        control_of(rec).set_slow_request_threshold(7200)
    assert state(rec).slow_request_threshold == pytest.approx(0.25)


# -- performance monitoring ----------------------------------------------------------------------------


def test_performance_monitoring_on_and_off(make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any]) -> None:
    rec = make_recorder(performance_monitoring=False)
    rid = rec.route_id("/p")
    record_n(rec, rid, 500)
    assert counters(rec).overhead_count == 0

    control_of(rec).set_performance_monitoring(True)
    assert state(rec).performance_monitoring
    record_n(rec, rid, 500)
    timed = counters(rec).overhead_count
    assert 0 < timed <= 500
    assert counters(rec).overhead_histogram.count == timed

    control_of(rec).set_performance_monitoring(False)
    record_n(rec, rid, 500)
    assert counters(rec).overhead_count == timed


# -- the state a reader sees ------------------------------------------------------------------------------


def test_control_state_reflects_every_setting(make_recorder: MakeRecorder, control_of: Callable[[Recorder], Any]) -> None:
    rec = make_recorder(
        enabled=True,
        feature_flag_enabled=True,
        log_slow_requests=True,
        performance_monitoring=True,
        auto_disable_on_error=False,
        graceful_degradation=True,
        sample_rate=1.0,
        slow_request_threshold=2.0,
        max_stored_requests=100,
        retention_hours=0.0,
    )
    initial = state(rec)
    assert initial == ControlState(
        enabled=True,
        feature_flag_enabled=True,
        auto_disabled=False,
        log_slow_requests=True,
        performance_monitoring=True,
        auto_disable_on_error=False,
        graceful_degradation=True,
        sample_rate=1.0,
        slow_request_threshold=2.0,
        ring_capacity=100,
        retention_seconds=0.0,
        clean_floor=0,
    )
    rid = rec.route_id("/s")
    record_n(rec, rid, 7)
    ctl = control_of(rec)
    ctl.disable()
    ctl.set_feature_flag(False)
    ctl.set_log_slow_requests(False)
    ctl.set_performance_monitoring(False)
    ctl.set_sample_rate(0.5)
    ctl.set_slow_request_threshold(0.75)
    ctl.set_ring_capacity(42)
    ctl.set_retention(90)
    ctl.cleanup()
    rec.record(rid, "bad", T0, T0 + 1)

    expected = ControlState(
        enabled=False,
        feature_flag_enabled=False,
        auto_disabled=False,
        log_slow_requests=False,
        performance_monitoring=False,
        auto_disable_on_error=False,
        graceful_degradation=True,
        sample_rate=0.5,
        slow_request_threshold=0.75,
        ring_capacity=42,
        retention_seconds=90.0,
        clean_floor=7,
    )
    assert counters(rec).consecutive_errors == 0  # a disabled recorder does not look at the call
    assert state(rec) == expected
    assert rec.control.state() == expected
    # Any reader of the file sees the same state.
    assert read_segment(rec.path, records=False).control == expected
    with SegmentControl.open(rec.path) as other:
        assert other.state() == expected


def test_consecutive_errors_show_in_the_state(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(auto_disable_on_error=True)
    rid = rec.route_id("/e")
    rec.record(rid, "bad", T0, T0 + 1)
    rec.record(rid, "bad", T0, T0 + 1)
    s = state(rec)
    assert counters(rec).consecutive_errors == 2 and not s.auto_disabled and s.auto_disable_on_error


@pytest.mark.parametrize("hours", [1e7, 1e300])
def test_huge_retention_in_config_does_not_break_start_up(
    implementation: str, segment_dir: Path, hours: float
) -> None:
    from netprof_core import ConfigError, ProfilingConfig

    try:
        config = ProfilingConfig(segment_dir=str(segment_dir), app_name="t", retention_hours=hours)
    except ConfigError:
        return  # rejected up front: fine too
    rec = Recorder(config, implementation=implementation)
    try:
        rid = rec.route_id("/x")
        rec.record(rid, 200, T0, T0 + 1)
        assert rec.snapshot().counters.requests == 1
    finally:
        rec.close(remove=True)
