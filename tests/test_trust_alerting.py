"""Trust in netprofd's alerting (issue 15), against the real daemon: a silence
regex can cost no more than linear time, silences are bounded in number and
size and stored one row each, restored or corrupt state never keeps the daemon
from starting, an unwritable state directory is one clear error, a rule window
longer than the checkpoints kept is refused, and every notification carries an
id that stays the same when a restart delivers it again."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.apps.netprofd import (
    NP,
    Netprofd,
    daemon_env,
    netprofd,
    rule_toml,
    run_netprofd,
    write_daemon_config,
)
from tests.apps.receivers import HttpReceiver as SlowReceiver  # (delay=, statuses=: answers late or fails)
from tests.apps.servers import free_port, wait_for
from tests.apps.shop import APP, Shop, shop_running
from tests.apps.tmpfs import mounted_tmpfs

# The HTTP layer, alerting and notifiers are the same whichever core reads the segments.
pytestmark = pytest.mark.any_core

FAST = {"tick_seconds": 0.2, "group_wait_seconds": 0.3, "notify_timeout_seconds": 10.0}
# A rule name of 40 word characters: Python's re needs ages to find that
# ((\w+)+)+! does not match it (each 2 more characters cost 8 times as long).
LONG_NAME = "ShopErrors" * 4
EVIL = r"((\w+)+)+!"
STATE_FILE = "alerts.sqlite3"
# The caps the API documents (docs/NETWORK_PROFILING_API.md, "Silences").
MAX_SILENCES = 1000
MAX_MATCHERS = 16
MAX_PATTERN = 1024
MAX_COMMENT = 1024
MAX_CREATED_BY = 256
MAX_REGEX_MATCHERS = 1000  # in all active or pending silences together
NOTIFICATION_ID = re.compile(r"notification ([0-9a-f]{32})")

ERRORS_RULE = rule_toml(
    LONG_NAME, "error_rate_percent", ">", 25, window="3s", min_requests=10, app=APP, **{"for": "0s"}
)
# Holds at the very first tick of a daemon that sees the app's segment.
MEMORY_RULE = rule_toml(LONG_NAME, "process_memory_mb", ">", 0, app=APP)


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    with shop_running(tmp_path) as shop:
        shop.send(good=2)  # the segment exists from here on
        yield shop


@contextlib.contextmanager
def started(
    tmp: Path, segment_dir: Path, *, port: int, extra: str = "", daemon: dict[str, Any] | None = None
) -> Iterator[Netprofd]:
    """A netprofd the test may kill: stopped (or killed) at the end whatever its exit code."""
    config = write_daemon_config(
        tmp / "netprofd.toml", segment_dir, tmp / "netprofd-state", port, daemon=daemon or FAST, extra=extra
    )
    process = Netprofd(config, port, tmp / "netprofd.log", daemon_env(), "test-key-0123456789abcdef")
    try:
        process.start()
        yield process
    finally:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()
        process.http.close()


def responsive(daemon: Netprofd, seconds: float) -> list[float]:
    """/healthz latencies over ``seconds``; an exception if it stops answering."""
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        began = time.monotonic()
        assert daemon.http.get("/healthz", timeout=3.0).status_code in (200, 503)
        latencies.append(time.monotonic() - began)
        time.sleep(0.1)
    return latencies


def post_silence(daemon: Netprofd, body: dict[str, Any]) -> httpx.Response:
    return daemon.http.post(f"{NP}/silences", json=body)


def evil_silence() -> dict[str, Any]:
    return {"matchers": [{"name": "alertname", "value": EVIL, "regex": True}], "duration": "1h"}


def history_events(daemon: Netprofd, name: str) -> list[str]:
    view = daemon.get(f"{NP}/alerts", history=500).json()
    return [e["event"] for e in view["history"] if e["alert"]["name"] == name]


# -- 1. a silence regex costs linear time; restored state never stops the start -------------


def test_a_catastrophic_silence_regex_does_not_freeze_the_daemon(shop: Shop) -> None:
    with started(shop.tmp, shop.segment_dir, port=free_port(), extra=ERRORS_RULE) as daemon:
        created = post_silence(daemon, evil_silence())
        assert created.status_code == 201, created.text
        shop.send(good=20, bad=20)  # the rule fires, and its alert is matched against the silence
        wait_for(lambda: "firing" in history_events(daemon, LONG_NAME), what="the alert firing")
        assert max(responsive(daemon, 2.0)) < 1.0  # old: the loop froze in re.fullmatch
        # ((\w+)+)+! needs a "!": the alert was not silenced, it was notified.
        assert "silenced" not in history_events(daemon, LONG_NAME)


def test_a_restored_catastrophic_silence_does_not_keep_the_daemon_from_starting(shop: Shop) -> None:
    port = free_port()
    with started(shop.tmp, shop.segment_dir, port=port) as daemon:  # no rule yet: nothing fires
        assert post_silence(daemon, evil_silence()).status_code == 201
        assert daemon.stop() == 0
    # The rule holds at the first tick: the restored silence is matched at once.
    with started(shop.tmp, shop.segment_dir, port=port, extra=MEMORY_RULE) as daemon:
        wait_for(lambda: "firing" in history_events(daemon, LONG_NAME), what="the alert firing")
        assert max(responsive(daemon, 1.0)) < 1.0
        assert [s["matchers"][0]["value"] for s in daemon.get(f"{NP}/silences").json()["silences"]] == [EVIL]


@pytest.mark.parametrize(
    "pattern", [r"(a)\1", r"(?=shop)shop", r"(?<!x)shop", r"\w{1000}{1000}", r".{1000}\pL{1000}"]
)
def test_a_pattern_re2_refuses_is_a_400_naming_the_matcher(tmp_path: Path, pattern: str) -> None:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    with netprofd(tmp_path, segment_dir, daemon=FAST) as daemon:
        body = {
            "matchers": [
                {"name": "app", "value": "shop"},
                {"name": "alertname", "value": pattern, "regex": True},
            ],
            "duration": "1h",
        }
        refused = post_silence(daemon, body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["parameter"] == "matchers[1].value"
        assert "RE2" in refused.json()["error"]
        assert daemon.get(f"{NP}/silences").json()["silences"] == []
        assert "Error parsing" not in daemon.log()  # RE2's own stderr logging is off


def test_silences_are_capped_in_number_and_size(tmp_path: Path) -> None:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    with netprofd(tmp_path, segment_dir, daemon=FAST) as daemon:
        one = {"name": "app", "value": "shop"}
        for body, field in (
            ({"matchers": [one] * (MAX_MATCHERS + 1), "duration": "1h"}, "matchers"),
            (
                {"matchers": [{"name": "app", "value": "x" * (MAX_PATTERN + 1)}], "duration": "1h"},
                "matchers[0].value",
            ),
            (
                {
                    "matchers": [one, {"name": "route", "value": "a" * (MAX_PATTERN + 1), "regex": True}],
                    "duration": "1h",
                },
                "matchers[1].value",
            ),
            ({"matchers": [{"name": "n" * 1000, "value": "x"}], "duration": "1h"}, "matchers[0].name"),
            ({"matchers": [one], "duration": "1h", "comment": "c" * (MAX_COMMENT + 1)}, "comment"),
            ({"matchers": [one], "duration": "1h", "created_by": "c" * (MAX_CREATED_BY + 1)}, "created_by"),
        ):
            refused = post_silence(daemon, body)
            assert refused.status_code == 400, (field, refused.text)
            assert refused.json()["parameter"] == field, refused.text
        at_the_caps = {
            "matchers": [{"name": "app", "value": "x" * MAX_PATTERN}] * MAX_MATCHERS,
            "duration": "1h",
            "comment": "c" * MAX_COMMENT,
            "created_by": "o" * MAX_CREATED_BY,
        }
        assert post_silence(daemon, at_the_caps).status_code == 201
        ids = [
            post_silence(daemon, {"matchers": [one], "duration": "1h"}).json()["id"]
            for _ in range(MAX_SILENCES - 1)
        ]
        refused = post_silence(daemon, {"matchers": [one], "duration": "1h"})
        assert refused.status_code == 400 and refused.json()["parameter"] == "silences", refused.text
        assert str(MAX_SILENCES) in refused.json()["error"]
        # An expired silence makes room.
        assert daemon.http.delete(f"{NP}/silences/{ids[0]}").status_code == 200
        assert post_silence(daemon, {"matchers": [one], "duration": "1h"}).status_code == 201
        assert daemon.get("/healthz").status_code == 200
    with netprofd(tmp_path, segment_dir, daemon=FAST, name="regexes") as daemon:
        # Every alert is matched against every regex on the loop: their total is bounded too.
        regexes = {
            "matchers": [{"name": "app", "value": "sh.p", "regex": True}] * MAX_MATCHERS,
            "duration": "1h",
        }
        for _ in range(MAX_REGEX_MATCHERS // MAX_MATCHERS):
            assert post_silence(daemon, regexes).status_code == 201
        refused = post_silence(daemon, regexes)
        assert refused.status_code == 400 and refused.json()["parameter"] == "matchers", refused.text
        assert str(MAX_REGEX_MATCHERS) in refused.json()["error"]


def legacy_state(state_dir: Path, rows: dict[str, str], outbox: tuple[tuple[str, str], ...] = ()) -> None:
    """Rows of the ``engine`` table, as netprofd 0.x kept its whole state, and
    of the outbox: (notification id, its JSON text) for the ``log`` plugin."""
    state_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(state_dir / STATE_FILE, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS engine (name TEXT PRIMARY KEY, json TEXT NOT NULL)")
    db.executemany("INSERT OR REPLACE INTO engine (name, json) VALUES (?, ?)", rows.items())
    db.execute(
        "CREATE TABLE IF NOT EXISTS outbox (notification_id TEXT NOT NULL, plugin TEXT NOT NULL, "
        "notification TEXT NOT NULL, created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, "
        "next_attempt REAL NOT NULL, last_error TEXT, PRIMARY KEY (notification_id, plugin))"
    )
    db.executemany(
        "INSERT INTO outbox (notification_id, plugin, notification, created_at, next_attempt) "
        "VALUES (?, 'log', ?, ?, ?)",
        [(nid, text, at, at) for at, (nid, text) in enumerate(outbox, start=1)],
    )
    db.close()


def notification_json(notification_id: str) -> str:
    now = time.time()
    alert = {
        "name": "Restored", "state": "firing", "severity": "warning",
        "labels": {"alertname": "Restored", "severity": "warning"}, "value": 1.0, "threshold": 0.0,
        "summary": "a notification saved before a restart", "starts_at": now, "ends_at": None, "annotations": {},
    }  # fmt: skip
    return json.dumps(
        {"id": notification_id, "state": "firing", "severity": "warning", "title": "[FIRING:warning] Restored",
         "created_at": now, "test": False, "alerts": [alert]}
    )  # fmt: skip


def silence_json(**overrides: Any) -> dict[str, Any]:
    now = time.time()
    return {
        "id": uuid.uuid4().hex,
        "matchers": [{"name": "app", "value": "shop", "regex": False}],
        "starts_at": now - 60,
        "ends_at": now + 3600,
        "comment": "",
        "created_by": "",
        **overrides,
    }


def test_restored_state_that_does_not_validate_is_dropped_row_by_row(tmp_path: Path) -> None:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    good = silence_json(comment="good one")
    bad_silences = [
        silence_json(matchers=[{"name": "app", "value": r"(a)\1", "regex": True}]),  # RE2 refuses it
        silence_json(matchers=[{"name": "app", "value": "x", "regex": False}] * (MAX_MATCHERS + 1)),
        silence_json(comment="c" * (MAX_COMMENT + 1)),
        silence_json(colour="red"),  # not a field
        {"id": "x"},
        "not even an object",
    ]
    legacy_state(
        tmp_path / "netprofd-state",
        {
            "silences": json.dumps([good, *bad_silences]),
            "active": "[{not json",
            "groups": json.dumps([{"state": "firing", "opened_at": "yesterday", "alerts": [{}]}]),
            "history": json.dumps([{"at": 1.0, "event": "firing", "alert": {}}, 5, "x"]),
            "extra": json.dumps({"auto_disables": {"shop": "many"}}),
        },
        # The oldest first: old netprofd's outbox reader died on it, and nothing was sent again.
        outbox=(("bad", "{not json"), (good_id := uuid.uuid4().hex, notification_json(good_id))),
    )
    with netprofd(tmp_path, segment_dir, daemon=FAST) as daemon:
        wait_for(lambda: f"delivered firing notification {good_id}" in daemon.log(), what="the good one sent")
        kept = daemon.get(f"{NP}/silences").json()["silences"]
        assert [s["comment"] for s in kept] == ["good one"]
        view = daemon.get(f"{NP}/alerts").json()
        assert view["active"] == []
        log = daemon.log()
        assert "Traceback" not in log
        dropped = [line for line in log.splitlines() if "dropped" in line and "silence" in line]
        assert len(dropped) == len(bad_silences), log
        assert any("active" in line and "dropped" in line for line in log.splitlines()), log
        assert len([line for line in log.splitlines() if "dropped the saved outbox row 'bad'" in line]) == 1
        # The good silence is kept in the new form: a restart keeps it, and only it.
        assert daemon.stop() == 0
    with netprofd(tmp_path, segment_dir, daemon=FAST) as daemon:
        assert [s["id"] for s in daemon.get(f"{NP}/silences").json()["silences"]] == [good["id"]]
        assert "dropped" not in daemon.log().split("netprofd stopped")[-1]


def test_restored_silences_beyond_the_limits_are_dropped(tmp_path: Path) -> None:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    now = time.time()
    saved = [silence_json(starts_at=now - 3600 + n, comment=f"#{n}") for n in range(MAX_SILENCES + 2)]
    legacy_state(tmp_path / "netprofd-state", {"silences": json.dumps(saved)})
    with netprofd(tmp_path, segment_dir, daemon=FAST) as daemon:
        kept = daemon.get(f"{NP}/silences").json()["silences"]
        assert len(kept) == MAX_SILENCES  # the oldest ones, as if added one by one
        assert {s["comment"] for s in kept} == {f"#{n}" for n in range(MAX_SILENCES)}
        assert len([line for line in daemon.log().splitlines() if "dropped the saved silence" in line]) == 2
        refused = post_silence(daemon, {"matchers": {"app": "shop"}, "duration": "1h"})
        assert refused.status_code == 400 and refused.json()["parameter"] == "silences"


# -- 2. a silence is one row: posting one costs the same with 10 or 1,000 others -------------


def large_silence(n: int) -> dict[str, Any]:
    return {
        "matchers": [
            {"name": f"label{i}", "value": f"value-{n}-{i}-" + "x" * (MAX_PATTERN - 20), "regex": i == 0}
            for i in range(MAX_MATCHERS)
        ],
        "duration": "2h",
        "comment": "c" * MAX_COMMENT,
        "created_by": "o" * MAX_CREATED_BY,
    }


def post_latencies(daemon: Netprofd, count: int, start: int = 0) -> list[float]:
    latencies = []
    for n in range(start, start + count):
        began = time.perf_counter()
        response = post_silence(daemon, large_silence(n))
        latencies.append(time.perf_counter() - began)
        assert response.status_code == 201, response.text
    return latencies


def test_posting_a_silence_does_not_rewrite_every_other_one(tmp_path: Path) -> None:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    with netprofd(tmp_path, segment_dir, daemon=FAST) as daemon:
        first = post_latencies(daemon, 20)
        post_latencies(daemon, 360, start=20)
        last = post_latencies(daemon, 20, start=380)  # the 381st to 400th large silence
        early, late = statistics.median(first), statistics.median(last)
        print(f"POST /silences, median: first 20 {early * 1e3:.1f} ms, 381st-400th {late * 1e3:.1f} ms")
        # One row per silence: no growth with the number kept (old: the whole set rewritten).
        assert late < 3 * early + 0.03, (early, late)
        assert max(responsive(daemon, 0.5)) < 0.5


# -- 3. corrupt or unreadable state -----------------------------------------------------------


def make_state(tmp: Path, segment_dir: Path, port: int, *, kill: bool) -> Path:
    """A state file with several pages of silences; ``kill``: then a daemon
    killed -9 after two more, so that its -wal and -shm files stay behind."""
    with started(tmp, segment_dir, port=port) as daemon:
        for n in range(30):
            assert post_silence(daemon, large_silence(n)).status_code == 201
        assert daemon.stop() == 0
    if kill:
        with started(tmp, segment_dir, port=port) as daemon:
            for n in range(2):
                assert post_silence(daemon, large_silence(n)).status_code == 201
            assert daemon.proc is not None
            daemon.proc.kill()
            daemon.proc.wait()
    return tmp / "netprofd-state"


def aside_files(state_dir: Path) -> list[str]:
    return sorted(p.name for p in state_dir.iterdir() if ".corrupt-" in p.name)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "garbage-with-wal"])
def test_a_corrupt_state_file_is_moved_aside_and_the_daemon_serves(tmp_path: Path, damage: str) -> None:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    port = free_port()
    state_dir = make_state(tmp_path, segment_dir, port, kill=damage == "garbage-with-wal")
    path = state_dir / STATE_FILE
    if damage.startswith("garbage"):
        path.write_bytes(os.urandom(64 * 1024))
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    if damage == "garbage-with-wal":
        assert (state_dir / f"{STATE_FILE}-wal").stat().st_size > 0
    with started(tmp_path, segment_dir, port=port) as daemon:  # old: exits with a traceback
        assert daemon.get(f"{NP}/silences").json()["silences"] == []
        assert post_silence(daemon, {"matchers": {"app": "shop"}, "duration": "1h"}).status_code == 201
        log = daemon.log()
        assert "Traceback" not in log
        (line,) = [line for line in log.splitlines() if "moved aside" in line]
        assert str(path) in line
        moved = aside_files(state_dir)
        assert any(
            name.startswith(f"{STATE_FILE}.corrupt-") and not name.endswith(("-wal", "-shm"))
            for name in moved
        )
        if damage == "garbage-with-wal":  # the WAL goes with its file, intact
            assert any(name.endswith("-wal") and (state_dir / name).stat().st_size > 0 for name in moved), (
                moved
            )
        assert daemon.stop() == 0
    with started(tmp_path, segment_dir, port=port) as daemon:  # the new file is a good one
        assert len(daemon.get(f"{NP}/silences").json()["silences"]) == 1
        assert "moved aside" not in daemon.log().split("netprofd stopped")[-1]


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs mounted read-only: even root cannot write it (root
    passes file modes, so a chmod would prove nothing here)."""
    with mounted_tmpfs(tmp_path / "read-only", "1m") as target:
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        yield target


