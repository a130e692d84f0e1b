"""Starting and stopping real servers for the tests, in one place.

Each server runs in its own process group on 127.0.0.1 and a free port, with
its output in a log file that failures quote. :func:`running` starts one, waits
until its port answers, and always stops it: SIGTERM and a wait (so atexit
hooks run and mark the segments closed), SIGKILL to the group if it hangs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from netprof_core import (
    Direction,
    ErrorKind,
    RequestRecord,
    RouteStats,
    SegmentSnapshot,
    merge_routes,
    read_segments,
)

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
REQUEST_TIMEOUT = 10.0  # for every HTTP client of the tests


class ServerError(AssertionError):
    """A server that did not start or stop as it should; carries its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, segment_dir: Path, app_name: str, **keys: object) -> Path:
    """A TOML config file with a ``[network_profiling]`` table."""
    keys = {"segment_dir": str(segment_dir), "app_name": app_name, "log_slow_requests": False, **keys}
    lines = ["[network_profiling]"] + [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def server_env(
    implementation: str,
    *,
    config: Path | None = None,
    events: Path | None = None,
    wrap: bool = True,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a server process: ``implementation`` ("cython" or
    "python") selects netprof's core; nothing of this process's NETPROF_* leaks in."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("NETPROF_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    if implementation == "python":
        env["NETPROF_NO_EXTENSIONS"] = "1"
    elif implementation != "cython":
        raise ValueError(f"unknown implementation {implementation!r}")
    if config is not None:
        env["NETPROF_CONFIG"] = str(config)
    if events is not None:
        env["NETPROF_TEST_EVENTS"] = str(events)
    env["NETPROF_TEST_WRAP"] = "1" if wrap else "0"
    env.update(extra or {})
    return env


def uvicorn_argv(target: str, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", target,
        "--host", "127.0.0.1", "--port", str(port),
        "--lifespan", "on", "--no-access-log", "--timeout-graceful-shutdown", "10",
        *extra,
    ]  # fmt: skip


def gunicorn_argv(
    target: str, port: int, *, workers: int, worker_class: str = "sync", extra: Sequence[str] = ()
) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn", target,
        "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--worker-class", worker_class,
        "--graceful-timeout", "10", "--timeout", "30", "--log-level", "warning",
        *extra,
    ]  # fmt: skip


def wsgiref_argv(target: str, port: int) -> list[str]:
    return [sys.executable, "-m", "tests.apps.serve_wsgi", target, str(port)]


class Server:
    """One server process; use :func:`running`."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str], port: int, log_path: Path) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def fail(self, message: str) -> ServerError:
        tail = self.log()[-6000:]
        return ServerError(f"{message}\n$ {' '.join(self.argv)}\n--- server log (tail) ---\n{tail}")

    def start(self, timeout: float = START_TIMEOUT) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: workers die with it
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self.fail(f"server exited with {self.proc.returncode} before its port answered")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise self.fail(f"port {self.port} did not answer within {timeout} s")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait; the return code. Raises (after killing) if it hangs."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise self.fail(f"server did not stop within {timeout} s of SIGTERM") from None
        self.returncode = proc.returncode
        self._reap_group()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL to the server's own process group (its workers too)."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def _reap_group(self) -> None:
        """Workers left behind by a master that has exited are killed."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, 0)  # anyone left in the group?
            time.sleep(0.5)
            os.killpg(self.proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def running(
    argv: Sequence[str], *, env: Mapping[str, str], port: int, log_path: Path, timeout: float = START_TIMEOUT
) -> Iterator[Server]:
    """A started server; stopped (SIGTERM) when the block ends, its process
    group killed if it will not stop or the block fails. Test code may call
    ``server.stop()`` itself, before reading the segments."""
    server = Server(argv, env=env, port=port, log_path=log_path)
    try:
        server.start(timeout)
        yield server
        server.stop()
    except BaseException:
        server.kill()  # the whole process group, workers included
        raise


def wait_for(
    predicate: Callable[[], Any], *, timeout: float = 20.0, what: str, server: Server | None = None
) -> Any:
    """Poll ``predicate`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            message = f"timed out after {timeout} s waiting for {what}"
            raise server.fail(message) if server is not None else AssertionError(message)
        time.sleep(0.05)
    return value


def read_events(path: Path) -> list[list[str]]:
    try:
        return [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def started_pids(path: Path) -> set[int]:
    return {int(event[1]) for event in read_events(path) if event[0] == "startup"}


def inbound_routes(snapshots: Sequence[SegmentSnapshot]) -> dict[tuple[str, str], RouteStats]:
    """(method, template) -> the route's statistics summed over all segments;
    only routes that counted requests."""
    merged = merge_routes(snapshots)
    return {
        (key.method, key.template): stats
        for (_, key), stats in merged.items()
        if key.direction == Direction.INBOUND and stats.count
    }


def status_classes(stats: RouteStats) -> dict[str, int]:
    """{"2xx": n, ...} for the classes that counted requests ("none": no status)."""
    names = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
    return {name: n for name, n in zip(names, stats.status_classes) if n}


def error_kinds(stats: RouteStats) -> dict[str, int]:
    """{"EXCEPTION": n, ...} for the error kinds that were counted."""
    return {ErrorKind(kind).name: n for kind, n in enumerate(stats.error_kinds) if n}


# -- one run of a server: start, drive, stop, read ------------------------------


@dataclass
class Run:
    """What a test needs from one server run, read after the server stopped."""

    implementation: str
    pid: int  # the server's (the master's, under gunicorn)
    returncode: int
    snapshots: list[SegmentSnapshot]
    events: list[list[str]]
    log: str
    result: Any  # what the driver returned
    segment_dir: Path

    @property
    def routes(self) -> dict[tuple[str, str], RouteStats]:
        return inbound_routes(self.snapshots)

    def counts(self) -> dict[tuple[str, str], int]:
        return {key: stats.count for key, stats in self.routes.items()}

    def records(self, template: str, method: str = "GET") -> list[RequestRecord]:
        return [
            record
            for snapshot in self.snapshots
            for record in snapshot.records
            if record.route.template == template and record.route.method == method
        ]


def serve_and_drive(
    argv: Callable[[int], Sequence[str]],
    tmp: Path,
    *,
    implementation: str,
    drive: Callable[[str], Any],
    wrap: bool = True,
    app_name: str = "netprof-test",
    extra_env: Mapping[str, str] | None = None,
    workers: int = 1,
) -> Run:
    """Start the server ``argv(port)`` with a fresh segment directory under
    ``tmp``, wait until its port answers and ``workers`` processes noted their
    start-up, call ``drive(base_url)``, stop it (SIGTERM) and read its segments."""
    tmp.mkdir(parents=True, exist_ok=True)
    segment_dir = tmp / "segments"
    segment_dir.mkdir()
    config = write_config(tmp / "netprof.toml", segment_dir, app_name)
    events = tmp / "events.txt"
    port = free_port()
    env = server_env(implementation, config=config, events=events, wrap=wrap, extra=extra_env)
    with running(argv(port), env=env, port=port, log_path=tmp / "server.log") as server:
        wait_for(
            lambda: len(started_pids(events)) >= workers,
            timeout=START_TIMEOUT,
            what=f"{workers} process(es) to start the app",
            server=server,
        )
        try:
            result = drive(server.base_url)
        except Exception as exc:
            raise server.fail(f"driving the server failed: {exc!r}") from exc
        returncode = server.stop()
    return Run(
        implementation=implementation,
        pid=server.pid,
        returncode=returncode,
        snapshots=read_segments(segment_dir),
        events=read_events(events),
        log=server.log(),
        result=result,
        segment_dir=segment_dir,
    )


class RunCache:
    """Module-wide memo of server runs, so that many small tests share one
    run per (app, core); a run that failed fails each test that asks for it,
    without starting the server again."""

    def __init__(self) -> None:
        self._runs: dict[Hashable, Run] = {}
        self._failures: dict[Hashable, Exception] = {}

    def get(self, key: Hashable, make: Callable[[], Run]) -> Run:
        if key not in self._runs and key not in self._failures:
            try:
                self._runs[key] = make()
            except Exception as exc:  # noqa: BLE001  (kept, and raised to each test that asks)
                self._failures[key] = exc
        if key in self._failures:
            failure = self._failures[key]
            raise RuntimeError(f"the server run {key!r} failed: {failure}") from failure
        return self._runs[key]


# -- HTTP ---------------------------------------------------------------------------

# Headers a server sets by itself, different from one response to the next.
VOLATILE_HEADERS = frozenset({"date", "server", "server-timing"})


@dataclass(frozen=True)
class Captured:
    """A response as the client saw it, minus the volatile headers."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def capture(response: httpx.Response) -> Captured:
    headers = tuple(
        (k.lower(), v) for k, v in response.headers.multi_items() if k.lower() not in VOLATILE_HEADERS
    )
    return Captured(response.status_code, headers, response.content)


UNMATCHED = "<unmatched>"
_CLASS_NAMES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")


@dataclass(frozen=True)
class Req:
    """One request of a test's traffic, and the route netprof should count it
    under: (method, template), or None when it must not be recorded."""

    method: str
    path: str
    route: tuple[str, str] | None
    body: bytes | None = None
    json: Any = None
    close: bool = False  # "Connection: close" (after an app exception uvicorn drops the connection)


def perform(client: httpx.Client, req: Req) -> Captured:
    headers = {"connection": "close"} if req.close else None
    response = client.request(req.method, req.path, content=req.body, json=req.json, headers=headers)
    return capture(response)


@dataclass
class Tally:
    """What the client sent and saw, per route: the figures netprof must show."""

    counts: dict[tuple[str, str], int]
    status_classes: dict[tuple[str, str], dict[str, int]]
    bytes_in: dict[tuple[str, str], int]
    bytes_out: dict[tuple[str, str], int]

    @classmethod
    def of(cls, exchanges: Sequence[tuple[Req, Captured]]) -> Tally:
        tally = cls({}, {}, {}, {})
        for req, response in exchanges:
            if req.route is None:
                continue
            key = req.route
            tally.counts[key] = tally.counts.get(key, 0) + 1
            classes = tally.status_classes.setdefault(key, {})
            name = _CLASS_NAMES[response.status // 100]
            classes[name] = classes.get(name, 0) + 1
            sent = (
                len(req.body)
                if req.body is not None
                else len(httpx.Request("POST", "/", json=req.json).content)
                if req.json is not None
                else 0
            )
            tally.bytes_in[key] = tally.bytes_in.get(key, 0) + sent
            tally.bytes_out[key] = tally.bytes_out.get(key, 0) + len(response.body)
        return tally


def assert_figures(
    run: Run, exchanges: Sequence[tuple[Req, Captured]], *, skip_bytes_out: Sequence[tuple[str, str]] = ()
) -> None:
    """Per route: count, statuses per class, bytes in and out exactly as the client saw them."""
    tally = Tally.of(exchanges)
    routes = run.routes
    assert set(tally.counts) <= set(routes), f"routes missing: {set(tally.counts) - set(routes)}"
    for key, count in tally.counts.items():
        stats = routes[key]
        assert stats.count == count, key
        assert status_classes(stats) == tally.status_classes[key], key
        assert stats.bytes_in == tally.bytes_in[key], key
        if key not in skip_bytes_out:
            assert stats.bytes_out == tally.bytes_out[key], key


def assert_one_closed_segment(run: Run, app_name: str) -> SegmentSnapshot:
    """The server's one segment, closed by its atexit hook, with every request counted."""
    assert [(s.header.pid, s.app_name) for s in run.snapshots] == [(run.pid, app_name)]
    (snapshot,) = run.snapshots
    assert snapshot.header.closed, "segment not marked closed at exit"
    assert snapshot.source == "final"
    assert snapshot.counters.internal_errors == 0
    assert snapshot.counters.overflowed_routes == 0
    assert snapshot.counters.requests == sum(run.counts().values())
    return snapshot
