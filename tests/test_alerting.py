"""Alerting end to end: a real app starts failing, netprofd's rule fires, the
notification reaches real receivers (an HTTP endpoint through apprise's json://,
a local SMTP server through mailto://), and the resolved one follows, each once."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.apps.netprofd import NP, daemon_env, netprofd, rule_toml, run_netprofd, write_daemon_config
from tests.apps.receivers import HttpReceiver, smtp_server
from tests.apps.servers import REQUEST_TIMEOUT, free_port, running, wait_for
from tests.apps.shop import APP, Shop, shop_running

# The HTTP layer, alerting and notifiers are the same whichever core reads the segments.
pytestmark = pytest.mark.any_core

# apprise spaces its sends to one service by a few seconds: the timeout leaves room.
FAST = {"tick_seconds": 0.2, "group_wait_seconds": 0.3, "notify_timeout_seconds": 10.0}

ERRORS_RULE = rule_toml(
    "ShopErrors",
    "error_rate_percent",
    ">",
    25,
    window="3s",
    min_requests=10,
    severity="critical",
    app=APP,
    **{"for": "1s"},
)


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    with shop_running(tmp_path) as shop:
        yield shop


def titles(receiver: HttpReceiver) -> list[str]:
    return [post["title"] for post in receiver.received()]


def test_failing_app_fires_then_resolves_through_http_and_email(shop: Shop) -> None:
    with HttpReceiver() as receiver, smtp_server() as (smtp_port, mailbox):
        urls = [
            f"json://{receiver.url}/hooks/netprof",
            f"mailto://127.0.0.1:{smtp_port}?from=netprofd@example.com&to=ops@example.com",
        ]
        extra = f"[notifiers.apprise]\nurls = {json.dumps(urls)}\n" + ERRORS_RULE
        with netprofd(shop.tmp, shop.segment_dir, daemon=FAST, extra=extra) as daemon:
            shop.send(good=20, bad=20)  # half of the requests fail
            wait_for(lambda: titles(receiver), what="the firing notification")
            wait_for(lambda: mailbox.messages, what="the firing email")
            assert len(receiver.received()) == 1, titles(receiver)
            (firing,) = receiver.received()
            assert firing["title"] == "[FIRING:critical] ShopErrors"
            assert "error_rate_percent = 50 > 25 on shop" in firing["message"]
            assert "ShopErrors" in mailbox.messages[0]["Subject"]
            active = daemon.get(f"{NP}/alerts").json()["active"]
            assert [(a["name"], a["state"]) for a in active if a["name"] == "ShopErrors"] == [
                ("ShopErrors", "firing")
            ]

            # The errors stop: good requests only, past the rule's window.
            deadline = time.monotonic() + 20
            while len(receiver.received()) < 2 and time.monotonic() < deadline:
                shop.send(good=5)
                time.sleep(0.2)
            time.sleep(1.0)  # anything else would arrive by now
            assert titles(receiver) == ["[FIRING:critical] ShopErrors", "[RESOLVED:critical] ShopErrors"]
            wait_for(lambda: len(mailbox.messages) == 2, what="the resolved email")
            assert ["FIRING" in m["Subject"] for m in mailbox.messages] == [True, False]
            view = wait_for(
                lambda: (
                    (v := daemon.get(f"{NP}/alerts").json())["delivery"]["apprise"].get("delivered") == 2
                    and v
                ),
                what="both deliveries counted",
            )
            assert view["undelivered"] == []
            assert [e["event"] for e in view["history"] if e["alert"]["name"] == "ShopErrors"] == [
                "resolved",
                "firing",
            ]


def test_a_real_alertmanager_shows_the_alert(shop: Shop) -> None:
    from tests.tools import require_tool

    alertmanager = require_tool("prometheus-alertmanager", "/usr/bin/prometheus-alertmanager")
    am_port = free_port()
    config = shop.tmp / "alertmanager.yml"
    config.write_text("route:\n  receiver: void\nreceivers:\n  - name: void\n", encoding="utf-8")
    argv = [
        alertmanager, f"--config.file={config}", f"--storage.path={shop.tmp / 'am'}",
        f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=",
    ]  # fmt: skip
    import os

    with running(argv, env=dict(os.environ), port=am_port, log_path=shop.tmp / "alertmanager.log") as am:
        extra = f'[notifiers.alertmanager]\nurl = "{am.base_url}"\n' + ERRORS_RULE
        with netprofd(shop.tmp, shop.segment_dir, daemon=FAST, extra=extra):
            shop.send(good=20, bad=20)

            def shown() -> list[dict[str, object]]:
                alerts = httpx.get(f"{am.base_url}/api/v2/alerts", timeout=REQUEST_TIMEOUT).json()
                return [a for a in alerts if a["labels"].get("alertname") == "ShopErrors"]

            (alert,) = wait_for(shown, what="the alert in Alertmanager")
            assert alert["labels"]["app"] == APP and alert["labels"]["severity"] == "critical"
            assert "error_rate_percent" in alert["annotations"]["summary"]


PLUGINS = """
import time
from netprof_daemon import hookimpl