@pytest.mark.parametrize("where", ["the directory", "a directory to make in it"])
def test_an_unwritable_state_dir_is_one_clear_error(tmp_path: Path, read_only_dir: Path, where: str) -> None:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    state_dir = read_only_dir if where == "the directory" else read_only_dir / "netprofd"
    config = write_daemon_config(tmp_path / "d.toml", segment_dir, state_dir, free_port())
    done = run_netprofd(config)  # old: a traceback (sqlite3.OperationalError), exit 1
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if str(state_dir) in line]
    assert line.startswith("netprofd: ") and "Read-only file system" in line, done.stderr
    checked = run_netprofd(config, "--check")
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "Traceback" not in checked.stderr
    (line,) = [line for line in checked.stderr.splitlines() if str(state_dir) in line]
    assert "daemon.state_dir" in line, checked.stderr


# -- 4. a rule window longer than the checkpoints kept --------------------------------------

LONG_WINDOW = rule_toml("HourlyErrors", "error_rate_percent", ">", 5, window="1h")
REFUSAL = "rules[0] (HourlyErrors).window"


def test_check_refuses_a_window_longer_than_the_checkpoints_kept(tmp_path: Path) -> None:
    config = write_daemon_config(
        tmp_path / "d.toml", tmp_path / "seg", tmp_path / "state", free_port(), extra=LONG_WINDOW
    )
    done = run_netprofd(config, "--check")
    assert done.returncode == 2, done.stdout + done.stderr
    assert REFUSAL in done.stderr and "15m" in done.stderr, done.stderr
    started_anyway = run_netprofd(config)
    assert started_anyway.returncode == 2 and REFUSAL in started_anyway.stderr, started_anyway.stderr
    config.write_text(config.read_text().replace('"1h"', '"15m"'))
    assert run_netprofd(config, "--check").returncode == 0


