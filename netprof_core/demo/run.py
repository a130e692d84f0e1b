"""``netprof demo``: everything netprof does, on a demo shop, in about a minute.

From nothing: a temporary segment directory and config, the demo shop under
uvicorn with the middleware (and its outbound calls), a netprofd with the log
notifier and low thresholds; then traffic through phases — normal, slow,
failing, an overload that trips an auto-disable, and the recovery — while the
per-route table and the alerts show live. At the end every process is
stopped and every file removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from ..cli_live import route_rows_from_daemon, routes_table
from ..daemon_client import DaemonClient, DaemonError

__all__ = ("Phase", "run_demo")

APP = "demo-shop"


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    share: float  # of the demo's duration
    mode: str  # the shop's mode
    rate_per_client: float  # requests a second per client
    what: str


PHASES = (
    Phase("normal", 0.25, "normal", 10, "steady traffic: see the per-route percentiles"),
    Phase("slow", 0.20, "slow", 10, "searches and payments slow down: the p95 rule fires"),
    Phase("failing", 0.20, "failing", 10, "half the payments fail: the error-rate rule fires"),
    Phase("overload", 0.15, "normal", 40, "a flood: the overload rule auto-disables profiling"),
    Phase("recovery", 0.20, "normal", 10, "profiling enabled again; the alerts resolve"),
)

RULES = """
[[rules]]
name = "DemoSlowSearch"
metric = "p95_ms"
op = ">"
threshold = 150
window = "6s"
for = "2s"
route = "/api/search"
min_requests = 10
summary = "searches are slow"

[[rules]]
name = "DemoCheckoutErrors"
metric = "error_rate_percent"
op = ">"
threshold = 20
window = "6s"
for = "2s"
route = "/api/checkout"
severity = "critical"
min_requests = 10
summary = "checkouts are failing"