class Raising:
    @hookimpl
    def netprof_notify(self, notification):
        raise RuntimeError("raising plugin: always fails")

class Hanging:
    @hookimpl
    def netprof_notify(self, notification):
        time.sleep(3600)

raising = Raising()
hanging = Hanging()
"""


def install_test_plugins(tmp: Path) -> Path:
    """Two notifier plugins installed as a third party's would be: a module and
    a dist-info with ``netprof.notifiers`` entry points, on the daemon's path."""
    site = tmp / "site"
    (site / "netprof_test_plugins-0.1.dist-info").mkdir(parents=True)
    (site / "netprof_test_plugins.py").write_text(PLUGINS, encoding="utf-8")
    info = site / "netprof_test_plugins-0.1.dist-info"
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: netprof-test-plugins\nVersion: 0.1\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        "[netprof.notifiers]\nraising = netprof_test_plugins:raising\nhanging = netprof_test_plugins:hanging\n",
        encoding="utf-8",
    )
    return site


def test_a_raising_and_a_hanging_plugin_do_not_stop_the_others(shop: Shop) -> None:
    site = install_test_plugins(shop.tmp)
    env = daemon_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    with HttpReceiver() as receiver:
        extra = (
            f'[notifiers.apprise]\nurls = ["json://{receiver.url}/hook"]\n[notifiers.raising]\n[notifiers.hanging]\n'
            + ERRORS_RULE
        )
        daemon_settings = {**FAST, "notify_timeout_seconds": 1.0, "notify_max_attempts": 3}
        with netprofd(shop.tmp, shop.segment_dir, daemon=daemon_settings, extra=extra, env=env) as daemon:
            shop.send(good=20, bad=20)
            wait_for(lambda: titles(receiver), what="apprise's delivery beside the broken plugins")
            assert daemon.get("/healthz").status_code == 200  # the loop is not blocked

            def outcomes() -> dict[str, dict[str, int]]:
                return daemon.get(f"{NP}/alerts").json()["delivery"]  # type: ignore[no-any-return]

            # Retried with backoff (1 s, 2 s), then given up on; the hang times out each time.
            wait_for(
                lambda: outcomes().get("raising", {}).get("dropped") == 1, timeout=30, what="raising given up"
            )
            wait_for(
                lambda: outcomes().get("hanging", {}).get("dropped") == 1, timeout=30, what="hanging given up"
            )
            result = outcomes()
            for plugin in ("raising", "hanging"):  # 3 attempts for each notification given up on
                assert result[plugin]["failed"] >= 3 * result[plugin]["dropped"]
            assert "failed" not in result["apprise"]
            log = daemon.log()
            assert "raising plugin: always fails" in log and "no answer within 1 s" in log
            metrics = daemon.get("/metrics").text
            notifications = [
                line for line in metrics.splitlines() if line.startswith("netprofd_notifications_total")
            ]
            assert any('outcome="dropped",plugin="raising"' in line for line in notifications), notifications
            assert any('outcome="delivered",plugin="apprise"' in line for line in notifications), (
                notifications
            )