def test_a_reload_with_a_too_long_window_keeps_the_running_rules(tmp_path: Path) -> None:
    segment_dir = tmp_path / "segments"
    segment_dir.mkdir()
    fine = rule_toml("HourlyErrors", "error_rate_percent", ">", 5, window="10m")
    with netprofd(tmp_path, segment_dir, daemon=FAST, extra=fine) as daemon:

        def window() -> float:
            rules = daemon.get(f"{NP}/alerts").json()["rules"]
            return next(r["window_seconds"] for r in rules if r["name"] == "HourlyErrors")  # type: ignore[no-any-return]

        assert window() == 600
        daemon.config.write_text(daemon.config.read_text().replace('"10m"', '"1h"'))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: REFUSAL in daemon.log(), what="the reload refused")
        assert window() == 600


# -- 5. at least once, with an id a receiver can deduplicate by ------------------------------


def apprise_ids(posts: list[Any]) -> list[str]:
    """The notification id in each apprise json:// post (its text carries it)."""
    ids = []
    for post in posts:
        found = NOTIFICATION_ID.search(post["message"]) or NOTIFICATION_ID.search(post["title"])
        assert found, post
        ids.append(found.group(1))
    return ids


def test_a_notification_delivered_again_after_a_kill_carries_the_same_id(shop: Shop) -> None:
    with SlowReceiver(delay=3.0) as receiver:
        extra = (
            f'[notifiers.apprise]\nurls = ["json://127.0.0.1:{receiver.port}/hook"]\n'
            f'[notifiers.alertmanager]\nurl = "http://127.0.0.1:{receiver.port}/am"\n'
            "[notifiers.log]\n" + ERRORS_RULE
        )
        port = free_port()
        with started(shop.tmp, shop.segment_dir, port=port, extra=extra) as daemon:
            shop.send(good=20, bad=20)
            wait_for(lambda: receiver.received("/hook"), what="the first delivery under way")
            assert daemon.proc is not None
            daemon.proc.kill()  # while the receiver has yet to answer: not known as delivered
            daemon.proc.wait()
            first_log = daemon.log()
        receiver.delay = 0.0
        with started(shop.tmp, shop.segment_dir, port=port, extra=extra) as daemon:
            wait_for(lambda: len(receiver.received("/hook")) >= 2, what="the delivery after the restart")
            wait_for(lambda: len(receiver.received("/am/api/v2/alerts")) >= 1, what="alertmanager's")
            hook = receiver.received("/hook")
            assert [p["title"] for p in hook[:2]] == [f"[FIRING:warning] {LONG_NAME}"] * 2
            first, again = apprise_ids(hook[:2])
            assert first == again  # the receiver can tell it is the same notification
            am_ids = {
                alert["annotations"]["notification_id"]
                for post in receiver.received("/am/api/v2/alerts")
                for alert in post
                if "endsAt" not in alert  # the firing one; a "resolved" may follow
            }
            assert am_ids == {first}
            logged = set(NOTIFICATION_ID.findall(first_log + daemon.log()))
            assert first in logged
            assert daemon.stop() == 0


