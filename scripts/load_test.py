#!/usr/bin/env python3
"""Load-test an app with profiling ON and OFF in turns; judge the overhead
and memory against the deployment guide's staging criteria.

Concurrent async clients send requests for ``--duration`` seconds, after a
short warm-up. The run is cut into equal slices (``--slice``) with profiling
alternately ON and OFF, so that both states see the same conditions. Per
state it reports requests/s, the client's latency p50/p95/p99, the mean
latency, and the server's CPU time per request (when it can read the
server's /proc/<pid>/stat); the differences ON - OFF are the overhead per
request. The segments' memory is sampled at the end of every slice.

Without ``--url`` it starts the demo shop itself (uvicorn on 127.0.0.1, a
free port, a temporary segment directory and config), toggles profiling
through the segments' control blocks, and removes everything at the end.
With ``--url`` it loads a running app; profiling is toggled through netprofd
(``--daemon-url`` and ``--api-key`` or NETPROF_API_KEY), and put back as it
was at the end.

Examples::

    python scripts/load_test.py --duration 3600 --concurrent 50
    python scripts/load_test.py --duration 60 --concurrent 8 --json load.json
    python scripts/load_test.py --url http://staging.example.com:8000 --path / --path /api/items/1 \\
        --daemon-url http://staging.example.com:9465 --api-key "$API_KEY" --duration 600

Exit status: 0 when every criterion passes, 1 when one fails, 2 on bad
arguments or when the app or netprofd cannot be used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from _common import DaemonClient, DaemonError, default_api_key
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from netprof_core._display import printable

CRITERIA_EPILOG = """\
criteria (the guide's staging phase; each limit is an option):
  overhead   the server's CPU time per request ON - OFF when it is measured
             (the demo app started here, or --server-pid), else the client's
             mean latency ON - OFF; must be below --max-overhead-ms (1 ms)
  memory     every sample of the segments' memory below --max-memory-mb (50 MB)
  growth     memory is "growing" when the last sample is more than
             --max-growth-mb (1 MB) above the first; segments have a fixed
             size, so growth means new segments (processes) or a leak
  errors     5xx answers and failed requests at most --max-error-percent (1 %)
memory is the sum of the segment files' sizes (demo app started here) or
netprofd's memory-usage total (--daemon-url); without either it is not judged.
exit status: 0 all criteria pass, 1 one fails, 2 bad arguments or the app or
netprofd cannot be used
"""

DEMO_TARGET = "netprof_core.demo.app:app"
DEMO_APP_NAME = "load-test-demo"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
PERCENTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


class UsageError(Exception):
    """The run cannot go on (exit status 2): the app or netprofd is unusable."""


# -- arguments -----------------------------------------------------------------


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return value


def non_negative(text: str) -> float:
    if text.strip() in ("0", "0.0"):
        return 0.0
    return positive(text)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="load_test.py",
        description=__doc__.split("\n\n")[0],
        epilog=CRITERIA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--duration", type=positive, metavar="SECONDS", default=60.0, help="measured load (default 60)"
    )
    load.add_argument(
        "--concurrent", type=positive_int, metavar="N", default=10, help="concurrent clients (default 10)"
    )
    load.add_argument(
        "--slice", type=positive, metavar="SECONDS", help="one ON or OFF slice (default min(60, duration/4))"
    )
    load.add_argument(
        "--warmup",
        type=non_negative,
        metavar="SECONDS",
        help="seconds of unmeasured load first (default min(5, duration/10))",
    )
    load.add_argument(
        "--timeout", type=positive, metavar="SECONDS", default=10.0, help="per request, seconds (default 10)"
    )
    load.add_argument("--seed", type=int, metavar="N", help="random seed of the request mix")
    target = parser.add_argument_group("target (default: start the demo app here)")
    target.add_argument("--url", help="base URL of a running app to load instead of the demo app")
    target.add_argument(
        "--path",
        action="append",
        dest="paths",
        metavar="PATH",
        help="with --url: a path to GET (repeatable; default /)",
    )
    target.add_argument(
        "--demo-mix", action="store_true", help="with --url: the app is the demo shop; send its request mix"
    )
    target.add_argument(
        "--server-pid", type=positive_int, metavar="PID", help="with --url: the local server's pid (CPU time)"
    )
    target.add_argument(
        "--daemon-url", help="with --url: netprofd's base URL, to toggle profiling and read memory"
    )
    target.add_argument(
        "--api-key", default=default_api_key(), help="netprofd's key (default $NETPROF_API_KEY)"
    )
    target.add_argument("--app", help="with --daemon-url: toggle and measure only this app (?app=)")
    limits = parser.add_argument_group("criteria")
    limits.add_argument("--max-overhead-ms", type=positive, metavar="MS", default=1.0, help="default 1")
    limits.add_argument("--max-memory-mb", type=positive, metavar="MB", default=50.0, help="default 50")
    limits.add_argument("--max-growth-mb", type=non_negative, metavar="MB", default=1.0, help="default 1")
    limits.add_argument(
        "--max-error-percent", type=non_negative, metavar="PERCENT", default=1.0, help="default 1"
    )
    parser.add_argument("--json", metavar="FILE", help="write the figures and the verdict to FILE")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parsed and checked options; exits with status 2 on bad ones."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.url is None:
        for name in ("paths", "demo_mix", "server_pid", "daemon_url", "app"):
            if getattr(args, name):
                parser.error(f"--{name.replace('_', '-').rstrip('s')} needs --url (a running app)")
    else:
        if not args.url.startswith(("http://", "https://")):
            parser.error(f"--url must start with http:// or https://, got {args.url!r}")
        if args.paths and args.demo_mix:
            parser.error("--path and --demo-mix exclude each other")
        if any(not p.startswith("/") for p in args.paths or ()):
            parser.error("each --path must start with /")
    if args.daemon_url is not None:
        if not args.daemon_url.startswith(("http://", "https://")):
            parser.error(f"--daemon-url must start with http:// or https://, got {args.daemon_url!r}")
        if not args.api_key:
            parser.error("--daemon-url needs --api-key (or NETPROF_API_KEY)")
    elif args.app:
        parser.error("--app needs --daemon-url")
    if args.slice is None:
        args.slice = min(60.0, args.duration / 4)
    if args.warmup is None:
        args.warmup = min(5.0, args.duration / 10)
    if args.duration / args.slice < 2:
        parser.error(
            f"--slice {args.slice:g} leaves less than one ON and one OFF slice "
            f"in --duration {args.duration:g}"
        )
    return args


def slice_plan(duration: float, slice_seconds: float) -> tuple[int, float]:
    """An even number of equal slices filling ``duration``: (count, seconds each)."""
    count = max(2, int(duration / slice_seconds + 1e-9))
    count -= count % 2
    return count, duration / count


# -- requests ------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    json: Any = None


RequestMaker = Callable[[random.Random], Request]


def demo_request(rng: random.Random) -> Request:
    """The demo shop's mix: 6 item pages, 3 searches, 1 checkout in 10."""
    pick = rng.random()
    if pick < 0.6:
        return Request("GET", f"/api/items/{rng.randrange(1, 1000)}")
    if pick < 0.9:
        return Request("GET", f"/api/search?q={rng.choice(('tea', 'pot', 'cup', 'kettle'))}")
    return Request("POST", "/api/checkout", json={"items": [rng.randrange(1, 1000)], "amount": 42})


def paths_request(paths: Sequence[str]) -> RequestMaker:
    return lambda rng: Request("GET", rng.choice(paths))


# -- targets -------------------------------------------------------------------


class Target(Protocol):
    base_url: str
    can_toggle: bool
    memory_source: str | None  # where memory is read, None when it is not

    def start(self) -> None: ...
    def set_profiling(self, on: bool) -> None: ...
    def memory_mb(self) -> float | None: ...
    def cpu_seconds(self) -> float | None: ...
    def close(self) -> None: ...


def read_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` (from /proc/<pid>/stat), None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # fields from the 3rd (state) on
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_env(config: Path) -> dict[str, str]:
    import netprof_core

    root = str(Path(netprof_core.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env["NETPROF_CONFIG"] = str(config)
    env.pop("NETPROF_DEMO_MODE", None)
    return env


class DemoServer:
    """The demo shop under uvicorn, with its own temporary segment directory;
    profiling is toggled through the segments' control blocks."""

    can_toggle = True

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="netprof-load-test-"))
        self.segment_dir = self.workdir / "segments"
        self.segment_dir.mkdir()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.memory_source = f"segment files in {self.segment_dir}"
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> Path:
        # The guide's staging settings.
        config = self.workdir / "netprof.toml"
        config.write_text(
            "[network_profiling]\n"
            f"segment_dir = {json.dumps(str(self.segment_dir))}\n"
            f'app_name = "{DEMO_APP_NAME}"\n'
            "slow_request_threshold = 2.0\nmax_stored_requests = 1000\n"
            "log_slow_requests = false\nmax_memory_mb = 50.0\n",
            encoding="utf-8",
        )
        return config

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "server.log").read_text(errors="replace")[-3000:]
        return ""

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "uvicorn", DEMO_TARGET, "--host", "127.0.0.1", "--port", str(self.port),
            "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "5",
        ]  # fmt: skip
        with open(self.workdir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                env=_child_env(self._write_config()),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C here must not stop it before we do
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise UsageError(f"the demo app exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/healthz", timeout=0.5).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise UsageError(
                    f"the demo app did not answer within {START_TIMEOUT:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _segments(self) -> list[Path]:
        from netprof_core.segment import segment_paths

        return segment_paths(self.segment_dir)

    def set_profiling(self, on: bool) -> None:
        from netprof_core import SegmentControl

        segments = self._segments()
        if not segments:
            raise UsageError(f"the demo app made no segment in {self.segment_dir}")
        for path in segments:
            with SegmentControl.open(path) as control:
                control.enable() if on else control.disable()

    def memory_mb(self) -> float | None:
        total = 0
        for path in self._segments():
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total / 2**20

    def cpu_seconds(self) -> float | None:
        return read_cpu_seconds(self.proc.pid) if self.proc is not None else None

    def close(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


class RemoteApp:
    """A running app; profiling toggled and memory read through netprofd, if given."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.base_url = args.url.rstrip("/")
        self.app = args.app
        self.server_pid = args.server_pid
        self.daemon = DaemonClient(args.daemon_url, args.api_key) if args.daemon_url else None
        self.can_toggle = self.daemon is not None
        self.memory_source = f"netprofd memory-usage at {self.daemon.base_url}" if self.daemon else None
        self.initially_on: bool | None = None

    def start(self) -> None:
        if self.server_pid is not None and read_cpu_seconds(self.server_pid) is None:
            raise UsageError(f"--server-pid {self.server_pid}: cannot read /proc/{self.server_pid}/stat")
        try:
            with httpx.Client(timeout=10.0) as client:
                client.get(self.base_url + "/")
        except httpx.HTTPError as exc:
            raise UsageError(f"{self.base_url}: cannot reach the app ({type(exc).__name__}: {exc})") from None
        if self.daemon is not None:
            try:
                apps = self.daemon.production_metrics(self.app)["applications"]
            except DaemonError as exc:
                raise UsageError(str(exc)) from None
            self.initially_on = any(a["enabled"] for a in apps) if apps else None

    def set_profiling(self, on: bool) -> None:
        assert self.daemon is not None
        try:
            self.daemon.set_profiling(on, self.app)
        except DaemonError as exc:
            raise UsageError(f"cannot turn profiling {'on' if on else 'off'}: {exc}") from None

    def memory_mb(self) -> float | None:
        if self.daemon is None:
            return None
        try:
            return float(self.daemon.memory_usage(self.app)["total_mb"])
        except DaemonError as exc:
            raise UsageError(f"cannot read memory usage: {exc}") from None

    def cpu_seconds(self) -> float | None:
        return read_cpu_seconds(self.server_pid) if self.server_pid is not None else None

    def close(self) -> None:
        if self.daemon is not None:
            with contextlib.suppress(DaemonError, UsageError):
                self.set_profiling(self.initially_on is not False)  # as it was (on if unknown)
            self.daemon.close()


# -- measurements ----------------------------------------------------------------


@dataclass
class StateTally:
    """What the clients measured while profiling was in one state."""

    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    errors: int = 0
    seconds: float = 0.0
    cpu_seconds: float | None = None
    slices: int = 0

    def add(self, ms: float, ok: bool) -> None:
        self.latencies_ms.append(ms)
        if not ok:
            self.errors += 1

    def add_cpu(self, seconds: float | None) -> None:
        if seconds is not None:
            self.cpu_seconds = (self.cpu_seconds or 0.0) + seconds


@dataclass
class Clock:
    """The current slice: requests count only when they start and end in the same one."""

    epoch: int = 0
    state: str | None = None  # "on", "off", "unchanged"; None during warm-up and switches

    def switch(self, state: str | None) -> None:
        self.epoch += 1
        self.state = state


@dataclass
class Run:
    tallies: dict[str, StateTally] = field(default_factory=dict)
    memory: list[dict[str, Any]] = field(default_factory=list)
    sent: int = 0
    discarded: int = 0  # warm-up, and requests that straddled a switch


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def state_figures(tally: StateTally) -> dict[str, Any]:
    values = sorted(tally.latencies_ms)
    count = len(values)
    return {
        "requests": count,
        "errors": tally.errors,
        "error_percent": round(100 * tally.errors / count, 3) if count else None,
        "seconds": round(tally.seconds, 3),
        "slices": tally.slices,
        "requests_per_second": round(count / tally.seconds, 2) if tally.seconds else None,
        "latency_ms": {
            "mean": round(sum(values) / count, 4) if count else None,
            **{name: _round(percentile(values, q)) for name, q in PERCENTILES},
        },
        "cpu_ms_per_request": (
            round(1e3 * tally.cpu_seconds / count, 4) if tally.cpu_seconds is not None and count else None
        ),
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# -- the load ---------------------------------------------------------------------


async def client_loop(
    client: httpx.AsyncClient,
    make: RequestMaker,
    rng: random.Random,
    clock: Clock,
    run: Run,
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        request = make(rng)
        epoch, state = clock.epoch, clock.state
        started = time.perf_counter()
        try:
            response = await client.request(request.method, request.path, json=request.json)
            ok = response.status_code < 500
        except httpx.HTTPError:
            ok = False
        elapsed_ms = (time.perf_counter() - started) * 1e3
        run.sent += 1
        if state is not None and clock.epoch == epoch:
            run.tallies[state].add(elapsed_ms, ok)
        else:
            run.discarded += 1
        if not ok:
            await asyncio.sleep(0.01)  # a dead server must not turn this into a busy loop


async def wait_slice(seconds: float, progress: Progress, task: Any, describe: Callable[[], str]) -> None:
    last = time.monotonic()
    end = last + seconds
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(0.25, left))
        now = time.monotonic()
        progress.update(task, advance=now - last, description=describe())
        last = now


async def drive(args: argparse.Namespace, target: Target, make: RequestMaker, progress: Progress) -> Run:
    count, seconds = slice_plan(args.duration, args.slice)
    states = ["on", "off"] if target.can_toggle else ["unchanged"]
    run = Run(tallies={state: StateTally() for state in states})
    clock, stop = Clock(), asyncio.Event()
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.concurrent, max_keepalive_connections=args.concurrent)
    task = progress.add_task("warm-up", total=args.warmup + args.duration)
    async with httpx.AsyncClient(base_url=target.base_url, limits=limits, timeout=args.timeout) as client:
        workers = [
            asyncio.create_task(client_loop(client, make, random.Random(rng.random()), clock, run, stop))
            for _ in range(args.concurrent)
        ]
        try:
            await wait_slice(args.warmup, progress, task, lambda: f"warm-up: {run.sent} requests")
            started = time.monotonic()
            for index in range(count):
                state = states[index % len(states)]
                clock.switch(None)
                if target.can_toggle:
                    await asyncio.to_thread(target.set_profiling, state == "on")
                label = f"{index + 1}/{count}"
                await measure_slice(target, run, clock, state, seconds, progress, task, label)
                run.memory.append(await memory_sample(target, time.monotonic() - started, state))
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
    return run


async def measure_slice(
    target: Target,
    run: Run,
    clock: Clock,
    state: str,
    seconds: float,
    progress: Progress,
    task: Any,
    label: str,
) -> None:
    tally = run.tallies[state]
    cpu_before = target.cpu_seconds()
    started = time.monotonic()
    clock.switch(state)
    shown = "profiling " + state.upper() if state != "unchanged" else "profiling unchanged"
    await wait_slice(
        seconds, progress, task, lambda: f"slice {label}, {shown}: {len(tally.latencies_ms)} requests"
    )
    clock.switch(None)
    tally.seconds += time.monotonic() - started
    tally.slices += 1
    cpu_after = target.cpu_seconds()
    if cpu_before is not None and cpu_after is not None:
        tally.add_cpu(cpu_after - cpu_before)


async def memory_sample(target: Target, at: float, state: str) -> dict[str, Any]:
    mb = await asyncio.to_thread(target.memory_mb)
    return {"seconds": round(at, 3), "state": state, "memory_mb": _round(mb)}


# -- figures and verdict -------------------------------------------------------------


def overhead_figures(states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """ON - OFF: mean client latency and server CPU per request; the judged one."""
    if "on" not in states or "off" not in states:
        return {"latency_ms": None, "cpu_ms": None, "judged_ms": None, "judged_on": None}
    on, off = states["on"], states["off"]
    latency = _diff(on["latency_ms"]["mean"], off["latency_ms"]["mean"])
    cpu = _diff(on["cpu_ms_per_request"], off["cpu_ms_per_request"])
    judged_on = "cpu" if cpu is not None else "latency" if latency is not None else None
    return {
        "latency_ms": latency,
        "cpu_ms": cpu,
        "judged_ms": cpu if cpu is not None else latency,
        "judged_on": judged_on,
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def memory_figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    values = [s["memory_mb"] for s in samples if s["memory_mb"] is not None]
    if not values:
        return {"max_mb": None, "first_mb": None, "last_mb": None, "growth_mb": None}
    return {
        "max_mb": max(values),
        "first_mb": values[0],
        "last_mb": values[-1],
        "growth_mb": round(values[-1] - values[0], 4),
    }


def check(name: str, value: float | None, limit: float, passed: bool | None, unit: str) -> dict[str, Any]:
    return {"name": name, "value": value, "limit": limit, "unit": unit, "passed": passed}


def verdict(
    args: argparse.Namespace, states: dict[str, Any], overhead: dict[str, Any], memory: dict[str, Any]
) -> list[dict[str, Any]]:
    """The staging criteria; ``passed`` is None for what was not measured."""
    judged = overhead["judged_ms"]
    requests = sum(s["requests"] for s in states.values())
    errors = sum(s["errors"] for s in states.values())
    error_percent = round(100 * errors / requests, 3) if requests else None
    checks = [
        check(
            "overhead",
            judged,
            args.max_overhead_ms,
            None if judged is None else judged < args.max_overhead_ms,
            "ms",
        ),
        check(
            "memory",
            memory["max_mb"],
            args.max_memory_mb,
            None if memory["max_mb"] is None else memory["max_mb"] < args.max_memory_mb,
            "MB",
        ),
        check(
            "memory growth",
            memory["growth_mb"],
            args.max_growth_mb,
            None if memory["growth_mb"] is None else memory["growth_mb"] <= args.max_growth_mb,
            "MB",
        ),
        check(
            "errors",
            error_percent,
            args.max_error_percent,
            None if error_percent is None else error_percent <= args.max_error_percent,
            "%",
        ),
    ]
    for state, figures in states.items():
        if not figures["requests"]:
            checks.append(check(f"requests with profiling {state}", 0, 1, False, "requests"))
    return checks


def report(args: argparse.Namespace, target: Target, run: Run) -> dict[str, Any]:
    states = {state: state_figures(tally) for state, tally in run.tallies.items()}
    overhead = overhead_figures(states)
    memory = memory_figures(run.memory)
    checks = verdict(args, states, overhead, memory)
    return {
        "target": target.base_url,
        "started_demo_app": isinstance(target, DemoServer),
        "duration_seconds": args.duration,
        "warmup_seconds": args.warmup,
        "concurrent": args.concurrent,
        "slices": slice_plan(args.duration, args.slice)[0],
        "slice_seconds": round(slice_plan(args.duration, args.slice)[1], 3),
        "requests_sent": run.sent,
        "requests_discarded": run.discarded,
        "states": states,
        "overhead": overhead,
        "memory": {"source": target.memory_source, **memory, "samples": run.memory},
        "checks": checks,
        "passed": all(c["passed"] is not False for c in checks),
    }


# -- output --------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_summary(console: Console, result: dict[str, Any]) -> None:
    table = Table(title=Text(printable(f"load test of {result['target']}: {result['concurrent']} clients")))
    table.add_column("profiling")
    for name in ("requests", "req/s", "errors", "mean ms", "p50 ms", "p95 ms", "p99 ms", "CPU ms/req"):
        table.add_column(name, justify="right")
    for state, s in result["states"].items():
        lat = s["latency_ms"]
        table.add_row(
            state.upper(), str(s["requests"]), _fmt(s["requests_per_second"], 1), str(s["errors"]),
            _fmt(lat["mean"]), _fmt(lat["p50"]), _fmt(lat["p95"]), _fmt(lat["p99"]),
            _fmt(s["cpu_ms_per_request"], 4),
        )  # fmt: skip
    overhead = result["overhead"]
    if overhead["judged_on"] is not None:
        table.add_row(
            "ON - OFF", "", "", "", _fmt(overhead["latency_ms"], 4), "", "", "", _fmt(overhead["cpu_ms"], 4),
            style="bold",
        )  # fmt: skip
    console.print(table)
    memory = result["memory"]
    if memory["source"] is not None:
        samples = ", ".join(_fmt(s["memory_mb"], 2) for s in memory["samples"])
        console.print(f"memory ({memory['source']}), MB per slice: {samples}")
    for c in result["checks"]:
        mark = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[yellow]not measured[/]"}[c["passed"]]
        value = "-" if c["value"] is None else f"{c['value']:g} {c['unit']}"
        console.print(f"{mark}  {c['name']}: {value} (limit {c['limit']:g} {c['unit']})")
    if result["overhead"]["judged_on"] == "cpu":
        console.print("overhead judged on the server's CPU time per request (ON - OFF)")
    elif result["overhead"]["judged_on"] == "latency":
        console.print("overhead judged on the client's mean latency (ON - OFF)")
    missing = [c["name"] for c in result["checks"] if c["passed"] is None]
    note = f" (not measured: {', '.join(missing)})" if missing else ""
    console.print(("[bold green]PASSED[/]" if result["passed"] else "[bold red]FAILED[/]") + note)


def make_target(args: argparse.Namespace) -> DemoServer | RemoteApp:
    return DemoServer() if args.url is None else RemoteApp(args)


def request_maker(args: argparse.Namespace) -> RequestMaker:
    if args.url is None or args.demo_mix:
        return demo_request
    return paths_request(args.paths or ["/"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Console(width=None if sys.stdout.isatty() else 120)
    err = Console(stderr=True)
    target = make_target(args)
    try:
        target.start()
        if not target.can_toggle:
            err.print("[yellow]no --daemon-url: profiling cannot be toggled, the overhead is not measured[/]")
        columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err) as progress:
            run = asyncio.run(drive(args, target, request_maker(args), progress))
        result = report(args, target, run)
    except UsageError as exc:
        # The message may quote the demo app's log: each of its lines shown escaped.
        shown = "\n".join(printable(line) for line in str(exc).splitlines())
        print(f"load_test.py: error: {shown}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("load_test.py: interrupted", file=sys.stderr)
        return 2
    finally:
        target.close()
    print_summary(out, result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