def test_an_undelivered_notification_is_delivered_after_a_restart_once(shop: Shop) -> None:
    port = free_port()  # the receiver is down at first: connection refused
    extra = f'[notifiers.apprise]\nurls = ["json://127.0.0.1:{port}/hook"]\n' + ERRORS_RULE
    settings = {**FAST, "notify_max_attempts": 100}
    daemon_port = free_port()
    with netprofd(shop.tmp, shop.segment_dir, daemon=settings, extra=extra, port=daemon_port) as daemon:
        shop.send(good=20, bad=20)

        def tried_twice() -> bool:
            pending = daemon.get(f"{NP}/alerts").json()["undelivered"]
            return bool(pending) and pending[0]["attempts"] >= 2

        wait_for(tried_twice, what="two failed attempts")
        (pending,) = daemon.get(f"{NP}/alerts").json()["undelivered"]
    with (
        HttpReceiver(port) as receiver,
        netprofd(shop.tmp, shop.segment_dir, daemon=settings, extra=extra, port=daemon_port) as daemon,
    ):
        wait_for(lambda: receiver.received(), what="the delivery after the restart")
        time.sleep(1.5)  # a second copy would have come by now
        firing = [p for p in receiver.received() if p["title"].startswith("[FIRING")]
        assert len(firing) == 1
        assert daemon.get(f"{NP}/alerts").json()["undelivered"] == [] or all(
            p["notification_id"] != pending["notification_id"]
            for p in daemon.get(f"{NP}/alerts").json()["undelivered"]
        )


def test_a_disable_rule_stops_recording_until_enable(shop: Shop) -> None:
    flood = rule_toml("ShopFlood", "request_rate", ">", 5, window="2s", action="disable", app=APP)
    with HttpReceiver() as receiver:
        extra = f'[notifiers.apprise]\nurls = ["json://{receiver.url}/hook"]\n' + flood
        with netprofd(shop.tmp, shop.segment_dir, daemon=FAST, extra=extra) as daemon:
            shop.send(good=30)

            # The rule's own alert, and the critical one any auto-disable raises.
            def firing_lines() -> str:
                return "\n".join(
                    p["message"] for p in receiver.received() if p["title"].startswith("[FIRING")
                )

            wait_for(lambda: "firing: ShopFlood: request_rate" in firing_lines(), what="the rule's alert")
            wait_for(
                lambda: "firing: NetworkProfilingAutoDisabled" in firing_lines(), what="the critical alert"
            )
            assert any(t.startswith("[FIRING:critical]") for t in titles(receiver))

            def app_metrics() -> dict[str, object]:
                apps = daemon.get(f"{NP}/production-metrics").json()["applications"]
                return next(a for a in apps if a["app"] == APP)

            wait_for(
                lambda: app_metrics()["auto_disabled_processes"] == 1, what="the app's process auto-disabled"
            )
            recorded = app_metrics()["requests"]
            shop.send(good=10)
            time.sleep(0.6)
            assert app_metrics()["requests"] == recorded  # the counters stopped moving
            assert 'network_profiling_auto_disables{app="shop"} 1.0' in daemon.get("/metrics").text

            assert daemon.post(f"{NP}/enable").status_code == 200
            shop.send(good=4)
            wait_for(lambda: app_metrics()["requests"] == recorded + 4, what="recording again after /enable")


