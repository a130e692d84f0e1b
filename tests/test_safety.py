"""The recorder never hurts the application: bad calls are counted, not raised
(while graceful degradation is on), too many in a row switch recording off, and
the conveniences around ``record()`` keep the caller's exceptions and results.

Every test runs against both cores (the ``implementation`` fixture)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netprof_core import Direction, ErrorKind, Recorder
from netprof_core.reader import Counters, RouteStats

MakeRecorder = Callable[..., Recorder]

I64_MAX = 2**63 - 1
U64_MAX = 2**64 - 1
# A plausible monotonic clock value, far from 0 so that start_ns - x stays valid.
T0 = 10**15
SECOND = 10**9


def counters(rec: Recorder) -> Counters:
    return rec.snapshot(records=False).counters


def route(rec: Recorder, template: str, method: str = "GET") -> RouteStats:
    matches = [r for r in rec.snapshot(records=False).routes if r.key.template == template and r.key.method == method]
    assert len(matches) == 1, f"route {method} {template} not in the snapshot"
    return matches[0]


def calls_accounted(c: Counters) -> int:
    """Every record() call ends up in exactly one of these counters."""
    return c.requests + c.internal_errors + c.disabled_calls + c.sampled_out


# -- bad arguments -----------------------------------------------------------------

JUNK = [
    "200",
    "",
    None,
    1.0,
    200.0,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    Decimal(200),
    Decimal("NaN"),
    Fraction(1, 2),
    1 + 2j,
    b"200",
    [200],
    (200,),
    {"status": 200},
    object(),
    -1,
    -(2**70),
    2**64,
    2**100,
]

POSITIONS = ("route_id", "status", "start_ns", "end_ns", "bytes_in", "bytes_out", "error_kind", "ttfb_ns")


def good_args(route_id: int) -> list[Any]:
    return [route_id, 200, T0, T0 + 1000, 10, 20, 0, 500]


@pytest.mark.parametrize("position", range(len(POSITIONS)), ids=POSITIONS)
@pytest.mark.parametrize("junk", JUNK, ids=[repr(j)[:20] for j in JUNK])
def test_junk_in_any_position_is_counted_not_raised(make_recorder: MakeRecorder, position: int, junk: Any) -> None:
    rec = make_recorder(auto_disable_on_error=False)
    rid = rec.route_id("/items")
    args = good_args(rid)
    args[position] = junk

    rec.record(*args)  # must not raise
    rec.record(*good_args(rid))

    c = counters(rec)
    assert c.internal_errors == 1
    assert c.requests == 1
    assert route(rec, "/items").count == 1
    assert [r.status for r in rec.snapshot().records] == [200]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"end_ns": T0 - 1}, id="end-before-start"),
        pytest.param({"start_ns": -5, "end_ns": 5}, id="negative-start"),
        pytest.param({"start_ns": 0, "end_ns": I64_MAX + 1}, id="end-past-int64"),
        pytest.param({"start_ns": -(2**70), "end_ns": 2**70}, id="huge-times"),
        pytest.param({"status": 0x10000}, id="status-past-u16"),
        pytest.param({"status": -200}, id="negative-status"),
        pytest.param({"bytes_in": -1}, id="negative-bytes-in"),
        pytest.param({"bytes_out": 2**64}, id="bytes-out-2**64"),
        pytest.param({"ttfb_ns": 2**100}, id="ttfb-2**100"),
        pytest.param({"error_kind": 8}, id="error-kind-8"),
        pytest.param({"error_kind": 255}, id="error-kind-255"),
        pytest.param({"error_kind": -1}, id="error-kind-negative"),
        pytest.param({"route_id": 10_000}, id="route-past-table"),
        pytest.param({"route_id": 2**64}, id="route-2**64"),
        pytest.param({"route_id": -1}, id="route-negative"),
    ],
)
def test_out_of_range_ints_are_internal_errors(make_recorder: MakeRecorder, overrides: dict[str, Any]) -> None:
    rec = make_recorder(auto_disable_on_error=False)
    rid = rec.route_id("/items")
    kwargs = dict(zip(POSITIONS, good_args(rid)))
    kwargs.update(overrides)

    rec.record(**kwargs)

    c = counters(rec)
    assert (c.internal_errors, c.requests) == (1, 0)
    assert rec.snapshot().records == ()


def test_extreme_but_valid_values_are_recorded(make_recorder: MakeRecorder) -> None:
    rec = make_recorder()
    rid = rec.route_id("/edge")
    rec.record(rid, 0xFFFF, 0, I64_MAX, U64_MAX, U64_MAX, int(ErrorKind.OTHER), U64_MAX)
    rec.record(rid, 0, 0, 0)  # zero duration, no status

    c = counters(rec)
    assert (c.requests, c.internal_errors) == (2, 0)
    first, second = rec.snapshot().records
    assert (first.status, first.duration_ns, first.bytes_in, first.bytes_out, first.ttfb_ns) == (
        0xFFFF,
        I64_MAX,
        U64_MAX,
        U64_MAX,
        U64_MAX,
    )
    assert first.error_kind == ErrorKind.OTHER and first.error
    assert (second.status, second.duration_ns, second.error) == (0, 0, False)


def test_route_ids_beyond_the_interned_ones_are_internal_errors(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(max_routes=24)
    rec.route_id("/only")
    rec.record(rec.header.route_capacity + 1, 200, T0, T0 + 1)  # past the table
    assert (counters(rec).internal_errors, counters(rec).requests) == (1, 0)


def test_uninterned_route_id_is_an_internal_error(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(max_routes=24)
    rid = rec.route_id("/only")
    rec.record(rid + 4, 200, T0, T0 + 1)  # an id route_id() never returned

    snap = rec.snapshot()
    assert (snap.counters.internal_errors, snap.counters.requests) == (1, 0)
    assert sum(r.count for r in snap.routes) == snap.counters.requests


# -- a property over arbitrary calls ------------------------------------------------

SLOTS_PLACEHOLDER = -123456  # replaced by a route id past the table at run time

junk_values = st.one_of(
    st.text(max_size=4),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.fractions(),
    st.binary(max_size=4),
    st.builds(object),
    st.lists(st.integers(), max_size=2),
    st.integers(max_value=-1),
    st.integers(min_value=2**64, max_value=2**100),
    st.just(-(2**70)),
)
# Per position: a valid value, and an int that is out of that position's range.
valid_by_position = [
    None,  # route ids are drawn from the interned ones
    st.integers(0, 0xFFFF),
    None,  # times are drawn together
    None,
    st.integers(0, U64_MAX),
    st.integers(0, U64_MAX),
    st.integers(0, 7),
    st.integers(0, U64_MAX),
]
out_of_range_by_position = [
    st.just(SLOTS_PLACEHOLDER),
    st.integers(0x10000, 2**70),
    st.integers(I64_MAX + 1, 2**70),
    st.integers(I64_MAX + 1, 2**70),
    st.integers(2**64, 2**70),
    st.integers(2**64, 2**70),
    st.integers(8, 2**70),
    st.integers(2**64, 2**70),
]


@st.composite
def record_calls(draw: st.DrawFn, route_ids: list[int]) -> tuple[list[Any], str]:
    """A call's arguments and what it is: "valid", "invalid", or "bool" (an int
    subclass: the recorder may take it as an int or refuse it)."""
    start = draw(st.integers(0, I64_MAX))
    end = draw(st.integers(start, I64_MAX))
    args: list[Any] = [draw(st.sampled_from(route_ids)), None, start, end, None, None, None, None]
    for i, strategy in enumerate(valid_by_position):
        if strategy is not None:
            args[i] = draw(strategy)
    kind = draw(st.sampled_from(["valid", "valid", "invalid", "bool", "swapped"]))
    if kind == "invalid":
        for i in draw(st.sets(st.integers(0, 7), min_size=1, max_size=8)):
            args[i] = draw(st.one_of(junk_values, out_of_range_by_position[i]))
    elif kind == "bool":
        i = draw(st.sampled_from([1, 4, 5, 6, 7]))  # positions where True/False are in range
        args[i] = draw(st.booleans())
    elif kind == "swapped":
        if start == end:
            end += 1
        args[2], args[3] = end, start
        kind = "invalid"
    return args, kind


@pytest.mark.parametrize("auto_disable", [False, True], ids=["auto-disable-off", "auto-disable-on"])
def test_any_mix_of_calls_never_raises_and_every_call_is_accounted(
    make_recorder: MakeRecorder, auto_disable: bool
) -> None:
    rec = make_recorder(auto_disable_on_error=auto_disable, log_slow_requests=False)
    route_ids = [0, rec.route_id("/a"), rec.route_id("/b", "POST"), rec.route_id("/c", "GET", Direction.OUTBOUND)]
    past_table = rec.header.route_capacity + 1

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.lists(record_calls(route_ids), min_size=1, max_size=12), st.booleans())
    def check(calls: list[tuple[list[Any], str]], as_keywords: bool) -> None:
        rec.control.enable()  # lift an auto-disable left by the previous example
        before = counters(rec)
        for args, _ in calls:
            args = [past_table if type(a) is int and a == SLOTS_PLACEHOLDER else a for a in args]
            if as_keywords:
                rec.record(*args[:4], **dict(zip(POSITIONS[4:], args[4:])))
            else:
                rec.record(*args)
        after = counters(rec)

        assert calls_accounted(after) - calls_accounted(before) == len(calls)
        assert after.sampled_out == before.sampled_out
        valid = sum(kind == "valid" for _, kind in calls)
        bools = sum(kind == "bool" for _, kind in calls)
        invalid = sum(kind == "invalid" for _, kind in calls)
        recorded = after.requests - before.requests
        errors = after.internal_errors - before.internal_errors
        if not auto_disable:
            assert after.disabled_calls == before.disabled_calls
            assert valid <= recorded <= valid + bools
            assert invalid <= errors <= invalid + bools
        else:
            assert recorded <= valid + bools
            assert errors <= invalid + bools
            if after.auto_disable_events == before.auto_disable_events:
                assert recorded >= valid and errors >= invalid

    check()


# -- auto-disable ---------------------------------------------------------------------


def bad_call(rec: Recorder, rid: int) -> None:
    rec.record(rid, "not a status", T0, T0 + 1)


def good_call(rec: Recorder, rid: int) -> None:
    rec.record(rid, 200, T0, T0 + 1)


def test_more_than_three_consecutive_errors_disable_recording(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(auto_disable_on_error=True)
    rid = rec.route_id("/x")
    good_call(rec, rid)
    for _ in range(3):
        bad_call(rec, rid)
    assert not rec.snapshot().control.auto_disabled, "three errors in a row are tolerated"

    bad_call(rec, rid)  # the fourth
    snap = rec.snapshot()
    assert snap.control.auto_disabled
    assert not snap.control.recording
    assert snap.counters.auto_disable_events == 1
    assert snap.counters.internal_errors == 4

    for _ in range(5):
        good_call(rec, rid)
    for _ in range(5):
        bad_call(rec, rid)
    snap = rec.snapshot()
    assert snap.counters.requests == 1
    assert snap.counters.disabled_calls == 10
    assert snap.counters.internal_errors == 4
    assert snap.counters.auto_disable_events == 1
    assert route(rec, "/x").count == 1
    assert len(snap.records) == 1


def test_without_auto_disable_recording_goes_on(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(auto_disable_on_error=False)
    rid = rec.route_id("/x")
    for _ in range(50):
        bad_call(rec, rid)
    good_call(rec, rid)
    snap = rec.snapshot()
    assert not snap.control.auto_disabled
    assert snap.counters.auto_disable_events == 0
    assert (snap.counters.internal_errors, snap.counters.requests, snap.counters.disabled_calls) == (50, 1, 0)


def test_a_good_call_resets_the_consecutive_count(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(auto_disable_on_error=True)
    rid = rec.route_id("/x")
    for _ in range(3):
        bad_call(rec, rid)
    assert rec.snapshot().counters.consecutive_errors == 3
    good_call(rec, rid)
    assert rec.snapshot().counters.consecutive_errors == 0
    for _ in range(3):
        bad_call(rec, rid)
    good_call(rec, rid)

    snap = rec.snapshot()
    assert not snap.control.auto_disabled
    assert snap.counters.auto_disable_events == 0
    assert (snap.counters.requests, snap.counters.internal_errors) == (2, 6)


@pytest.mark.parametrize("lift", ["reset_errors", "enable"])
def test_reset_errors_and_enable_lift_the_auto_disable(make_recorder: MakeRecorder, lift: str) -> None:
    rec = make_recorder(auto_disable_on_error=True)
    rid = rec.route_id("/x")
    for _ in range(4):
        bad_call(rec, rid)
    assert rec.snapshot().control.auto_disabled

    getattr(rec.control, lift)()
    snapshot = rec.snapshot()
    state = snapshot.control
    assert not state.auto_disabled and snapshot.counters.consecutive_errors == 0 and state.recording

    good_call(rec, rid)
    assert counters(rec).requests == 1
    # A later run of errors disables it again, as a second event.
    for _ in range(4):
        bad_call(rec, rid)
    snap = rec.snapshot()
    assert snap.control.auto_disabled
    assert snap.counters.auto_disable_events == 2


def test_internal_error_counts_toward_auto_disable(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(auto_disable_on_error=True)
    for _ in range(4):
        rec.internal_error(RuntimeError("a hook failed"))  # must not raise
    snap = rec.snapshot()
    assert snap.counters.internal_errors == 4
    assert snap.control.auto_disabled


# -- graceful degradation off ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(("not-a-status", T0, T0 + 1), "'not-a-status'", id="str-status"),
        pytest.param((200, T0 + 7, T0 + 3), str(T0 + 7), id="end-before-start"),
        pytest.param((200, T0, T0 + 1, -42), "-42", id="negative-bytes"),
        pytest.param((200, T0, T0 + 1, 0, 0, 99), "99", id="bad-error-kind"),
    ],
)
def test_without_graceful_degradation_a_bad_call_raises_valueerror_naming_it(
    make_recorder: MakeRecorder, args: tuple[Any, ...], named: str
) -> None:
    rec = make_recorder(graceful_degradation=False)
    rid = rec.route_id("/strict")
    with pytest.raises(ValueError) as info:
        rec.record(rid, *args)
    assert named in str(info.value)
    assert counters(rec).internal_errors == 1
    # Good calls still work afterwards.
    rec.record(rid, 200, T0, T0 + 1)
    assert counters(rec).requests == 1


def test_without_graceful_degradation_internal_error_reraises(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(graceful_degradation=False)
    exc = RuntimeError("hook broke")
    with pytest.raises(RuntimeError) as info:
        rec.internal_error(exc)
    assert info.value is exc
    assert counters(rec).internal_errors == 1


# -- route_id ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "method", "direction"),
    [
        pytest.param(123, "GET", Direction.INBOUND, id="int-template"),
        pytest.param(None, "GET", Direction.INBOUND, id="none-template"),
        pytest.param(b"/bytes", "GET", Direction.INBOUND, id="bytes-template"),
        pytest.param("/ok", None, Direction.INBOUND, id="none-method"),
        pytest.param("/ok", 7, Direction.INBOUND, id="int-method"),
        pytest.param("/ok", "GET", 7, id="direction-7"),
        pytest.param("/ok", "GET", -1, id="direction-negative"),
        pytest.param(["/list"], "GET", Direction.INBOUND, id="unhashable-template"),
        pytest.param("/ok", "GET", "inbound", id="str-direction"),
        pytest.param("/ok", "GET", None, id="none-direction"),
    ],
)
def test_route_id_with_bad_input_returns_the_overflow_route(
    make_recorder: MakeRecorder, template: Any, method: Any, direction: Any
) -> None:
    rec = make_recorder()
    assert rec.route_id(template, method, direction) == 0
    c = counters(rec)
    assert c.internal_errors == 1
    # The recorder still works, and the bad key did not take a slot in the table.
    rid = rec.route_id("/good")
    assert rid == 1
    rec.record(rid, 200, T0, T0 + 1)
    assert counters(rec).requests == 1
    assert [r.key.template for r in rec.snapshot().routes] == ["<other>", "/good"]


def test_route_id_is_stable_and_overflows_into_route_zero(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(max_routes=2)
    a = rec.route_id("/a")
    b = rec.route_id("/b", "POST")
    assert (a, b) == (1, 2)
    assert rec.route_id("/a") == a
    assert rec.route_id("/c") == 0
    assert rec.route_id("/d", "PUT", Direction.OUTBOUND) == 0
    assert counters(rec).internal_errors == 0
    assert counters(rec).overflowed_routes == 2


# -- measure() and timed() ---------------------------------------------------------------


def test_measure_records_the_block(make_recorder: MakeRecorder) -> None:
    rec = make_recorder()
    with rec.measure("/users/{id}", "GET") as m:
        m.status = 201
        m.bytes_in = 12
        m.bytes_out = 34
    (record,) = rec.snapshot().records
    assert (record.route.template, record.route.method, record.status) == ("/users/{id}", "GET", 201)
    assert (record.bytes_in, record.bytes_out, record.error_kind) == (12, 34, ErrorKind.NONE)


def test_measure_records_an_escaping_exception_and_reraises_it_unchanged(make_recorder: MakeRecorder) -> None:
    rec = make_recorder()
    exc = KeyError("missing")
    with pytest.raises(KeyError) as info, rec.measure("/boom", "POST") as m:
        m.status = 200
        raise exc
    assert info.value is exc
    assert info.value.args == ("missing",)

    (record,) = rec.snapshot().records
    assert record.error_kind == ErrorKind.EXCEPTION and record.error
    stats = route(rec, "/boom", "POST")
    assert stats.count == 1 and stats.errors == 1
    assert stats.error_kinds[ErrorKind.EXCEPTION] == 1


def test_measure_keeps_an_error_kind_set_in_the_block(make_recorder: MakeRecorder) -> None:
    rec = make_recorder()
    with pytest.raises(TimeoutError), rec.measure("/upstream", "GET", Direction.OUTBOUND) as m:
        m.error_kind = ErrorKind.TIMEOUT
        raise TimeoutError
    (record,) = rec.snapshot().records
    assert record.error_kind == ErrorKind.TIMEOUT
    assert record.route.direction == Direction.OUTBOUND


def test_measure_with_bad_values_set_in_the_block_does_not_raise(make_recorder: MakeRecorder) -> None:
    rec = make_recorder()
    with rec.measure("/weird") as m:
        m.status = "teapot"  # type: ignore[assignment]
    assert counters(rec).internal_errors == 1
    assert counters(rec).requests == 0


def test_timed_records_each_call_of_a_sync_function(make_recorder: MakeRecorder) -> None:
    rec = make_recorder()

    @rec.timed("/api/fetch", "GET")
    def fetch(x: int, *, y: int = 1) -> int:
        """Docstring kept."""
        return x + y

    assert fetch.__name__ == "fetch" and fetch.__doc__ == "Docstring kept."
    assert [fetch(1), fetch(2, y=5), fetch(3)] == [2, 7, 4]
    stats = route(rec, "/api/fetch")
    assert stats.count == 3 and stats.errors == 0
    assert stats.key.direction == Direction.OUTBOUND


def test_timed_records_each_call_of_an_async_function(make_recorder: MakeRecorder) -> None:
    rec = make_recorder()

    @rec.timed("/api/async", "POST")
    async def call(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    @rec.timed("/api/async-fails", "POST")
    async def fails() -> None:
        await asyncio.sleep(0)
        raise ConnectionError("down")

    assert asyncio.iscoroutinefunction(call)

    async def main() -> list[int]:
        results = [await call(1), await call(2)]
        results += await asyncio.gather(call(3), call(4))
        with pytest.raises(ConnectionError, match="down"):
            await fails()
        return results

    assert asyncio.run(main()) == [2, 4, 6, 8]
    assert route(rec, "/api/async", "POST").count == 4
    failing = route(rec, "/api/async-fails", "POST")
    assert failing.count == 1 and failing.error_kinds[ErrorKind.EXCEPTION] == 1


def test_timed_sync_function_exception_is_recorded_and_reraised(make_recorder: MakeRecorder) -> None:
    rec = make_recorder()

    @rec.timed("/api/sync-fails")
    def fails() -> None:
        raise ValueError("nope")

    with pytest.raises(ValueError, match="nope"):
        fails()
    assert route(rec, "/api/sync-fails").error_kinds[ErrorKind.EXCEPTION] == 1


# -- slow-request logging -------------------------------------------------------------------


def slow_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "netprof.recorder" and r.levelno == logging.WARNING and "slow request" in r.getMessage()
    ]


def test_slow_requests_are_logged_rate_limited(make_recorder: MakeRecorder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="netprof.recorder")
    rec = make_recorder(log_slow_requests=True, slow_request_threshold=0.5)
    rid = rec.route_id("/slow", "GET")
    fast = rec.route_id("/fast", "GET")

    rec.record(fast, 200, T0, T0 + SECOND // 100)  # 10 ms: not slow
    assert slow_lines(caplog) == []

    # A burst of 50 slow requests ending within one second: one line.
    for i in range(50):
        end = T0 + 10 * SECOND + i * 1000
        rec.record(rid, 200, end - 3 * SECOND, end)
    lines = slow_lines(caplog)
    assert len(lines) == 1
    assert "/slow" in lines[0] and "GET" in lines[0] and "3.000 s" in lines[0] and "200" in lines[0]
    assert "not logged" not in lines[0]

    # The next one, later on, says how many were left out.
    end = T0 + 20 * SECOND
    rec.record(rid, 504, end - 2 * SECOND, end)
    lines = slow_lines(caplog)
    assert len(lines) == 2
    assert "49 more slow requests not logged" in lines[1]
    assert "504" in lines[1]

    assert route(rec, "/slow").slow == 51
    assert route(rec, "/fast").slow == 0


def test_slow_requests_are_not_logged_when_off(make_recorder: MakeRecorder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="netprof.recorder")
    rec = make_recorder(log_slow_requests=False, slow_request_threshold=0.5)
    rid = rec.route_id("/slow")
    for i in range(5):
        end = T0 + i * 5 * SECOND
        rec.record(rid, 200, end - 3 * SECOND, end)
    assert slow_lines(caplog) == []
    assert route(rec, "/slow").slow == 5
    assert all(r.slow for r in rec.snapshot().records)


def test_slow_threshold_is_inclusive_and_marks_records(make_recorder: MakeRecorder) -> None:
    rec = make_recorder(log_slow_requests=False, slow_request_threshold=1.0)
    rid = rec.route_id("/t")
    rec.record(rid, 200, T0, T0 + SECOND - 1)
    rec.record(rid, 200, T0, T0 + SECOND)
    records = rec.snapshot().records
    assert [r.slow for r in records] == [False, True]
    assert route(rec, "/t").slow == 1
