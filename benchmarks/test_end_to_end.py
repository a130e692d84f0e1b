"""Requests per second of uvicorn + Starlette, bare and behind NetProfMiddleware,
under the same loopback load: what the middleware costs a real server.

    cd /work/main && NETPROF_E2E=1 PYTHONPATH=. python -m pytest benchmarks/test_end_to_end.py \\
        -q -p no:cacheprovider
    # or, the same without pytest:
    cd /work/main && PYTHONPATH=. python benchmarks/test_end_to_end.py

Skipped unless NETPROF_E2E=1: it takes about 4 minutes and no CI figure of it means
anything. It prints figures and never fails on them; it fails when netprof did
not account, exactly once, for each request the application answered (the app
counts them; GET /served): recorded, or counted as sampled out or switched
off; and, where it records all, recorded.

One uvicorn per variant (1 worker, ``--log-level warning --no-access-log``,
serving benchmarks/apps.py): the bare Starlette app, a second bare server as a
control, the app behind the middleware once per recorder core, then recording
one request in four and switched off (the rollout's first step and the
rollback: a request not to be recorded is left alone), and three more for
scale: behind a middleware that only awaits the app, behind the least
timing middleware written in Python (a wrapped ``send`` takes the status), and
behind OpenTelemetry's. Bytecode is compiled first, as an installed package
has it (apps.compile_bytecode says why). uvicorn uses
uvloop and httptools when they are importable (``uvicorn[standard]``), else
asyncio and h11; the first line printed says which. All servers start first and
stay up; each run then loads every server in turn for NETPROF_E2E_SECONDS with
``wrk`` (one thread, NETPROF_E2E_CONNECTIONS keep-alive connections, GET
/items/42), the order rotated from run to run. After NETPROF_E2E_RUNS runs:

    loss     = 1 - median(requests/s behind the middleware) / median(requests/s bare)
    cpu cost = median(server CPU µs per request behind it) / median(bare) - 1
    paired   = the median over runs of the same ratio within each run, minus 1

Throughput moves with whatever else the machine runs. The server's CPU time
per request (user + system from /proc/<pid>/stat, over wrk's request count)
moves much less, and is the throughput loss a server saturating its CPU would
see. The second bare server's figures are the noise floor: two processes of one
program differ by a percent or so.

With two or more CPUs the servers are pinned to CPU 0 and wrk to CPU 1
(``taskset``), so that the load generator does not take the server's CPU.
wrk is Debian's (``apt-get install wrk``); without it the test is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from apps import PATH, SERVED_PATH, TEMPLATE, compile_bytecode

RUNS = int(os.environ.get("NETPROF_E2E_RUNS", "5"))
SECONDS = int(os.environ.get("NETPROF_E2E_SECONDS", "5"))
CONNECTIONS = int(os.environ.get("NETPROF_E2E_CONNECTIONS", "64"))
WARMUP_SECONDS = 2

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
PINNED = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
SERVER_CPUS = ["taskset", "-c", "0"] if PINNED else []
LOAD_CPUS = ["taskset", "-c", "1"] if PINNED else []
# Where netprof's default segment_dir lives: tmpfs. On a disk file system every
# writeback of the segment's dirty pages costs the next write to them a page fault.
SEGMENT_BASE = os.environ.get("NETPROF_E2E_SEGMENT_BASE") or (
    "/dev/shm" if os.path.isdir("/dev/shm") else None
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("NETPROF_E2E") != "1", reason="load test: set NETPROF_E2E=1"),
    pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)"),
]


@dataclass
class Variant:
    name: str
    factory: str
    implementation: str = ""
    port: int = 0
    segment_dir: str = ""
    pid: int = 0
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # server CPU per request
    errors: int = 0
    served: int = 0  # requests the application answered, by its own count
    recorded: int = 0  # requests netprof recorded on the item route
    accounted: int = 0  # requests netprof recorded, sampled out or found it switched off, on every route
    records_all: bool = True  # the variant records every request (not sampling, not switched off)


def _variants() -> list[Variant]:
    from netprof_core._recorder import NO_EXTENSIONS

    # A second bare server: two processes of one program differ by a percent or
    # so (memory layout, hash seeds, which caches they share); that is the noise floor.
    variants = [Variant("bare", "starlette_app"), Variant("bare, 2nd process", "starlette_app")]
    if not NO_EXTENSIONS:
        variants.append(Variant("netprof[cython]", "netprof_starlette_app", "cython"))
    variants.append(Variant("netprof[python]", "netprof_starlette_app", "python"))
    # The rollout's first step, and the rollback: a request left alone as it starts.
    core = "python" if NO_EXTENSIONS else "cython"
    variants.append(
        Variant(f"netprof[{core}], 25 % sampled", "netprof_sampled_starlette_app", core, records_all=False)
    )
    variants.append(
        Variant(f"netprof[{core}], switched off", "netprof_off_starlette_app", core, records_all=False)
    )
    # What any middleware costs this server, and what the usual choice costs.
    variants.append(Variant("pass-through middleware", "passthrough_starlette_app"))
    variants.append(Variant("timing middleware", "send_wrapper_starlette_app"))
    if importlib.util.find_spec("opentelemetry.instrumentation.asgi") is not None:
        variants.append(Variant("OpenTelemetry", "opentelemetry_starlette_app"))
    return variants


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # type: ignore[no-any-return]


def _wait_ready(port: int, server: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    request = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"uvicorn on port {port} exited with {server.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(request)
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"uvicorn on port {port} did not answer 200 within {timeout} s")


@contextmanager
def _servers(variants: list[Variant]) -> Iterator[None]:
    compile_bytecode()  # as an installed netprof has it
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for variant in variants:
            variant.port = _free_port()
            variant.segment_dir = tempfile.mkdtemp(prefix="netprof-e2e-", dir=SEGMENT_BASE)
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
            env["NETPROF_BENCH_SEGMENT_DIR"] = variant.segment_dir
            env["NETPROF_BENCH_IMPLEMENTATION"] = variant.implementation
            command = [
                *SERVER_CPUS, sys.executable, "-m", "uvicorn", "--factory",
                "--app-dir", str(BENCHMARKS), f"apps:{variant.factory}",
                "--host", "127.0.0.1", "--port", str(variant.port),
                "--workers", "1", "--log-level", "warning", "--no-access-log",
            ]  # fmt: skip
            processes.append(subprocess.Popen(command, env=env))
            variant.pid = processes[-1].pid  # taskset execs uvicorn: the same process
        for variant, process in zip(variants, processes):
            _wait_ready(variant.port, process)
        yield
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for variant in variants:
            shutil.rmtree(variant.segment_dir, ignore_errors=True)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _wrk(port: int, seconds: int) -> tuple[float, int, int]:
    """(requests/s, requests, non-2xx responses + socket errors) of one wrk run."""
    url = f"http://127.0.0.1:{port}{PATH}"
    command = [*LOAD_CPUS, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    requests = re.search(r"(\d+) requests in", output)
    if rps is None or requests is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{output}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", output))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if socket_errors is not None:
        errors += sum(int(n) for n in socket_errors.groups())
    return float(rps.group(1)), int(requests.group(1)), errors


def _load(variant: Variant, seconds: int) -> None:
    cpu = _cpu_seconds(variant.pid)
    rps, requests, errors = _wrk(variant.port, seconds)
    variant.cpu_us.append((_cpu_seconds(variant.pid) - cpu) / requests * 1e6)
    variant.rps.append(rps)
    variant.errors += errors


def _recorded(segment_dir: str, expected: int, timeout: float = 5.0) -> tuple[int, int]:
    """Requests netprof recorded on the item route; and every request it
    saw, on any route: recorded, sampled out or found it switched off. Read
    again until that is ``expected`` or ``timeout`` has passed: the GET
    /served just answered is recorded as its app returns, after its response."""
    from netprof_core import read_segments

    deadline = time.monotonic() + timeout
    while True:
        snapshots = read_segments(segment_dir, records=False)
        recorded = sum(
            r.count for snapshot in snapshots for r in snapshot.routes if r.key.template == TEMPLATE
        )
        accounted = sum(
            s.counters.requests + s.counters.sampled_out + s.counters.disabled_calls for s in snapshots
        )
        if accounted >= expected or time.monotonic() > deadline:
            return recorded, accounted
        time.sleep(0.05)


def _served(port: int) -> int:
    """Requests the server's item route answered (the application counts them)."""
    request = f"GET {SERVED_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(4096):
            response += chunk
    return int(response.rsplit(b"\r\n\r\n", 1)[1])


