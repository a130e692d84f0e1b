#!/usr/bin/env python3
"""Instructions a real uvicorn + Starlette server spends per request, bare and
behind NetProfMiddleware, counted by valgrind's callgrind: the end-to-end cost
of the middleware as a figure that a busy machine does not move.

    PYTHONPATH=. python benchmarks/count_server_instructions.py [REQUESTS] [--wrk SECONDS]

The wall-clock benchmark (``test_end_to_end.py``) loads each server with wrk
and measures requests/s and CPU time per request; on a shared machine those
swing by several percent from run to run, more than the goal (≤ 1 % throughput
lost). Here each server runs under callgrind, one client outside it sends GET
/items/42 on a keep-alive connection, one request after another; the server is
stopped with SIGINT and callgrind prints its total. Two runs per variant, of N
and 2N requests after the same warm-up: (total(2N) - total(N)) / N is the
server's cost of one request, start-up and shut-down cancelled out. A server
whose CPU is the bottleneck loses throughput in proportion.

With ``--wrk SECONDS`` the load is wrk's instead, as in the wall-clock
benchmark (64 keep-alive connections), for SECONDS and twice that: a server
busy with many connections spends fewer instructions per request in its event
loop, so the middleware's share is larger. The cost of one request is then
(total(2) - total(1)) / (requests(2) - requests(1)), with wrk's request counts.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

from apps import PATH

WARMUP = 500
REQUEST = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: count\r\n\r\n".encode()
VARIANTS = {  # name: (factory in apps.py, recorder core)
    "bare": ("starlette_app", ""),
    "netprof[cython]": ("netprof_starlette_app", "cython"),
    "netprof[python]": ("netprof_starlette_app", "python"),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # type: ignore[no-any-return]


def _connect(port: int, server: subprocess.Popen[str], timeout: float = 120.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {server.stderr.read()}")  # type: ignore[union-attr]
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"no server on port {port} after {timeout} s")


def _exchange(sock: socket.socket, buffer: bytearray) -> None:
    """One request, and its whole response (headers, then Content-Length bytes)."""
    sock.sendall(REQUEST)
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        buffer += sock.recv(65536)
    head = bytes(buffer[:end])
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected response: {head!r}")
    match = re.search(rb"(?i)content-length: *(\d+)", head)
    size = end + 4 + (int(match.group(1)) if match else 0)
    while len(buffer) < size:
        buffer += sock.recv(65536)
    del buffer[:size]


def _wrk(port: int, seconds: int) -> int:
    """Requests wrk completed in ``seconds`` (errors are not expected: they fail the run)."""
    url = f"http://127.0.0.1:{port}{PATH}"
    output = subprocess.run(
        ["wrk", "-t1", "-c64", f"-d{seconds}s", "--timeout", "30s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk saw errors:\n{output}")
    match = re.search(r"(\d+) requests in", output)
    if match is None:
        raise RuntimeError(f"no request count in wrk's output:\n{output}")
    return int(match.group(1))


def instructions(variant: str, requests: int, wrk_seconds: int = 0) -> tuple[int, int]:
    """(instructions, requests) of one server run: start-up, WARMUP requests,
    then ``requests`` more one after another (or wrk's load for
    ``wrk_seconds``), and shut-down."""
    factory, core = VARIANTS[variant]
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="netprof-count-") as segment_dir:
        env = {
            **os.environ,
            "PYTHONHASHSEED": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "NETPROF_BENCH_SEGMENT_DIR": segment_dir,
            "NETPROF_BENCH_IMPLEMENTATION": core,
        }
        command = [
            "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, "-m", "uvicorn", "--factory", "--app-dir", str(BENCHMARKS), f"apps:{factory}",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
        server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        try:
            with _connect(port, server) as sock:
                buffer = bytearray()
                for _ in range(WARMUP + (0 if wrk_seconds else requests)):
                    _exchange(sock, buffer)
            if wrk_seconds:
                requests = _wrk(port, wrk_seconds)
            server.send_signal(signal.SIGINT)
            _, output = server.communicate(timeout=300)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    match = re.search(r"Collected : (\d+)", output)
    if match is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{output}")
    return int(match.group(1)), requests


def per_request(variant: str, requests: int, wrk_seconds: int) -> int:
    total_1, requests_1 = instructions(variant, requests, wrk_seconds)
    total_2, requests_2 = instructions(variant, 2 * requests, 2 * wrk_seconds)
    return (total_2 - total_1) // (requests_2 - requests_1)


def main(requests: int, wrk_seconds: int) -> None:
    if wrk_seconds:
        if shutil.which("wrk") is None:
            raise SystemExit("--wrk needs wrk (apt-get install wrk)")
        load = f"wrk -t1 -c64 for {wrk_seconds} s and {2 * wrk_seconds} s"
    else:
        load = f"one keep-alive connection, {requests} and {2 * requests} requests"
    print(f"uvicorn + Starlette, GET {PATH}, {load}")
    bare = per_request("bare", requests, wrk_seconds)
    print(f"bare: {bare} instructions/request")
    for variant in list(VARIANTS)[1:]:
        if variant == "netprof[cython]" and os.environ.get("NETPROF_NO_EXTENSIONS") == "1":
            continue
        count = per_request(variant, requests, wrk_seconds)
        print(f"{variant}: {count} instructions/request, +{count - bare} ({(count - bare) / bare:+.2%})")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    wrk_seconds = 0
    if "--wrk" in arguments:
        index = arguments.index("--wrk")
        wrk_seconds = int(arguments[index + 1])
        del arguments[index : index + 2]
    main(int(arguments[0]) if arguments else 2000, wrk_seconds)
