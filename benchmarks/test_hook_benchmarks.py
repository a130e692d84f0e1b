"""Per-request cost of the ASGI and WSGI hooks, in process: no server, no
socket. Each benchmark serves CALLS requests to one application, bare or behind
one middleware; the applications are in benchmarks/apps.py.

    cd /work/main && PYTHONPATH=. python -m pytest benchmarks/test_hook_benchmarks.py \\
        -q -p no:cacheprovider --benchmark-json=hooks.json

The figures that matter are differences and ratios within one run, per request
(``median`` of a benchmark / CALLS):

    overhead(middleware) = per_request(app behind the middleware) - per_request(bare app)
    ratio                = overhead(OpenTelemetry or prometheus-fastapi-instrumentator)
                           / overhead(netprof)

e.g. overhead(netprof, ASGI) = test_asgi_netprof[cython] - test_asgi_bare, and
the ASGI ratio = (test_asgi_opentelemetry - test_asgi_bare) / that. The raw
applications give the cleanest overheads; on Starlette, FastAPI and Flask the
applications' own 7-50 µs carry more noise than netprof's overhead.

These are hot-cache figures: the same few requests over and over keep the
middleware's code and the recorder's segment in the CPU's caches. In a server,
each request's parsing and I/O evicts them, and the same middleware costs about
three times as much; test_end_to_end.py measures that, as server CPU time per
request.

How the requests are served:

- ASGI: one event loop for the module; each round awaits the application CALLS
  times in one coroutine, with a fresh scope per request (``dict(SCOPE)``, as
  middleware and routers write into it), a ``receive`` that is never needed (GET)
  and a ``send`` that drops the message.
- WSGI: as a server does: call the application with a fresh environ, iterate the
  body, call its ``close()`` when it has one.
- OpenTelemetry: the SDK's ``TracerProvider`` with a ``BatchSpanProcessor``, what a
  production user runs, on an exporter that only counts the spans: the cost a
  request pays is creating, filling and queueing its spans; the export (an OTLP
  exporter's protobuf encoding and network) runs on the processor's own thread,
  off the request's path, so the OpenTelemetry figures are a lower bound. No
  MeterProvider is configured, so its metrics instruments are no-ops.
- prometheus-fastapi-instrumentator: ``Instrumentator(registry=...).instrument(app)``
  with its default metrics, in a registry of its own.
- netprof: ``NetProfMiddleware(app, recorder=...)`` with the default configuration,
  once per recorder core.
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any

import pytest
from apps import (
    PATH,
    TEMPLATE,
    Message,
    Scope,
    fastapi_app,
    flask_app,
    raw_asgi_app,
    raw_wsgi_app,
    starlette_app,
)
from opentelemetry.sdk.trace import TracerProvider
from pytest_benchmark.fixture import BenchmarkFixture
from tracing import CountingExporter, counting_tracer_provider

from netprof_core import Recorder
from netprof_core.asgi import NetProfMiddleware as NetProfASGI
from netprof_core.wsgi import NetProfMiddleware as NetProfWSGI

CALLS = 1000

ASGIApp = Callable[[Scope, Any, Any], Coroutine[Any, Any, None]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
MakeRecorder = Callable[..., Recorder]
Tracing = tuple[TracerProvider, CountingExporter]
Loop = asyncio.AbstractEventLoop

SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": PATH,
    "raw_path": PATH.encode(),
    "root_path": "",
    "query_string": b"",
    "headers": [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"bench/1.0"),
        (b"accept", b"*/*"),
    ],
    "client": ("127.0.0.1", 54321),
    "server": ("127.0.0.1", 8000),
    "state": {},
    "extensions": {},
}

ENVIRON: dict[str, Any] = {
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "PATH_INFO": PATH,
    "QUERY_STRING": "",
    "SERVER_NAME": "127.0.0.1",
    "SERVER_PORT": "8000",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": "127.0.0.1",
    "REMOTE_PORT": "54321",
    "HTTP_HOST": "127.0.0.1:8000",
    "HTTP_USER_AGENT": "bench/1.0",
    "HTTP_ACCEPT": "*/*",
    "wsgi.version": (1, 0),
    "wsgi.url_scheme": "http",
    "wsgi.input": io.BytesIO(b""),  # GET: never read
    "wsgi.errors": sys.stderr,
    "wsgi.multithread": True,
    "wsgi.multiprocess": False,
    "wsgi.run_once": False,
}


# -- serving -------------------------------------------------------------------


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    pass


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return _write


def _write(data: bytes) -> None:
    pass


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def bench_asgi(benchmark: BenchmarkFixture, loop: Loop, app: ASGIApp) -> None:
    _check_asgi(loop, app)

    async def calls() -> None:
        for _ in range(CALLS):
            await app(dict(SCOPE), _receive, _send)

    benchmark(lambda: loop.run_until_complete(calls()))


def bench_wsgi(benchmark: BenchmarkFixture, app: WSGIApp) -> None:
    _check_wsgi(app)

    def calls() -> None:
        for _ in range(CALLS):
            body = app(dict(ENVIRON), _start_response)
            try:
                for _chunk in body:
                    pass
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()

    benchmark(calls)


def _check_asgi(loop: Loop, app: ASGIApp) -> None:
    """One request first: the route must match (a benchmark of 404s would
    measure nothing useful), and lazily built middleware stacks get built."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    loop.run_until_complete(app(dict(SCOPE), _receive, send))
    assert sent[0]["status"] == 200, sent
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"OK", sent