[[rules]]
name = "DemoOverload"
metric = "request_rate"
op = ">"
threshold = {overload}
window = "3s"
action = "disable"
summary = "request rate beyond what this demo profiles"
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Demo:
    duration: float
    concurrency: int
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="netprof-demo-")))
    key: str = field(default_factory=lambda: secrets.token_hex(16))
    events: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shm = Path("/dev/shm")
        base = Path(tempfile.mkdtemp(prefix="netprof-demo-", dir=shm)) if shm.is_dir() else self.root / "shm"
        self.segment_dir = base / "segments"
        self.segment_dir.mkdir(parents=True)
        self.shm_root = base
        self.app_port, self.daemon_port = _free_port(), _free_port()
        self.app_url = f"http://127.0.0.1:{self.app_port}"
        self.client = DaemonClient(f"http://127.0.0.1:{self.daemon_port}", self.key, timeout=5)
        normal_rate = self.concurrency * PHASES[0].rate_per_client
        overload = normal_rate * 2.5  # between the normal rate and the flood's
        self.config = self.root / "netprof.toml"
        self.config.write_text(
            f"""[network_profiling]
segment_dir = "{self.segment_dir}"
app_name = "{APP}"
slow_request_threshold = 0.2
log_slow_requests = false
alert_error_rate_threshold = 90.0
alert_slow_request_threshold = 90.0

[daemon]
listen = "127.0.0.1:{self.daemon_port}"
state_dir = "{self.root / "state"}"
tick_seconds = 0.5
group_wait_seconds = 0.5

[notifiers.log]
"""
            + RULES.replace("{overload}", f"{overload:.0f}"),
            encoding="utf-8",
        )

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("NETPROF_") or k == "NETPROF_NO_EXTENSIONS"
        }
        env.update(NETPROF_CONFIG=str(self.config), NETPROF_API_KEY=self.key, PYTHONUNBUFFERED="1")
        return env

    @contextlib.contextmanager
    def processes(self) -> Iterator[None]:
        started: list[subprocess.Popen[bytes]] = []
        try:
            for name, argv in (
                ("netprofd", [sys.executable, "-m", "netprof_daemon", "--config", str(self.config)]),
                ("shop", [sys.executable, "-m", "uvicorn", "netprof_core.demo.app:app", "--host", "127.0.0.1",
                          "--port", str(self.app_port), "--no-access-log", "--log-level", "warning"]),
            ):  # fmt: skip
                with open(self.root / f"{name}.log", "wb") as log:
                    started.append(
                        subprocess.Popen(argv, env=self.env(), stdout=log, stderr=subprocess.STDOUT)
                    )
            self._wait_ready(started)
            yield
        finally:
            for proc in reversed(started):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            for proc in started:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def _wait_ready(self, started: list[subprocess.Popen[bytes]]) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(proc.poll() is not None for proc in started):
                logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in self.root.glob("*.log"))
                raise RuntimeError(f"a demo process exited early:\n{logs}")
            with contextlib.suppress(httpx.HTTPError, DaemonError):
                if httpx.get(f"{self.app_url}/healthz", timeout=1).status_code == 200:
                    self.client.get("/healthz")
                    return
            time.sleep(0.1)
        raise RuntimeError("the demo shop or netprofd did not start within 30 s")

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.shm_root, ignore_errors=True)

    # -- traffic ---------------------------------------------------------------------

    async def traffic(self, phase: Phase, seconds: float) -> None:
        async with httpx.AsyncClient(base_url=self.app_url, timeout=10) as http:
            await http.post("/_demo/mode", params={"mode": phase.mode})
            end = time.monotonic() + seconds
            await asyncio.gather(*(self._client(http, phase, end) for _ in range(self.concurrency)))

    async def _client(self, http: httpx.AsyncClient, phase: Phase, end: float) -> None:
        pause = 1.0 / phase.rate_per_client
        while time.monotonic() < end:
            pick = random.random()
            with contextlib.suppress(httpx.HTTPError):
                if pick < 0.5:
                    await http.get(f"/api/items/{random.randint(1, 500)}")
                elif pick < 0.8:
                    await http.get("/api/search", params={"q": "teapot"})
                else:
                    await http.post("/api/checkout", json={"item": 1})
            await asyncio.sleep(pause * random.uniform(0.5, 1.5))

    # -- what the user sees -------------------------------------------------------------

    def watch_alerts(self, seen: dict[str, str]) -> None:
        """Turn changes in the daemon's alert list into event lines."""
        with contextlib.suppress(DaemonError):
            view = self.client.alerts()
            now_firing = {a["name"]: a for a in view["active"] if a["state"] == "firing"}
            for name, alert in now_firing.items():
                if seen.get(name) != "firing":
                    self._event(f"FIRING   {name} [{alert['severity']}]: {alert['summary']}")
                    seen[name] = "firing"
                    self.counts["fired"] = self.counts.get("fired", 0) + 1
            for name, state in list(seen.items()):
                if state == "firing" and name not in now_firing:
                    self._event(f"RESOLVED {name}")
                    seen[name] = "resolved"
                    self.counts["resolved"] = self.counts.get("resolved", 0) + 1

    def _event(self, line: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {line}")

    def view(self, phase: Phase, left: float) -> Group:
        header = Text.assemble(
            ("netprof demo ", "bold"),
            (f"phase {phase.name}", "bold cyan"),
            f": {phase.what} ({left:.0f} s left)",
        )
        try:
            rows = route_rows_from_daemon(self.client.network_stats("1m"))
            metrics = self.client.production_metrics()["applications"]
        except DaemonError as exc:
            return Group(header, Text(str(exc), style="red"))
        app = next((a for a in metrics if a["app"] == APP), None)
        recording = (
            "on"
            if app and app["enabled"]
            else "OFF (auto-disabled)"
            if app and app["auto_disabled_processes"]
            else "off"
        )
        status = Text(f"profiling {recording}; requests recorded: {app['requests'] if app else 0}")
        events = Text("\n".join(self.events[-8:]) or "no alerts yet", style="yellow")
        return Group(
            header,
            routes_table(rows, "per route, last minute"),
            status,
            Text("alerts:", style="bold"),
            events,
        )


def run_demo(duration: float = 60.0, concurrency: int = 8, console: Console | None = None) -> int:
    # A log file or a CI job is no terminal: a wide fixed width keeps the table readable.
    console = console or (Console() if Console().is_terminal else Console(width=140))
    demo = Demo(duration, concurrency)
    seen: dict[str, str] = {}
    try:
        with demo.processes():
            console.print(
                f"netprof demo: shop on {demo.app_url}, netprofd on {demo.client.url} ({duration:.0f} s)"
            )
            live = Live(
                console=console, refresh_per_second=2, transient=False, auto_refresh=console.is_terminal
            )
            with live:
                for phase in PHASES:
                    seconds = phase.share * duration
                    demo._event(f"phase {phase.name}: {phase.what}")
                    if phase.name == "recovery":
                        result = demo.client.control("enable")
                        demo._event(f"POST .../enable: recording again in {result['segments']} process(es)")
                    asyncio.run(_phase(demo, phase, seconds, live, seen))
                    if not console.is_terminal:
                        console.print(demo.view(phase, 0))
                # Let the last alerts resolve.
                deadline = time.monotonic() + 10
                while any(state == "firing" for state in seen.values()) and time.monotonic() < deadline:
                    time.sleep(0.5)
                    demo.watch_alerts(seen)
                live.update(Text("\n".join(demo.events)))
            still = sorted(name for name, state in seen.items() if state == "firing")
            console.print(
                f"\n{demo.counts.get('fired', 0)} alert(s) fired, {demo.counts.get('resolved', 0)} resolved"
                + (f" ({', '.join(still)} still firing: its window is longer than the demo)" if still else "")
                + "; everything stopped and removed.",
                soft_wrap=True,
            )
    finally:
        demo.cleanup()
    return 0


async def _phase(demo: Demo, phase: Phase, seconds: float, live: Live, seen: dict[str, str]) -> None:
    traffic = asyncio.create_task(demo.traffic(phase, seconds))
    end = time.monotonic() + seconds
    while not traffic.done():
        await asyncio.sleep(0.5)
        await asyncio.to_thread(demo.watch_alerts, seen)
        live.update(await asyncio.to_thread(demo.view, phase, max(0.0, end - time.monotonic())))
    await traffic