def _server_stack() -> str:
    import uvicorn

    parts = [f"uvicorn {uvicorn.__version__}"]
    for module, fallback in (("uvloop", "asyncio loop"), ("httptools", "h11 parser")):
        try:
            __import__(module)
            parts.append(module)
        except ImportError:
            parts.append(fallback)
    return ", ".join(parts)


def run() -> list[Variant]:
    variants = _variants()
    pinning = "server on CPU 0, wrk on CPU 1" if PINNED else "not pinned"
    print(f"\n{_server_stack()}; wrk -t1 -c{CONNECTIONS}, {RUNS} runs x {SECONDS} s per variant; {pinning}; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    with _servers(variants):
        for variant in variants:
            _wrk(variant.port, WARMUP_SECONDS)
        for i in range(RUNS):
            for variant in variants[i % len(variants) :] + variants[: i % len(variants)]:
                _load(variant, SECONDS)
            figures = (f"{v.name} {v.rps[-1]:.0f} req/s {v.cpu_us[-1]:.1f} µs" for v in variants)
            print(f"run {i + 1}: " + ", ".join(figures))
        for variant in variants:
            variant.served = _served(variant.port)
            if variant.implementation:
                variant.recorded, variant.accounted = _recorded(variant.segment_dir, variant.served + 1)
    _report(variants)
    counts = ", ".join(f"{v.name} {v.recorded} of {v.served}" for v in variants if v.implementation)
    # (25 % sampled: about a quarter recorded; switched off: none. Each seen once, as the test checks.)
    print(f"errors (non-2xx, socket): {sum(v.errors for v in variants)}; "
          f"requests recorded of those served: {counts}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    return variants


def _report(variants: list[Variant]) -> None:
    median = statistics.median
    base = variants[0]
    width = max(len(v.name) for v in variants)
    print(f"{'variant':{width}} {'median req/s':>12} {'min':>7} {'max':>7} {'loss':>7}"
          f" {'CPU µs/req':>10} {'min':>6} {'max':>6} {'cpu cost':>8} {'paired':>7}")  # fmt: skip
    for v in variants:
        line = f"{v.name:{width}} {median(v.rps):12.0f} {min(v.rps):7.0f} {max(v.rps):7.0f} "
        if v is base:
            line += f"{'-':>7} "
        else:
            line += f"{1 - median(v.rps) / median(base.rps):7.2%} "
        line += f"{median(v.cpu_us):10.1f} {min(v.cpu_us):6.1f} {max(v.cpu_us):6.1f} "
        if v is not base:
            paired = median(cpu / base_cpu for cpu, base_cpu in zip(v.cpu_us, base.cpu_us))
            line += f"{median(v.cpu_us) / median(base.cpu_us) - 1:8.2%} {paired - 1:7.2%}"
        print(line.rstrip())


def test_end_to_end_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        variants = run()
    assert all(v.errors == 0 for v in variants)
    for variant in variants:
        assert variant.served > 0, variant.name
        if variant.implementation:
            # Each request once: the items served, and the one GET /served that counted them.
            assert variant.accounted == variant.served + 1, (variant.name, variant.accounted, variant.served)
            if variant.records_all:
                assert variant.recorded == variant.served, (variant.name, variant.recorded, variant.served)


if __name__ == "__main__":
    run()
