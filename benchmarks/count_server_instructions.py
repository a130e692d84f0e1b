#!/usr/bin/env python3
"""Instructions a real uvicorn + Starlette server spends per request, bare and
behind NetProfMiddleware, counted by valgrind's callgrind: a figure that a
busy machine does not move, though not the whole cost (see the end).

    PYTHONPATH=. python benchmarks/count_server_instructions.py [REQUESTS] [--connections C]

The wall-clock benchmark (``test_end_to_end.py``) loads each server with wrk
and measures requests/s and CPU time per request; on a shared machine those
swing by several percent from run to run, more than the goal (≤ 1 % throughput
lost). Here each server runs under callgrind, one client outside it sends GET
/items/42 on a keep-alive connection, one request after another; the server is
stopped with SIGINT and callgrind prints its total. Two runs per variant, of N
and 2N requests after the same warm-up: (total(2N) - total(N)) / N is the
server's cost of one request, start-up and shut-down cancelled out.

With ``--connections 64`` the requests go over 64 keep-alive connections at
once, as wrk sends them in the wall-clock benchmark: a server with many
requests in flight spends more per request in its garbage collector (every
request's objects are young), so what a middleware allocates costs more.

Two controls run too (apps.py): a middleware that only awaits the app, and the
least timing middleware written in Python. A count of instructions understates
what a middleware costs a server: by the next request its code and data have
left the CPU's first-level caches, which a count does not see and the CPU time
of test_end_to_end.py does. (Run under ``valgrind --tool=callgrind
--cache-sim=yes``, netprof adds some 450 first-level instruction-cache misses
a request at 64 connections.) At 64 connections the counts move by about
±1.5 k instructions a request between runs: the client's threads interleave
the requests differently each time.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

from apps import PATH, compile_bytecode

from netprof_core._recorder import NO_EXTENSIONS

WARMUP = 500
REQUEST = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: count\r\n\r\n".encode()
VARIANTS = {  # name: (factory in apps.py, recorder core)
    "bare": ("starlette_app", ""),
    "netprof[cython]": ("netprof_starlette_app", "cython"),
    "netprof[python]": ("netprof_starlette_app", "python"),
    "netprof[cython], 25 % sampled": ("netprof_sampled_starlette_app", "cython"),
    "netprof[cython], switched off": ("netprof_off_starlette_app", "cython"),
    "pass-through middleware": ("passthrough_starlette_app", ""),
    "timing middleware": ("send_wrapper_starlette_app", ""),
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


def _load(port: int, requests: int, connections: int) -> None:
    """``requests`` requests over ``connections`` keep-alive connections at
    once (a thread each, one request after another on each), as a load
    generator would send them; every response must be a 200."""
    shares = [requests // connections + (i < requests % connections) for i in range(connections)]
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=300) for _ in shares]
    failures: list[BaseException] = []

    def send(sock: socket.socket, count: int) -> None:
        try:
            buffer = bytearray()
            for _ in range(count):
                _exchange(sock, buffer)
        except Exception as exc:  # noqa: BLE001 - re-raised by the caller
            failures.append(exc)

    threads = [threading.Thread(target=send, args=pair) for pair in zip(sockets, shares)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sock in sockets:
        sock.close()
    if failures:
        raise failures[0]


def instructions(variant: str, requests: int, connections: int) -> int:
    """The instructions of one server run: start-up, WARMUP requests, then
    ``requests`` more over ``connections`` connections, and shut-down."""
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
                for _ in range(WARMUP):
                    _exchange(sock, buffer)
            _load(port, requests, connections)
            server.send_signal(signal.SIGINT)
            _, output = server.communicate(timeout=300)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    match = re.search(r"Collected : (\d+)", output)
    if match is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{output}")
    return int(match.group(1))


def per_request(variant: str, requests: int, connections: int) -> int:
    return (
        instructions(variant, 2 * requests, connections) - instructions(variant, requests, connections)
    ) // requests


def main(requests: int, connections: int) -> None:
    compile_bytecode()  # as an installed netprof has it
    print(
        f"uvicorn + Starlette, GET {PATH}, {requests} and {2 * requests} requests over {connections} connection(s)"
    )
    bare = per_request("bare", requests, connections)
    print(f"bare: {bare} instructions/request")
    for variant in list(VARIANTS)[1:]:
        if VARIANTS[variant][1] == "cython" and NO_EXTENSIONS:
            continue
        count = per_request(variant, requests, connections)
        print(f"{variant}: {count} instructions/request, {count - bare:+} ({(count - bare) / bare:+.2%})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("requests", nargs="?", type=int, default=2000, help="N (default 2000)")
    parser.add_argument(
        "--connections", type=int, default=1, help="keep-alive connections at once (default 1)"
    )
    arguments = parser.parse_args()
    main(arguments.requests, arguments.connections)