def _check_wsgi(app: WSGIApp) -> None:
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.append(status)
        return _write

    body = app(dict(ENVIRON), start_response)
    try:
        assert b"".join(body) == b"OK"
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    assert statuses == ["200 OK"], statuses


def _assert_recorded(recorder: Recorder, template: str) -> None:
    routes = {route.key.template: route.count for route in recorder.snapshot(records=False).routes}
    assert routes.get(template, 0) > CALLS, routes


# -- the competitors -------------------------------------------------------------


@pytest.fixture
def tracing() -> Iterator[Tracing]:
    provider, exporter = counting_tracer_provider()
    yield provider, exporter
    provider.shutdown()


def _assert_traced(tracing: Tracing) -> None:
    provider, exporter = tracing
    provider.force_flush()
    assert exporter.spans > CALLS, exporter.spans


def otel_asgi(app: Any, provider: TracerProvider) -> Any:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app, tracer_provider=provider)


def otel_wsgi(app: Any, provider: TracerProvider) -> Any:
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app, tracer_provider=provider)


# -- ASGI: the raw application -----------------------------------------------------


def test_asgi_bare(benchmark: BenchmarkFixture, loop: Loop) -> None:
    bench_asgi(benchmark, loop, raw_asgi_app)


def test_asgi_netprof(benchmark: BenchmarkFixture, loop: Loop, make_recorder: MakeRecorder) -> None:
    recorder = make_recorder()
    bench_asgi(benchmark, loop, NetProfASGI(raw_asgi_app, recorder=recorder))
    assert recorder.snapshot(records=False).counters.requests > CALLS


def test_asgi_opentelemetry(benchmark: BenchmarkFixture, loop: Loop, tracing: Tracing) -> None:
    bench_asgi(benchmark, loop, otel_asgi(raw_asgi_app, tracing[0]))
    _assert_traced(tracing)


# -- ASGI: Starlette, a templated route ----------------------------------------------


def test_starlette_bare(benchmark: BenchmarkFixture, loop: Loop) -> None:
    bench_asgi(benchmark, loop, starlette_app())


def test_starlette_netprof(benchmark: BenchmarkFixture, loop: Loop, make_recorder: MakeRecorder) -> None:
    recorder = make_recorder()
    bench_asgi(benchmark, loop, NetProfASGI(starlette_app(), recorder=recorder))
    _assert_recorded(recorder, TEMPLATE)


def test_starlette_opentelemetry(benchmark: BenchmarkFixture, loop: Loop, tracing: Tracing) -> None:
    bench_asgi(benchmark, loop, otel_asgi(starlette_app(), tracing[0]))
    _assert_traced(tracing)


# -- ASGI: FastAPI, where prometheus-fastapi-instrumentator works --------------------


def test_fastapi_bare(benchmark: BenchmarkFixture, loop: Loop) -> None:
    bench_asgi(benchmark, loop, fastapi_app())


def test_fastapi_netprof(benchmark: BenchmarkFixture, loop: Loop, make_recorder: MakeRecorder) -> None:
    recorder = make_recorder()
    bench_asgi(benchmark, loop, NetProfASGI(fastapi_app(), recorder=recorder))
    _assert_recorded(recorder, TEMPLATE)


def test_fastapi_prometheus_instrumentator(benchmark: BenchmarkFixture, loop: Loop) -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_fastapi_instrumentator import Instrumentator

    registry = CollectorRegistry()
    app = fastapi_app()
    Instrumentator(registry=registry).instrument(app)
    bench_asgi(benchmark, loop, app)
    labels = {"handler": TEMPLATE, "method": "GET", "status": "2xx"}
    count = registry.get_sample_value("http_requests_total", labels)
    assert count is not None and count > CALLS, count


# -- WSGI: the raw application -------------------------------------------------------


def test_wsgi_bare(benchmark: BenchmarkFixture) -> None:
    bench_wsgi(benchmark, raw_wsgi_app)


def test_wsgi_netprof(benchmark: BenchmarkFixture, make_recorder: MakeRecorder) -> None:
    recorder = make_recorder()
    bench_wsgi(benchmark, NetProfWSGI(raw_wsgi_app, recorder=recorder))
    assert recorder.snapshot(records=False).counters.requests > CALLS


def test_wsgi_opentelemetry(benchmark: BenchmarkFixture, tracing: Tracing) -> None:
    bench_wsgi(benchmark, otel_wsgi(raw_wsgi_app, tracing[0]))
    _assert_traced(tracing)


# -- WSGI: Flask, a URL rule -----------------------------------------------------------


def test_flask_bare(benchmark: BenchmarkFixture) -> None:
    bench_wsgi(benchmark, flask_app())


def test_flask_netprof(benchmark: BenchmarkFixture, make_recorder: MakeRecorder) -> None:
    recorder = make_recorder()
    app = flask_app()
    app.wsgi_app = NetProfWSGI(app.wsgi_app, recorder=recorder)
    bench_wsgi(benchmark, app)
    _assert_recorded(recorder, "/items/<int:item_id>")


def test_flask_opentelemetry(benchmark: BenchmarkFixture, tracing: Tracing) -> None:
    app = flask_app()
    app.wsgi_app = otel_wsgi(app.wsgi_app, tracing[0])
    bench_wsgi(benchmark, app)
    _assert_traced(tracing)
