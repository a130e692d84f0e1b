"""The alert lifecycle (inactive → pending → firing → resolved), grouping,
repeat, flap damping and silences, driven tick by tick with explicit times."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from netprof_daemon.alerts import AlertEngine, Matcher
from netprof_daemon.notification import Notification
from netprof_daemon.rules import Rule, Sample

# The HTTP layer, alerting and notifiers are the same whichever core reads the segments.
pytestmark = pytest.mark.any_core

ERRORS = Rule(
    "HighErrors", "error_rate_percent", ">", 10.0, window=60.0, for_seconds=3.0, severity="critical"
)
SLOW = Rule("SlowRequests", "slow_request_percent", ">", 5.0, window=60.0, for_seconds=0.0)


def sample(rule: Rule, value: float | None, app: str = "shop") -> Sample:
    return Sample(rule, {"alertname": rule.name, "severity": rule.severity, "app": app}, value, 100)


def run(
    engine: AlertEngine, ticks: Iterable[tuple[float, list[Sample]]], rules: list[Rule]
) -> list[Notification]:
    sent = []
    for now, samples in ticks:
        engine.observe(samples, rules, now)
        sent.extend(engine.due(now))
    return sent


def test_pending_for_the_rules_for_then_firing_then_resolved_once() -> None:
    engine = AlertEngine(group_wait=0.0, repeat_interval=3600.0)
    engine.observe([sample(ERRORS, 50.0)], [ERRORS], 100.0)
    (alert,) = engine.active.values()
    assert alert.phase == "pending" and engine.due(100.0) == []
    engine.observe([sample(ERRORS, 50.0)], [ERRORS], 102.9)
    assert alert.phase == "pending"
    engine.observe([sample(ERRORS, 40.0)], [ERRORS], 103.0)
    assert alert.phase == "firing"
    (fired,) = engine.due(103.0)
    assert fired.state == "firing" and fired.alerts[0].value == 40.0 and fired.alerts[0].starts_at == 103.0
    assert fired.severity == "critical" and "error_rate_percent = 40 > 10 on shop" in fired.alerts[0].summary
    sent = run(
        engine,
        [(104.0, [sample(ERRORS, 30.0)]), (105.0, [sample(ERRORS, 2.0)]), (106.0, [sample(ERRORS, 1.0)])],
        [ERRORS],
    )
    assert [n.state for n in sent] == ["resolved"]
    assert sent[0].alerts[0].ends_at == 105.0 and engine.active == {}
    assert [event["event"] for event in engine.history] == ["firing", "resolved"]


def test_a_condition_that_clears_while_pending_never_notifies() -> None:
    engine = AlertEngine(group_wait=0.0, repeat_interval=3600.0)
    sent = run(
        engine,
        [(0.0, [sample(ERRORS, 50.0)]), (2.0, [sample(ERRORS, 5.0)]), (10.0, [sample(ERRORS, 50.0)])],
        [ERRORS],
    )
    assert sent == [] and next(iter(engine.active.values())).pending_since == 10.0


def test_no_data_is_no_verdict() -> None:
    engine = AlertEngine(group_wait=0.0, repeat_interval=3600.0)
    assert run(engine, [(0.0, [sample(SLOW, None)])], [SLOW]) == [] and engine.active == {}


def test_alerts_that_fire_within_group_wait_go_out_as_one_notification() -> None:
    engine = AlertEngine(group_wait=5.0, repeat_interval=3600.0)
    sent = run(
        engine,
        [
            (0.0, [sample(SLOW, 9.0, "shop")]),
            (2.0, [sample(SLOW, 9.0, "shop"), sample(SLOW, 8.0, "cart")]),
            (4.9, [sample(SLOW, 9.0, "shop"), sample(SLOW, 8.0, "cart")]),
        ],
        [SLOW],
    )
    assert sent == []
    (group,) = engine.due(5.0)
    assert sorted(a.labels["app"] for a in group.alerts) == ["cart", "shop"]
    assert group.title == "[FIRING:warning] SlowRequests"


def test_an_alert_still_firing_is_repeated_after_repeat_interval() -> None:
    engine = AlertEngine(group_wait=0.0, repeat_interval=60.0)
    ticks = [(float(t), [sample(SLOW, 9.0)]) for t in range(0, 130, 10)]
    sent = run(engine, ticks, [SLOW])
    assert [n.state for n in sent] == ["firing"] * 3  # at 0, 60 and 120


def test_keep_firing_for_damps_a_flapping_condition() -> None:
    flappy = Rule("Flappy", "error_rate_percent", ">", 10.0, keep_firing_for=30.0)
    engine = AlertEngine(group_wait=0.0, repeat_interval=3600.0)
    values = [50.0, 1.0, 50.0, 1.0, 50.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # every 10 s
    sent = run(engine, [(10.0 * i, [sample(flappy, v)]) for i, v in enumerate(values)], [flappy])
    assert [n.state for n in sent] == ["firing", "resolved"]
    assert sent[1].alerts[0].ends_at == 70.0  # 30 s after the last time it held (40 s)


def test_an_alert_whose_app_went_away_resolves() -> None:
    engine = AlertEngine(group_wait=0.0, repeat_interval=3600.0)
    sent = run(engine, [(0.0, [sample(SLOW, 9.0)]), (1.0, [])], [SLOW])
    assert [n.state for n in sent] == ["firing", "resolved"]


def test_silences_hold_notifications_but_not_the_state() -> None:
    engine = AlertEngine(group_wait=0.0, repeat_interval=3600.0)
    silence = engine.add_silence(
        [Matcher("alertname", "Slow.*", regex=True), Matcher("app", "shop")], 0.0, 100.0, "deploy", "ops"
    )
    sent = run(engine, [(1.0, [sample(SLOW, 9.0, "shop"), sample(SLOW, 9.0, "cart")])], [SLOW])
    assert [a.labels["app"] for n in sent for a in n.alerts] == ["cart"]
    assert {a.labels["app"] for a in engine.active.values()} == {"shop", "cart"}
    assert any(e["event"] == "silenced" and e["silence"] == silence.id for e in engine.history)
    # Expired, the still-firing alert is notified at its next repeat; the state never stopped.
    assert engine.expire_silence(silence.id, 50.0).ends_at == 50.0
    assert engine.expire_silence("nope", 50.0) is None


def test_with_enable_alerts_off_states_move_but_nothing_is_sent() -> None:
    engine = AlertEngine(group_wait=0.0, repeat_interval=3600.0, notify=False)
    assert run(engine, [(0.0, [sample(SLOW, 9.0)]), (1.0, [sample(SLOW, 1.0)])], [SLOW]) == []
    assert [e["event"] for e in engine.history] == ["firing", "resolved"]


def test_notifications_survive_their_json_form() -> None:
    engine = AlertEngine(group_wait=0.0, repeat_interval=3600.0)
    (fired,) = run(engine, [(0.0, [sample(SLOW, 9.0)])], [SLOW])
    assert Notification.from_json(fired.to_json()) == fired


@pytest.mark.parametrize(
    ("op", "value", "holds"), [(">", 10.0, False), (">=", 10.0, True), ("<", 9.0, True), ("<=", 11.0, False)]
)
def test_rule_operators(op: str, value: float, holds: bool) -> None:
    rule = Rule("R", "request_rate", op, 10.0)
    assert sample(rule, value).holds is holds


def test_no_verdict_keeps_a_firing_alert_until_its_window_has_passed() -> None:
    rule = Rule("Errs", "error_rate_percent", ">", 10.0, window=60.0)
    engine = AlertEngine(group_wait=0.0, repeat_interval=3600.0)
    sent = run(engine, [(0.0, [sample(rule, 50.0)]), (30.0, [sample(rule, None)]), (59.0, [sample(rule, None)])], [rule])
    assert [n.state for n in sent] == ["firing"]  # too few requests is no reason to resolve
    assert [n.state for n in run(engine, [(61.0, [sample(rule, None)])], [rule])] == ["resolved"]


def test_a_restart_judges_a_firing_alert_again_on_fresh_windows() -> None:
    rule = Rule("Errs", "error_rate_percent", ">", 10.0, window=60.0)
    engine = AlertEngine(group_wait=0.0, repeat_interval=3600.0)
    run(engine, [(0.0, [sample(rule, 50.0)])], [rule])
    restarted = AlertEngine(group_wait=0.0, repeat_interval=3600.0)
    restarted.restore(engine.active.values(), [], [], now=600.0)  # down for ten minutes
    # Right after the restart the windows are empty: no verdict, and no false "resolved".
    assert run(restarted, [(601.0, [sample(rule, None)]), (650.0, [sample(rule, None)])], [rule]) == []
    assert [n.state for n in run(restarted, [(655.0, [sample(rule, 2.0)])], [rule])] == ["resolved"]


def test_notifications_that_could_not_be_saved_are_handed_out_again() -> None:
    engine = AlertEngine(group_wait=0.0, repeat_interval=3600.0)
    (fired,) = run(engine, [(0.0, [sample(SLOW, 9.0)])], [SLOW])
    engine.requeue([fired])
    (again,) = engine.due(1.0)
    assert again.alerts == fired.alerts
