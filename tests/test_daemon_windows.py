"""The daemon's 1 m / 5 m / 15 m windows: snapshot deltas of real segments,
with the checkpoint times given explicitly (no waiting for minutes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from netprof_core import Histogram, Recorder
from netprof_daemon.store import SegmentStore
from netprof_daemon.summary import quantiles, route_summary
from netprof_daemon.windows import COARSE_SPACING, FINE_SECONDS, FINE_SPACING, WindowHistory, parse_window

S = 1_000_000_000  # ns


def record(recorder: Recorder, route: int, durations_ms: list[float], status: int = 200) -> None:
    for ms in durations_ms:
        start = time.monotonic_ns()
        recorder.record(route, status, start, start + int(ms * 1e6))


def test_a_window_holds_only_what_happened_in_it(
    make_recorder: Callable[..., Recorder], segment_dir: Path
) -> None:
    recorder = make_recorder(app_name="win")
    fast = recorder.route_id("/fast")
    store = SegmentStore(segment_dir)
    history = WindowHistory()
    t0 = 1_000 * S

    record(recorder, fast, [1.0] * 100)  # long ago
    store.refresh()
    history.add(t0, store.apps())
    record(recorder, fast, [50.0] * 20, status=500)  # in the last minute
    store.refresh()
    apps = store.apps()
    history.add(t0 + 30 * S, apps)

    now = t0 + 61 * S
    window = history.window(apps, now, 60.0)["win"]
    assert window.seconds == 61.0
    (route,) = [r for r in window.routes.values() if r.count]
    assert (route.count, route.errors, route.status_classes[5]) == (20, 20, 20)
    summary = route_summary(route, window.seconds)
    assert summary["p50_ms"] == pytest.approx(50.0, rel=0.01)
    assert summary["error_percent"] == 100.0
    assert summary["rate_per_second"] == pytest.approx(20 / 61, rel=1e-3)

    # All time still holds everything.
    (total,) = [r for r in apps["win"].routes.values() if r.count]
    assert total.count == 120
    assert quantiles(total.histogram, [0.5])[0] == pytest.approx(1e6, rel=0.01)  # ns
    store.close()


def test_a_window_longer_than_the_history_covers_what_there_is(
    make_recorder: Callable[..., Recorder], segment_dir: Path
) -> None:
    recorder = make_recorder(app_name="young")
    route = recorder.route_id("/x")
    store = SegmentStore(segment_dir)
    history = WindowHistory()
    store.refresh()
    history.add(5 * S, store.apps())
    record(recorder, route, [2.0] * 7)
    store.refresh()
    apps = store.apps()
    window = history.window(apps, 65 * S, 900.0)["young"]
    assert window.seconds == 60.0  # since the first checkpoint, not 15 minutes
    assert sum(r.count for r in window.routes.values()) == 7
    store.close()


def test_checkpoints_thin_out_and_expire() -> None:
    history = WindowHistory()
    for second in range(1200):  # a tick a second: one checkpoint per FINE_SPACING, not per tick
        history.add(second * S, {})
    fine = FINE_SECONDS / FINE_SPACING + 1
    coarse = (900 + 2 * COARSE_SPACING - FINE_SECONDS) / COARSE_SPACING
    assert len(history) <= fine + coarse + 1
    assert len(history) >= fine


def test_unchanged_routes_keep_no_histogram_again(
    make_recorder: Callable[..., Recorder], segment_dir: Path
) -> None:
    recorder = make_recorder(app_name="idle")
    record(recorder, recorder.route_id("/idle"), [3.0])
    store = SegmentStore(segment_dir)
    history = WindowHistory()
    store.refresh()
    for second in range(3):
        history.add(second * int(FINE_SPACING * S), store.apps())
    changes = [checkpoint.apps["idle"].changes for checkpoint in history._fine]
    assert len(changes[0]) == 1 and changes[1:] == [{}, {}]  # no histogram kept again: no extra memory
    store.close()


@pytest.mark.parametrize(("text", "seconds"), [("1m", 60.0), ("5m", 300.0), ("15m", 900.0), ("all", None)])
def test_window_names(text: str, seconds: float | None) -> None:
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["", "2m", "1h", "60", "ALL", "1m "])
def test_other_window_names_are_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError, match="window must be one of 1m, 5m, 15m, all"):
        parse_window(text)


def test_histogram_subtraction_refuses_a_later_state() -> None:
    early = Histogram.from_durations([1_000, 2_000])
    late = Histogram.from_durations([1_000, 2_000, 3_000])
    assert (late - early).count == 1
    with pytest.raises(ValueError, match="not an earlier state"):
        early - late
    # A bucket that went down while another went up is caught too (no silent borrow).
    other = Histogram.from_durations([1_000, 9_000_000, 9_000_000])
    with pytest.raises(ValueError, match="not an earlier state"):
        other - late
