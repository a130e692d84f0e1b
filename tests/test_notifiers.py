"""The notifier plugins, against real receivers on 127.0.0.1.

The built-ins are found through the ``netprof.notifiers`` entry points, as a
third party's plugin would be; apprise posts to an aiohttp server and mails an
aiosmtpd server, the alertmanager plugin posts to a real Alertmanager. Inline
``@hookimpl`` plugins stand in for a plugin that raises or hangs.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import inspect
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller

from netprof_core.config import ConfigError
from netprof_daemon import hookimpl, hookspecs
from netprof_daemon.notification import Alert, Notification
from netprof_daemon.plugins import DeliveryError, NotifierManager
from tests.apps.servers import free_port
from tests.tools import require_tool

# The HTTP layer, alerting and notifiers are the same whichever core reads the segments.
pytestmark = pytest.mark.any_core

ROOT = Path(__file__).resolve().parent.parent
BUILTINS = {"apprise", "log", "alertmanager"}
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("netprof_"))


def make_notification(
    state: Literal["firing", "resolved"] = "firing", name: str = "NetworkProfilingHighErrorRate", **alert: Any
) -> Notification:
    now = time.time()
    fields: dict[str, Any] = {
        "name": name,
        "state": state,
        "severity": "critical",
        "labels": {"alertname": name, "severity": "critical", "app": "shop", "route": "/items/{item_id}"},
        "value": 0.25,
        "threshold": 0.05,
        "summary": "shop: 25% of requests to /items/{item_id} failed (threshold 5%)",
        "starts_at": now - 60,
        "ends_at": now if state == "resolved" else None,
        **alert,
    }
    alerts = (Alert(**fields),)
    return Notification(id=f"n-{name}-{state}", state=state, alerts=alerts, created_at=now)


@pytest.fixture
def manager() -> Iterator[Callable[..., NotifierManager]]:
    """``manager(notifiers, **inline_plugins)``: a loaded NotifierManager, closed after the test."""
    made: list[NotifierManager] = []

    def make(notifiers: dict[str, dict[str, Any]] | None, **inline: object) -> NotifierManager:
        notifier_manager = NotifierManager(notifiers)
        made.append(notifier_manager)
        for name, plugin in inline.items():
            notifier_manager.register(plugin, name)
        notifier_manager.load()
        return notifier_manager

    yield make
    for notifier_manager in made:
        notifier_manager.close()


# --- receivers -------------------------------------------------------------


@dataclass
class HttpReceiver:
    url: str
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@asynccontextmanager
async def http_receiver(status: int = 200) -> AsyncIterator[HttpReceiver]:
    """An aiohttp server on loopback that records every JSON POST."""
    port = free_port()
    receiver = HttpReceiver(f"127.0.0.1:{port}")

    async def record(request: web.Request) -> web.Response:
        receiver.requests.append((request.path, await request.json()))
        return web.json_response({"ok": status < 300}, status=status)

    app = web.Application()
    app.router.add_post("/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield receiver
    finally:
        await runner.cleanup()


class MailBox:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append(message)  # type: ignore[arg-type]
        return "250 OK"


@pytest.fixture
def smtp_server() -> Iterator[tuple[int, MailBox]]:
    mailbox = MailBox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller.port, mailbox
    controller.stop()


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Alertmanager with one no-op receiver, no clustering; its base URL."""
    program = require_tool("prometheus-alertmanager", "/usr/bin/prometheus-alertmanager")
    workdir = tmp_path_factory.mktemp("alertmanager")
    config = workdir / "alertmanager.yml"
    config.write_text('route:\n  receiver: "null"\nreceivers:\n  - name: "null"\n', encoding="utf-8")
    url = f"http://127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            program,
            f"--config.file={config}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while not _ready(url + "/-/ready"):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                output = process.communicate()[0].decode(errors="replace")
                pytest.fail(f"Alertmanager did not start:\n{output}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()


def _ready(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def _get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        return await response.json()


# --- discovery ---------------------------------------------------------------


def test_hook_netprof_describe_builtins_come_from_entry_points(
    manager: Callable[..., NotifierManager],
) -> None:
    notifiers = manager(None)
    descriptions = notifiers.describe()
    assert BUILTINS <= set(descriptions)
    assert all(descriptions[name].strip() and "\n" not in descriptions[name] for name in BUILTINS)
    # Found through the entry points, exactly as a third party's plugin.
    found = {
        entry_point.name: distribution.project_name
        for _, distribution in notifiers.pm.list_plugin_distinfo()
        for entry_point in distribution.entry_points
        if entry_point.group == "netprof.notifiers"
    }
    assert BUILTINS <= set(found) and {found[name] for name in BUILTINS} == {"netprof"}
    # No notifiers table at all: the log plugin alone.
    assert notifiers.active == ["log"]


def test_disabled_plugins_env_keeps_a_plugin_from_loading(
    manager: Callable[..., NotifierManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETPROF_DISABLED_PLUGINS", "log, alertmanager")
    notifiers = manager({"apprise": {"urls": ["json://127.0.0.1:9/x"]}})
    assert set(notifiers.describe()) & BUILTINS == {"apprise"}
    assert notifiers.pm.get_plugin("log") is None
    assert manager(None).active == []  # no notifiers table: the default log plugin is left out
    with pytest.raises(ConfigError) as error:
        manager({"log": {}})
    assert error.value.problems[0].startswith("notifiers.log: disabled by NETPROF_DISABLED_PLUGINS")


# --- configuration errors ----------------------------------------------------


@pytest.mark.parametrize(
    ("notifiers", "expected"),
    [
        ({"pagerduty": {}}, ["notifiers.pagerduty: no such plugin installed"]),
        ({"apprise": {}}, ["notifiers.apprise.urls: required"]),
        ({"apprise": {"urls": []}}, ["notifiers.apprise.urls: required"]),
        ({"apprise": {"urls": ["json://127.0.0.1:9/x", "nosuch://x"]}}, ["notifiers.apprise.urls[1]: "]),
        ({"apprise": {"urls": ["json://127.0.0.1:9/x"], "url": "x"}}, ["notifiers.apprise.url: unknown key"]),
        ({"alertmanager": {}}, ["notifiers.alertmanager.url: required"]),
        ({"alertmanager": {"url": "127.0.0.1:9093"}}, ["notifiers.alertmanager.url: required"]),
        ({"alertmanager": {"url": "http://127.0.0.1:9", "timeout": 0}}, ["notifiers.alertmanager.timeout: "]),
        ({"log": {"level": "LOUD"}}, ["notifiers.log.level: "]),
        # Every problem at once, not only the first.
        (
            {"alertmanager": {}, "nosuch": {}, "apprise": {"urls": ["bad"]}},
            ["notifiers.alertmanager.url: ", "notifiers.nosuch: ", "notifiers.apprise.urls[0]: "],
        ),
    ],
)
def test_hook_netprof_configure_refuses_bad_tables(
    manager: Callable[..., NotifierManager], notifiers: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(ConfigError) as error:
        manager(notifiers)
    assert len(error.value.problems) == len(expected), error.value.problems
    for problem, start in zip(error.value.problems, expected):
        assert problem.startswith(start), problem


def test_hook_netprof_configure_a_table_makes_a_plugin_active(
    manager: Callable[..., NotifierManager],
) -> None:
    notifiers = manager({"log": {"level": "error"}, "alertmanager": {"url": "http://127.0.0.1:9093"}})
    assert notifiers.active == ["log", "alertmanager"]
    assert manager({}).active == []


# --- delivery ------------------------------------------------------------------


def test_hook_netprof_notify_log_writes_one_line_per_alert(
    manager: Callable[..., NotifierManager], caplog: pytest.LogCaptureFixture
) -> None:
    notifiers = manager(None)
    caplog.set_level(logging.INFO, logger="netprofd.notify")
    asyncio.run(notifiers.deliver("log", make_notification("firing"), timeout=5))
    asyncio.run(notifiers.deliver("log", make_notification("resolved"), timeout=5))
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "netprofd.notify"]
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO]
    assert lines[0][1].startswith("FIRING NetworkProfilingHighErrorRate [critical] shop: 25%")
    assert lines[1][1].startswith("RESOLVED NetworkProfilingHighErrorRate")


def test_hook_netprof_notify_apprise_json_and_mail(
    manager: Callable[..., NotifierManager], smtp_server: tuple[int, MailBox]
) -> None:
    smtp_port, mailbox = smtp_server
    notification = make_notification("firing")

    async def scenario() -> HttpReceiver:
        async with http_receiver() as receiver:
            urls = [
                f"json://{receiver.url}/hooks/netprof",
                f"mailto://127.0.0.1:{smtp_port}?from=netprofd@example.com&to=ops@example.com",
            ]
            await manager({"apprise": {"urls": urls}}).deliver("apprise", notification, timeout=10)
            return receiver

    receiver = asyncio.run(scenario())
    assert len(receiver.requests) == 1
    path, payload = receiver.requests[0]
    assert path == "/hooks/netprof"
    assert payload["title"] == notification.title == "[FIRING:critical] NetworkProfilingHighErrorRate"
    assert payload["message"] == notification.body
    assert len(mailbox.messages) == 1
    mail = mailbox.messages[0]
    assert mail["Subject"] == notification.title and mail["To"] == "ops@example.com"
    plain = mail.get_body(("plain",))
    assert plain is not None and notification.alerts[0].summary in plain.get_content()


def test_apprise_never_logs_a_password(
    manager: Callable[..., NotifierManager], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "hunter2-s3cr3t"

    async def scenario() -> HttpReceiver:
        async with http_receiver() as receiver:
            url = f"json://alice:{secret}@{receiver.url}/hook"
            await manager({"apprise": {"urls": [url]}}).deliver("apprise", make_notification(), timeout=10)
            return receiver

    assert len(asyncio.run(scenario()).requests) == 1
    # A refused URL: neither the error nor apprise's complaint repeats the secret.
    with pytest.raises(ConfigError) as refused:
        manager({"apprise": {"urls": [f"nosuch://alice:{secret}@127.0.0.1/x"]}})
    assert secret not in str(refused.value)
    assert any(r.name == "apprise" for r in caplog.records), "apprise's own DEBUG lines were not captured"
    assert "alice:****@" in caplog.text
    assert secret not in caplog.text


def test_apprise_failed_send_is_a_delivery_error(manager: Callable[..., NotifierManager]) -> None:
    async def scenario() -> None:
        async with http_receiver(status=500) as receiver:
            notifiers = manager({"apprise": {"urls": [f"json://{receiver.url}/hook"]}})
            with pytest.raises(DeliveryError, match="apprise"):
                await notifiers.deliver("apprise", make_notification(), timeout=10)

    asyncio.run(scenario())


def test_alertmanager_receives_the_alert_and_its_resolution(
    manager: Callable[..., NotifierManager], alertmanager: str
) -> None:
    notifiers = manager({"alertmanager": {"url": alertmanager, "timeout": 5}})
    firing = make_notification("firing", name="NetprofTestFiring")
    labels = dict(firing.alerts[0].labels)

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
        await notifiers.deliver("alertmanager", firing, timeout=10)
        shown = await _get_json(f"{alertmanager}/api/v2/alerts?filter=alertname%3D%22NetprofTestFiring%22")
        started = firing.alerts[0].starts_at
        resolved = make_notification("resolved", name="NetprofTestFiring", starts_at=started)
        await notifiers.deliver("alertmanager", resolved, timeout=10)
        after = await _get_json(f"{alertmanager}/api/v2/alerts?filter=alertname%3D%22NetprofTestFiring%22")
        async with aiohttp.ClientSession() as session, session.get(f"{alertmanager}/metrics") as response:
            metrics = await response.text()
        return shown, after, metrics

    shown, after, metrics = asyncio.run(scenario())
    assert len(shown) == 1
    assert shown[0]["labels"] == labels
    assert shown[0]["annotations"]["summary"] == firing.alerts[0].summary
    assert shown[0]["status"]["state"] == "active"
    # A resolved alert has an endsAt in the past: Alertmanager no longer lists it as active.
    assert after == []
    assert 'alertmanager_alerts_received_total{status="resolved",version="v2"} 1' in metrics


def test_alertmanager_non_2xx_is_a_delivery_error(manager: Callable[..., NotifierManager]) -> None:
    async def scenario() -> None:
        async with http_receiver(status=400) as receiver:
            notifiers = manager({"alertmanager": {"url": f"http://{receiver.url}"}})
            with pytest.raises(DeliveryError, match="400"):
                await notifiers.deliver("alertmanager", make_notification(), timeout=5)
            # The request itself was Alertmanager's postableAlerts form.
            path, alerts = receiver.requests[0]
            assert path == "/api/v2/alerts"
            assert alerts[0]["labels"]["alertname"] == "NetworkProfilingHighErrorRate"
            assert "endsAt" not in alerts[0] and alerts[0]["startsAt"].endswith("Z")

    asyncio.run(scenario())


class Raising:
    @hookimpl
    def netprof_notify(self, notification: Notification) -> None:
        raise ConnectionError("receiver refused")


class Hanging:
    def __init__(self) -> None:
        self.release = threading.Event()

    @hookimpl
    def netprof_notify(self, notification: Notification) -> None:
        # Blocks its worker thread (as a sync client without a timeout would);
        # released at the end of the test so that the thread ends.
        self.release.wait(30)


def test_hook_netprof_notify_one_plugin_failing_or_hanging_stops_no_other(
    manager: Callable[..., NotifierManager],
) -> None:
    hanging = Hanging()
    notification = make_notification()

    async def scenario() -> tuple[list[BaseException | None], float, float, HttpReceiver]:
        async with http_receiver() as receiver:
            notifiers = manager(
                {"apprise": {"urls": [f"json://{receiver.url}/hook"]}, "raising": {}, "hanging": {}},
                raising=Raising(),
                hanging=hanging,
            )
            largest_gap = 0.0
            stop = asyncio.Event()

            async def tick() -> None:
                nonlocal largest_gap
                while not stop.is_set():
                    before = time.monotonic()
                    await asyncio.sleep(0.01)
                    largest_gap = max(largest_gap, time.monotonic() - before)

            ticker = asyncio.create_task(tick())
            started = time.monotonic()
            results = await asyncio.gather(
                notifiers.deliver("raising", notification, timeout=1.0),
                notifiers.deliver("hanging", notification, timeout=1.0),
                notifiers.deliver("apprise", notification, timeout=5.0),
                return_exceptions=True,
            )
            elapsed = time.monotonic() - started
            stop.set()
            await ticker
            hanging.release.set()
            return results, elapsed, largest_gap, receiver

    try:
        (raised, hung, delivered), elapsed, largest_gap, receiver = asyncio.run(scenario())
    finally:
        hanging.release.set()
    assert isinstance(raised, DeliveryError) and raised.name == "raising"
    assert "ConnectionError: receiver refused" in raised.reason
    assert isinstance(hung, DeliveryError) and hung.name == "hanging" and "1 s" in hung.reason
    assert delivered is None and len(receiver.requests) == 1
    assert 0.9 < elapsed < 4.0
    assert largest_gap < 0.25, f"the event loop stalled for {largest_gap:.3f} s"


def test_hook_netprof_notify_async_implementation_is_awaited(manager: Callable[..., NotifierManager]) -> None:
    seen: list[tuple[str, bool]] = []

    class AsyncPlugin:
        @hookimpl
        async def netprof_notify(self, notification: Notification) -> None:
            await asyncio.sleep(0)
            seen.append((notification.id, threading.current_thread() is threading.main_thread()))

    class SlowAsync:
        @hookimpl
        async def netprof_notify(self, notification: Notification) -> None:
            await asyncio.sleep(30)

    notifiers = manager({"async": {}, "slow": {}}, **{"async": AsyncPlugin(), "slow": SlowAsync()})
    notification = make_notification()
    asyncio.run(notifiers.deliver("async", notification, timeout=5))
    # The coroutine ran on the event loop (the main thread here), not in the worker.
    assert seen == [(notification.id, True)]
    with pytest.raises(DeliveryError, match="no answer within 0.3 s"):
        asyncio.run(notifiers.deliver("slow", notification, timeout=0.3))
    with pytest.raises(DeliveryError, match="no such plugin"):
        asyncio.run(notifiers.deliver("nosuch", notification, timeout=1))


# --- the example third-party package ----------------------------------------------


def test_example_plugin_package_is_found_and_delivers(
    manager: Callable[..., NotifierManager], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = ROOT / "examples" / "notifier-plugin"
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(example / "netprof_jsonfile.py", site)
    # What `pip install examples/notifier-plugin` would leave: a dist-info with the entry point.
    dist_info = site / "netprof_notifier_example-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: netprof-notifier-example\nVersion: 0.1\n", encoding="utf-8"
    )
    (dist_info / "entry_points.txt").write_text(
        "[netprof.notifiers]\njsonfile = netprof_jsonfile\n", encoding="utf-8"
    )
    assert 'jsonfile = "netprof_jsonfile"' in (example / "pyproject.toml").read_text(encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "netprof_jsonfile", raising=False)

    with pytest.raises(ConfigError, match=r"notifiers\.jsonfile\.path: required"):
        manager({"jsonfile": {}})
    out = tmp_path / "alerts.jsonl"
    notifiers = manager({"jsonfile": {"path": str(out)}})
    assert "jsonfile" in notifiers.describe()
    notification = make_notification()
    asyncio.run(notifiers.deliver("jsonfile", notification, timeout=5))
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [Notification.from_json(json.loads(line)) for line in lines] == [notification]
    monkeypatch.delitem(sys.modules, "netprof_jsonfile", raising=False)


# --- meta: every hook documented and tested ---------------------------------------


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_docstring_docs_and_a_test(hook: str) -> None:
    spec = getattr(hookspecs, hook)
    assert (spec.__doc__ or "").strip(), f"{hook} has no docstring"
    docs = (ROOT / "docs" / "NOTIFIER_PLUGINS.md").read_text(encoding="utf-8")
    signature = f"{hook}({', '.join(inspect.signature(spec).parameters)})"
    assert signature in docs, f"docs/NOTIFIER_PLUGINS.md does not document {signature}"
    tests = [name for name in globals() if name.startswith(f"test_hook_{hook}")]
    assert tests, f"no test_hook_{hook}_* test in this module"
