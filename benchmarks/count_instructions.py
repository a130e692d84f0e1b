#!/usr/bin/env python3
"""Instructions per request of the hooks, counted by valgrind's callgrind: a
figure that a busy machine does not move, to compare variants of the code where
wall times are too noisy (the httpx client's own 80 µs swing by more than the
hook costs).

    PYTHONPATH=. python benchmarks/count_instructions.py [wsgi asgi starlette httpx ...]

For each application, bare and behind the hook (once per recorder core), it
runs ``python count_instructions.py --serve VARIANT CORE N`` under callgrind
for N and 2N requests after a warm-up: (instructions(2N) - instructions(N)) / N
is the cost of one request, start-up and warm-up cancelled out. Hash
randomisation is off (PYTHONHASHSEED=0) so that two runs count the same, and
the start-up's objects are frozen (``gc.freeze()``) so that full collections
of them do not land in one window and not the other.
"""

from __future__ import annotations

import asyncio
import gc
import io
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

N = 2000
WARMUP = 300
APPS = ("wsgi", "asgi", "starlette", "httpx", "httpx-async")
CORES = ("cython", "python")

ENVIRON: dict[str, Any] = {
    "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/items/42", "QUERY_STRING": "",
    "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
    "HTTP_HOST": "127.0.0.1:8000", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
    "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
    "wsgi.multiprocess": False, "wsgi.run_once": False,
}  # fmt: skip
SCOPE: dict[str, Any] = {
    "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
    "method": "GET", "scheme": "http", "path": "/items/42", "raw_path": b"/items/42", "root_path": "",
    "query_string": b"", "headers": [(b"host", b"127.0.0.1:8000")], "client": ("127.0.0.1", 54321),
    "server": ("127.0.0.1", 8000), "state": {}, "extensions": {},
}  # fmt: skip


def _wsgi_server(app: Any) -> Callable[[int], None]:
    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        pass

    def serve(requests: int) -> None:
        for _ in range(requests):
            body = app(dict(ENVIRON), start_response)
            for _chunk in body:
                pass
            if hasattr(body, "close"):
                body.close()

    return serve


def _asgi_server(app: Any) -> Callable[[int], None]:
    loop = asyncio.new_event_loop()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    async def calls(requests: int) -> None:
        for _ in range(requests):
            await app(dict(SCOPE), receive, send)

    return lambda requests: loop.run_until_complete(calls(requests))


def _httpx_client(recorder: Any) -> Callable[[int], None]:
    import httpx
    from test_client_benchmarks import URL, handler

    from netprof_core.clients import instrument_httpx_client

    client = httpx.Client(transport=httpx.MockTransport(handler))
    if recorder is not None:
        instrument_httpx_client(client, recorder)

    def send(requests: int) -> None:
        for _ in range(requests):
            client.get(URL)

    return send


def _async_httpx_client(recorder: Any) -> Callable[[int], None]:
    import httpx
    from test_client_benchmarks import URL, handler

    from netprof_core.clients import instrument_httpx_client

    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    if recorder is not None:
        instrument_httpx_client(client, recorder)

    async def sends(requests: int) -> None:
        for _ in range(requests):
            await client.get(URL)

    return lambda requests: loop.run_until_complete(sends(requests))


def serve(app_name: str, core: str, requests: int) -> None:
    """Runs in the process callgrind watches; core "bare" is the app alone."""
    from apps import raw_asgi_app, raw_wsgi_app, starlette_app

    from netprof_core import ProfilingConfig, Recorder
    from netprof_core.asgi import NetProfMiddleware as ASGIMiddleware
    from netprof_core.wsgi import NetProfMiddleware as WSGIMiddleware

    recorder = None
    if core != "bare":
        recorder = Recorder(
            ProfilingConfig(segment_dir=tempfile.mkdtemp(), app_name="count"), implementation=core
        )
    if app_name == "httpx":
        run = _httpx_client(recorder)
    elif app_name == "httpx-async":
        run = _async_httpx_client(recorder)
    elif app_name == "wsgi":
        run = _wsgi_server(
            raw_wsgi_app if recorder is None else WSGIMiddleware(raw_wsgi_app, recorder=recorder)
        )
    else:
        app = raw_asgi_app if app_name == "asgi" else starlette_app()
        run = _asgi_server(app if recorder is None else ASGIMiddleware(app, recorder=recorder))
    run(WARMUP)
    # The objects of start-up, frozen out of the collector's reach: otherwise a
    # full collection lands inside one run's window and not the other's, and
    # moves a variant's count by thousands of instructions a request as its
    # start-up grows or shrinks. Young collections, which the requests' own
    # objects bring on, are still counted.
    gc.collect()
    gc.freeze()
    run(requests)


def _instructions(app_name: str, core: str, requests: int) -> int:
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--serve", app_name, core, str(requests),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stderr
    match = re.search(r"Collected : (\d+)", output)
    if match is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{output}")
    return int(match.group(1))


def per_request(app_name: str, core: str) -> int:
    return (_instructions(app_name, core, 2 * N) - _instructions(app_name, core, N)) // N


def main(app_names: list[str]) -> None:
    for app_name in app_names or APPS:
        bare = per_request(app_name, "bare")
        hooked = {core: per_request(app_name, core) for core in CORES}
        print(f"{app_name}: bare {bare} instructions/request; "
              + ", ".join(f"netprof[{core}] +{count - bare}" for core, count in hooked.items()))  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main(sys.argv[1:])