def test_test_notify_reports_each_plugin(tmp_path: Path) -> None:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    with HttpReceiver() as receiver:
        refused = free_port()
        for urls, code in (([f"json://{receiver.url}/hook"], 0), ([f"json://127.0.0.1:{refused}/hook"], 1)):
            extra = f"[notifiers.apprise]\nurls = {json.dumps(urls)}\n[notifiers.log]\n"
            config = write_daemon_config(
                tmp_path / "d.toml", segment_dir, tmp_path / "state", free_port(), extra=extra
            )
            done = run_netprofd(config, "--test-notify")
            assert done.returncode == code, done.stdout + done.stderr
            lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
            assert lines["log"] == "delivered"
            assert (lines["apprise"] == "delivered") is (code == 0)
        (post,) = receiver.received()
        assert post["title"].startswith("[TEST]") and "delivery works" in post["message"]


def test_bad_rules_and_notifiers_are_config_errors_naming_them(tmp_path: Path) -> None:
    extra = (
        rule_toml("Fine", "p95_ms", ">", 100)
        + rule_toml("Broken", "p42_ms", "~", 1, window="soon")
        + "[notifiers.nosuch]\n[notifiers.apprise]\nurls = []\n"
    )
    config = write_daemon_config(
        tmp_path / "d.toml", tmp_path / "seg", tmp_path / "state", free_port(), extra=extra
    )
    done = run_netprofd(config, "--check")
    assert done.returncode == 2
    out = done.stderr
    assert (
        "rules[1] (Broken).metric" in out
        and "rules[1] (Broken).op" in out
        and "rules[1] (Broken).window" in out
    )
    assert "Fine" not in out
    config.write_text(
        config.read_text().split("[[rules]]")[0] + "[notifiers.nosuch]\n[notifiers.apprise]\nurls = []\n"
    )
    done = run_netprofd(config, "--check")
    assert done.returncode == 2
    assert "notifiers.nosuch" in done.stderr and "notifiers.apprise" in done.stderr


def test_silences_are_created_listed_and_expired_through_the_api(tmp_path: Path) -> None:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    with netprofd(tmp_path, segment_dir, daemon=FAST) as daemon:
        body = {
            "matchers": {"alertname": "ShopErrors", "app": "shop"},
            "duration": "2h",
            "comment": "deploy",
            "created_by": "ops",
        }
        created = daemon.http.post(f"{NP}/silences", json=body)
        assert created.status_code == 201, created.text
        silence = created.json()
        assert silence["state"] == "active" and silence["ends_at"] - silence["starts_at"] == pytest.approx(
            7200
        )
        assert [s["id"] for s in daemon.get(f"{NP}/silences").json()["silences"]] == [silence["id"]]
        assert [s["id"] for s in daemon.get(f"{NP}/alerts").json()["silences"]] == [silence["id"]]

        expired = daemon.http.delete(f"{NP}/silences/{silence['id']}")
        assert expired.status_code == 200 and expired.json()["state"] == "expired"
        assert daemon.get(f"{NP}/alerts").json()["silences"] == []
        assert daemon.http.delete(f"{NP}/silences/nosuch").status_code == 404

        for bad, field in (
            ({"matchers": {}, "duration": "1h"}, "matchers"),
            ({"matchers": {"app": "x"}}, "duration"),
            ({"matchers": {"app": "x"}, "duration": "soon"}, "duration"),
            (
                {"matchers": [{"name": "app", "value": "(", "regex": True}], "duration": "1h"},
                "matchers[0].value",
            ),
            ({"matchers": {"app": "x"}, "duration": "1h", "colour": "red"}, "colour"),
        ):
            refused = daemon.http.post(f"{NP}/silences", json=bad)
            assert refused.status_code == 400 and refused.json()["parameter"] == field, refused.text
        assert daemon.http.post(f"{NP}/silences", content=b"{nope").status_code == 400
        # Without the key, nothing.
        assert httpx.post(f"{daemon.url}{NP}/silences", json=body).status_code == 401
    # A silence outlives a restart of the daemon (kept in state_dir).
    with netprofd(tmp_path, segment_dir, daemon=FAST) as daemon:
        assert [s["id"] for s in daemon.get(f"{NP}/silences").json()["silences"]] == [silence["id"]]