def test_alertmanager_retries_carry_the_same_id(shop: Shop) -> None:
    with SlowReceiver(statuses=[500]) as receiver:
        extra = f'[notifiers.alertmanager]\nurl = "http://127.0.0.1:{receiver.port}"\n' + ERRORS_RULE
        with netprofd(shop.tmp, shop.segment_dir, daemon=FAST, extra=extra):
            shop.send(good=20, bad=20)
            posts = wait_for(lambda: len(receiver.received("/api/v2/alerts")) >= 2, what="a retry")
            posts = receiver.received("/api/v2/alerts")
            ids = [alert["annotations"]["notification_id"] for post in posts[:2] for alert in post]
            assert len(ids) == 2 and ids[0] == ids[1] and re.fullmatch(r"[0-9a-f]{32}", ids[0])


def test_a_delivery_the_outbox_cannot_record_is_not_sent_again_and_again(shop: Shop) -> None:
    with SlowReceiver(delay=2.0) as receiver:
        extra = f'[notifiers.apprise]\nurls = ["json://127.0.0.1:{receiver.port}/hook"]\n' + ERRORS_RULE
        with netprofd(shop.tmp, shop.segment_dir, daemon=FAST, extra=extra) as daemon:
            shop.send(good=20, bad=20)
            wait_for(lambda: receiver.received("/hook"), what="the delivery under way")
            # Another process holds the state file's write lock while the
            # receiver answers: netprofd cannot take the row out of its outbox.
            other = sqlite3.connect(shop.tmp / "netprofd-state" / STATE_FILE, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            try:  # old: the loop waited 5 s for the lock at each write
                assert max(responsive(daemon, 8.0)) < 1.0
            finally:
                other.execute("ROLLBACK")
            other.close()
            wait_for(
                lambda: daemon.get(f"{NP}/alerts").json()["undelivered"] == [], what="the outbox emptied"
            )
            time.sleep(1.0)
            firing = [p for p in receiver.received("/hook") if p["title"].startswith("[FIRING")]
            assert len(firing) == 1, firing  # old: sent again once the lock was gone
            assert "cannot record the outcome" in daemon.log()
