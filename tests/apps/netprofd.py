"""A real netprofd process for the tests: its own config, port and state
directory, started with ``python -m netprof_daemon`` and stopped with SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from .servers import REQUEST_TIMEOUT, ROOT, ServerError, free_port

API_KEY = "test-key-0123456789abcdef"
START_TIMEOUT = 30.0
PREFIX = "/api/v1/debug"
NP = f"{PREFIX}/network-profiling"


def write_daemon_config(
    path: Path,
    segment_dir: Path,
    state_dir: Path,
    port: int,
    *,
    profiling: Mapping[str, Any] | None = None,
    daemon: Mapping[str, Any] | None = None,
    extra: str = "",
) -> Path:
    """``extra``: TOML appended as it is (``[notifiers.x]`` tables, ``[[rules]]``)."""
    tables = {
        "network_profiling": {"segment_dir": str(segment_dir), **(profiling or {})},
        "daemon": {
            "listen": f"127.0.0.1:{port}",
            "state_dir": str(state_dir),
            "tick_seconds": 0.2,
            **(daemon or {}),
        },
    }
    lines = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in keys.items())
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def rule_toml(name: str, metric: str, op: str, threshold: float, **fields: object) -> str:
    """A ``[[rules]]`` table, for ``extra``; ``fields`` are its other keys (``for``: ``**{"for": "1s"}``)."""
    lines = [
        "[[rules]]",
        f'name = "{name}"',
        f'metric = "{metric}"',
        f'op = "{op}"',
        f"threshold = {threshold}",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def daemon_env(api_key: str | None = API_KEY, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("NETPROF_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if api_key is not None:
        env["NETPROF_API_KEY"] = api_key
    env.update(extra)
    return env


def netprofd_argv(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "netprof_daemon", "--config", str(config), *extra]


def run_netprofd(
    config: Path, *flags: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``netprofd --config FILE <flags>`` to completion (``--check``, ``--test-notify``...)."""
    return subprocess.run(
        netprofd_argv(config, *flags), cwd=ROOT, env=env or daemon_env(), capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


class Netprofd:
    """One daemon process and an HTTP client that sends its key."""

    def __init__(
        self, config: Path, port: int, log_path: Path, env: Mapping[str, str], api_key: str | None
    ) -> None:
        self.config = config
        self.port = port
        self.log_path = log_path
        self.env = dict(env)
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=REQUEST_TIMEOUT)

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def fail(self, message: str) -> ServerError:
        return ServerError(f"{message}\n--- netprofd log (tail) ---\n{self.log()[-6000:]}")

    def launch(self) -> None:
        """Start the process, without waiting for it to answer."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                netprofd_argv(self.config),
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def start(self) -> None:
        """Start the process; return once /healthz answers 200."""
        self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise self.fail(f"netprofd exited with {self.proc.returncode} before it answered")
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/healthz", timeout=0.5).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise self.fail(f"netprofd did not answer within {START_TIMEOUT} s")
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> int:
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise self.fail("netprofd did not stop within 20 s of SIGTERM") from None
        self.proc = None
        return proc.returncode

    def close(self) -> None:
        with contextlib.suppress(ServerError):
            self.stop()
        self.http.close()

    # -- the API ------------------------------------------------------------------

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(path, params=params)

    def post(self, path: str, **params: Any) -> httpx.Response:
        return self.http.post(path, params=params)

    def stats(self, window: str = "all", **params: Any) -> dict[str, Any]:
        response = self.get(f"{PREFIX}/network-stats", window=window, **params)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def app_stats(self, app: str, window: str = "all") -> dict[str, Any] | None:
        for entry in self.stats(window, slowest=0)["applications"]:
            if entry["app"] == app:
                return entry  # type: ignore[no-any-return]
        return None

    def route_counts(self, app: str, window: str = "all") -> dict[tuple[str, str, str], int]:
        """(direction, method, route) -> count, for routes that counted requests."""
        entry = self.app_stats(app, window)
        if entry is None:
            return {}
        return {(r["direction"], r["method"], r["route"]): r["count"] for r in entry["routes"]}

    def wait_until(self, predicate: Any, *, timeout: float = 15.0, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise self.fail(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.1)


@contextlib.contextmanager
def netprofd(
    tmp: Path,
    segment_dir: Path,
    *,
    profiling: Mapping[str, Any] | None = None,
    daemon: Mapping[str, Any] | None = None,
    api_key: str | None = API_KEY,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    name: str = "netprofd",
    extra: str = "",
) -> Iterator[Netprofd]:
    """A started daemon reading ``segment_dir``; stopped when the block ends,
    and it must stop cleanly (exit code 0)."""
    port = port or free_port()
    config = write_daemon_config(
        tmp / f"{name}.toml",
        segment_dir,
        tmp / f"{name}-state",
        port,
        profiling=profiling,
        daemon=daemon,
        extra=extra,
    )
    process = Netprofd(config, port, tmp / f"{name}.log", env or daemon_env(api_key), api_key)
    try:
        process.start()
        yield process
        code = process.stop()
        if code != 0:
            raise process.fail(f"netprofd exited with {code} after SIGTERM")
    finally:
        process.close()
