"""The outbound client hooks against a real server: uvicorn serving a small
Starlette app on 127.0.0.1, started by this module and stopped after it. Each
test drives real httpx (sync and async), requests and aiohttp clients, once per
recorder core, and reads the recorder's segment back.

Failures are real too: a port that was bound and closed (connection refused),
a route slower than the client's timeout, a host under ``.invalid`` (which
never resolves).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import pytest
import requests
import requests.adapters
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from netprof_core import Direction, ErrorKind, Recorder, RequestRecord, RouteKey, RouteStats
from netprof_core.clients import (
    aiohttp_trace_config,
    error_kind_of,
    instrument,
    instrument_httpx_client,
    instrument_requests_session,
    uninstrument,
)

OK_BODY = b"hello from the netprof test server"
CLIENT_TIMEOUT = 5.0
SHORT_TIMEOUT = 0.3  # for the slow route, which answers only after SLOW_SECONDS
SLOW_SECONDS = 10.0
DNS_HOST = "netprof-test.invalid"

# -- the server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalServer:
    port: int

    @property
    def host(self) -> str:
        """The route template the hooks give its requests."""
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def make_app(stopping: threading.Event) -> Starlette:
    async def ok(request: Request) -> Response:
        return PlainTextResponse(OK_BODY.decode(), headers={"x-netprof-test": "yes"})

    async def unavailable(request: Request) -> Response:
        return PlainTextResponse("try again later", status_code=503, headers={"retry-after": "1"})

    async def slow(request: Request) -> Response:
        deadline = time.monotonic() + SLOW_SECONDS
        while time.monotonic() < deadline and not stopping.is_set():
            await asyncio.sleep(0.02)
        return PlainTextResponse("too late")

    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    return Starlette(
        routes=[
            Route("/ok", ok),
            Route("/unavailable", unavailable),
            Route("/slow", slow),
            Route("/echo", echo, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    stopping = threading.Event()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(make_app(stopping), log_level="warning", access_log=False, lifespan="off")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield LocalServer(sock.getsockname()[1])
    finally:
        stopping.set()
        uv.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def refused_url() -> str:
    """A port that was bound and closed again: nothing listens there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# -- the clients, as an application would use them -----------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]  # lower-cased, without the date


def reply(status: int, body: bytes, headers: Any) -> Reply:
    kept = sorted((name.lower(), value) for name, value in headers.items() if name.lower() != "date")
    return Reply(status, body, tuple(kept))


Fetch = Callable[..., Reply]
# The keyword arguments of the client's own per-client hook; None for a plain client.
OptIn = dict[str, Any] | None


def fetch_httpx(
    method: str, url: str, *, timeout: float = CLIENT_TIMEOUT, body: bytes | None = None, opt_in: OptIn = None
) -> Reply:
    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        if opt_in is not None:
            instrument_httpx_client(client, **opt_in)
        response = client.request(method, url, content=body)
        return reply(response.status_code, response.content, response.headers)


def fetch_httpx_async(
    method: str, url: str, *, timeout: float = CLIENT_TIMEOUT, body: bytes | None = None, opt_in: OptIn = None
) -> Reply:
    async def fetch() -> Reply:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client:
            if opt_in is not None:
                instrument_httpx_client(client, **opt_in)
            response = await client.request(method, url, content=body)
            return reply(response.status_code, response.content, response.headers)

    return asyncio.run(fetch())


def fetch_requests(
    method: str, url: str, *, timeout: float = CLIENT_TIMEOUT, body: bytes | None = None, opt_in: OptIn = None
) -> Reply:
    with requests.Session() as session:
        if opt_in is not None:
            instrument_requests_session(session, **opt_in)
        response = session.request(method, url, data=body, timeout=timeout)
        return reply(response.status_code, response.content, response.headers)


def fetch_aiohttp(
    method: str, url: str, *, timeout: float = CLIENT_TIMEOUT, body: bytes | None = None, opt_in: OptIn = None
) -> Reply:
    async def fetch() -> Reply:
        trace_configs = [aiohttp_trace_config(**opt_in)] if opt_in is not None else None
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        session = aiohttp.ClientSession(timeout=client_timeout, trace_configs=trace_configs)
        async with session, session.request(method, url, data=body) as response:
            return reply(response.status, await response.read(), response.headers)

    return asyncio.run(fetch())


CLIENTS = {
    "httpx": fetch_httpx,
    "httpx-async": fetch_httpx_async,
    "requests": fetch_requests,
    "aiohttp": fetch_aiohttp,
}

PATCHED = (
    (httpx.HTTPTransport, "handle_request"),
    (httpx.AsyncHTTPTransport, "handle_async_request"),
    (requests.adapters.HTTPAdapter, "send"),
    (aiohttp.ClientSession, "__init__"),
)


@pytest.fixture(params=list(CLIENTS))
def fetch(request: pytest.FixtureRequest) -> Fetch:
    return CLIENTS[request.param]


@contextmanager
def instrumented(recorder: Recorder, **kwargs: Any) -> Iterator[Recorder]:
    instrument(recorder, **kwargs)
    try:
        yield recorder
    finally:
        uninstrument()


@pytest.fixture
def recorder(make_recorder: Callable[..., Recorder]) -> Iterator[Recorder]:
    """A recorder of the parametrised core, with every client library instrumented."""
    with instrumented(make_recorder()) as recorder:
        yield recorder
    assert recorder.snapshot().counters.internal_errors == 0


def route_of(recorder: Recorder, template: str, method: str = "GET") -> RouteStats | None:
    key = RouteKey(Direction.OUTBOUND, method, template)
    return next((route for route in recorder.snapshot().routes if route.key == key), None)


def records_of(recorder: Recorder, template: str, method: str = "GET") -> list[RequestRecord]:
    key = RouteKey(Direction.OUTBOUND, method, template)
    return [record for record in recorder.snapshot().records if record.route == key]


def failing_url(failure: str, server: LocalServer, refused_url: str) -> tuple[str, str]:
    """The URL of a failure, and the route template the hooks give it."""
    if failure == "refused":
        return refused_url, urlsplit(refused_url).netloc
    if failure == "timeout":
        return server.url("/slow"), server.host
    return f"http://{DNS_HOST}/", DNS_HOST


FAILURES = {
    "refused": ErrorKind.CONNECTION_REFUSED,
    "timeout": ErrorKind.TIMEOUT,
    "dns": ErrorKind.DNS,
}


def exception_chain(exc: BaseException) -> list[type[BaseException]]:
    chain: list[type[BaseException]] = []
    link: BaseException | None = exc
    while link is not None and len(chain) < 20:
        chain.append(type(link))
        link = link.__cause__ if link.__cause__ is not None else link.__context__
    return chain


# -- what a request leaves in the segment ------------------------------------------------------


def test_a_response_is_recorded_on_its_host(recorder: Recorder, fetch: Fetch, server: LocalServer) -> None:
    answer = fetch("GET", server.url("/ok"))

    assert (answer.status, answer.body) == (200, OK_BODY)
    route = route_of(recorder, server.host)
    assert route is not None
    assert route.key.direction == Direction.OUTBOUND
    assert (route.count, route.errors, route.status_classes[2]) == (1, 0, 1)
    assert route.bytes_in == len(OK_BODY)  # from the Content-Length header
    [record] = records_of(recorder, server.host)
    assert (record.status, record.error_kind) == (200, ErrorKind.NONE)
    assert record.duration_ns > 0


def test_a_server_error_is_an_error_of_no_kind(recorder: Recorder, fetch: Fetch, server: LocalServer) -> None:
    assert fetch("GET", server.url("/unavailable")).status == 503

    route = route_of(recorder, server.host)
    assert route is not None
    assert (route.count, route.errors, route.status_classes[5]) == (1, 1, 1)
    assert sum(route.error_kinds) == 0
    [record] = records_of(recorder, server.host)
    assert record.status == 503 and record.error


def test_the_request_body_is_counted(recorder: Recorder, fetch: Fetch, server: LocalServer) -> None:
    body = b"x" * 1000
    assert fetch("POST", server.url("/echo"), body=body).body == body

    route = route_of(recorder, server.host, "POST")
    assert route is not None
    assert (route.bytes_out, route.bytes_in) == (len(body), len(body))


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failure_is_counted_with_its_kind_and_raised_unchanged(
    make_recorder: Callable[..., Recorder], fetch: Fetch, server: LocalServer, refused_url: str, failure: str
) -> None:
    url, host = failing_url(failure, server, refused_url)
    with pytest.raises(Exception) as bare:
        fetch("GET", url, timeout=SHORT_TIMEOUT)

    with instrumented(make_recorder()) as recorder, pytest.raises(Exception) as hooked:
        fetch("GET", url, timeout=SHORT_TIMEOUT)

    assert exception_chain(hooked.value) == exception_chain(bare.value)
    assert recorder.snapshot().counters.internal_errors == 0
    route = route_of(recorder, host)
    assert route is not None
    assert (route.count, route.errors, route.status_classes[0]) == (1, 1, 1)
    assert route.error_kinds[FAILURES[failure]] == 1
    [record] = records_of(recorder, host)
    assert (record.status, record.error_kind) == (0, FAILURES[failure])
    assert record.duration_ns > 0


def test_responses_are_the_same_with_and_without_the_hook(
    make_recorder: Callable[..., Recorder], fetch: Fetch, server: LocalServer
) -> None:
    def exchange() -> list[Reply]:
        return [
            fetch("GET", server.url("/ok")),
            fetch("GET", server.url("/unavailable")),
            fetch("POST", server.url("/echo"), body=b"\x00\xffbytes"),
            fetch("GET", server.url("/missing")),
        ]

    bare = exchange()
    with instrumented(make_recorder()) as recorder:
        hooked = exchange()

    assert hooked == bare
    assert recorder.snapshot().counters.requests == len(bare)


# -- turning the hooks on and off ---------------------------------------------------------------


def test_uninstrument_restores_the_originals_and_stops_recording(
    make_recorder: Callable[..., Recorder], fetch: Fetch, server: LocalServer
) -> None:
    originals = [owner.__dict__[name] for owner, name in PATCHED]
    recorder = make_recorder()
    with instrumented(recorder):
        assert [owner.__dict__[name] for owner, name in PATCHED] != originals
        fetch("GET", server.url("/ok"))

    assert all(owner.__dict__[name] is original for (owner, name), original in zip(PATCHED, originals))
    fetch("GET", server.url("/ok"))
    assert recorder.snapshot().counters.requests == 1


def test_instrument_twice_records_once_into_the_latest_recorder(
    make_recorder: Callable[..., Recorder], fetch: Fetch, server: LocalServer
) -> None:
    first, second = make_recorder(), make_recorder()
    instrument(first)
    try:
        with instrumented(second):
            fetch("GET", server.url("/ok"))
    finally:
        uninstrument()

    assert first.snapshot().counters.requests == 0
    route = route_of(second, server.host)
    assert route is not None and route.count == 1


def test_a_client_opted_in_alone_is_the_only_one_recorded(
    make_recorder: Callable[..., Recorder], fetch: Fetch, server: LocalServer
) -> None:
    recorder = make_recorder()
    fetch("GET", server.url("/ok"), opt_in={"recorder": recorder})
    fetch("GET", server.url("/ok"))
    fetch("GET", server.url("/unavailable"), opt_in={"recorder": recorder})

    route = route_of(recorder, server.host)
    assert route is not None
    assert (route.count, route.status_classes[2], route.status_classes[5]) == (2, 1, 1)


def test_a_client_opted_in_and_instrument_together_record_once(
    make_recorder: Callable[..., Recorder], fetch: Fetch, server: LocalServer
) -> None:
    """The client's own hook wins over instrument()'s."""
    everywhere, own = make_recorder(), make_recorder()
    with instrumented(everywhere):
        fetch("GET", server.url("/ok"), opt_in={"recorder": own})
        fetch("GET", server.url("/ok"))

    assert own.snapshot().counters.requests == 1
    assert everywhere.snapshot().counters.requests == 1


def test_a_client_opted_in_reports_its_failures(
    make_recorder: Callable[..., Recorder], fetch: Fetch, refused_url: str
) -> None:
    recorder = make_recorder()
    with pytest.raises(Exception) as raised:
        fetch("GET", refused_url, opt_in={"recorder": recorder})

    assert error_kind_of(raised.value) == ErrorKind.CONNECTION_REFUSED
    route = route_of(recorder, urlsplit(refused_url).netloc)
    assert route is not None and route.error_kinds[ErrorKind.CONNECTION_REFUSED] == 1


# -- routes and run-time settings --------------------------------------------------------------


def test_a_path_template_is_appended_to_the_host(
    make_recorder: Callable[..., Recorder], fetch: Fetch, server: LocalServer
) -> None:
    def first_segment(url: str) -> str:
        return "/" + urlsplit(url).path.split("/")[1] + "/{rest}"

    with instrumented(make_recorder(), path_template=first_segment) as recorder:
        fetch("GET", server.url("/ok"))
        fetch("GET", server.url("/ok/more"))

    route = route_of(recorder, server.host + "/ok/{rest}")
    assert route is not None
    assert (route.count, route.status_classes[2], route.status_classes[4]) == (2, 1, 1)


def test_each_hop_of_a_redirect_is_a_request(recorder: Recorder, fetch: Fetch, server: LocalServer) -> None:
    assert fetch("GET", server.url("/ok/")).body == OK_BODY  # Starlette redirects to /ok

    assert [record.status for record in records_of(recorder, server.host)] == [307, 200]


def test_a_failing_path_template_never_reaches_the_application(
    make_recorder: Callable[..., Recorder], fetch: Fetch, server: LocalServer
) -> None:
    def broken(url: str) -> str:
        raise LookupError("a bug in the path template")

    with instrumented(make_recorder(), path_template=broken) as recorder:
        answer = fetch("GET", server.url("/ok"))

    assert (answer.status, answer.body) == (200, OK_BODY)
    counters = recorder.snapshot().counters
    assert (counters.requests, counters.internal_errors) == (0, 1)


def test_the_sample_rate_is_honoured(
    make_recorder: Callable[..., Recorder], fetch: Fetch, server: LocalServer
) -> None:
    with instrumented(make_recorder(sample_rate=0.0)) as recorder:
        fetch("GET", server.url("/ok"))

    counters = recorder.snapshot().counters
    assert (counters.requests, counters.sampled_out) == (0, 1)


def test_disabling_at_run_time_is_honoured(recorder: Recorder, fetch: Fetch, server: LocalServer) -> None:
    recorder.control.disable()
    fetch("GET", server.url("/ok"))
    recorder.control.enable()
    fetch("GET", server.url("/ok"))

    counters = recorder.snapshot().counters
    assert (counters.requests, counters.disabled_calls) == (1, 1)


# -- error kinds --------------------------------------------------------------------------------


def raised(make: Callable[[], BaseException], cause: BaseException | None = None) -> BaseException:
    try:
        if cause is None:
            raise make()
        raise make() from cause
    except BaseException as exc:  # noqa: BLE001  (the exception just raised, whatever its class)
        return exc


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (raised(ValueError), ErrorKind.EXCEPTION),
        (raised(TimeoutError), ErrorKind.TIMEOUT),
        (raised(lambda: RuntimeError("wrapped"), ConnectionRefusedError()), ErrorKind.CONNECTION_REFUSED),
        (raised(lambda: OSError("lookup"), socket.gaierror(socket.EAI_NONAME, "unknown")), ErrorKind.DNS),
        (raised(ConnectionResetError), ErrorKind.CONNECTION),
        (raised(lambda: httpx.ConnectError("x"), ConnectionRefusedError()), ErrorKind.CONNECTION_REFUSED),
        (raised(lambda: httpx.ReadTimeout("x")), ErrorKind.TIMEOUT),
        (raised(requests.ConnectionError), ErrorKind.CONNECTION),
    ],
    ids=["plain", "timeout", "refused", "dns", "reset", "httpx-refused", "httpx-timeout", "requests"],
)
def test_error_kind_of(exc: BaseException, kind: ErrorKind) -> None:
    assert error_kind_of(exc) == kind


def test_error_kind_of_a_cycle_ends() -> None:
    outer, inner = ValueError("outer"), KeyError("inner")
    outer.__context__, inner.__context__ = inner, outer
    assert error_kind_of(outer) == ErrorKind.EXCEPTION


# -- what only one client has -------------------------------------------------------------------


def test_an_httpx_client_with_mounts_is_instrumented_through_them(
    make_recorder: Callable[..., Recorder], server: LocalServer
) -> None:
    recorder = make_recorder()
    mounts = {"http://127.0.0.1": httpx.HTTPTransport()}
    with instrument_httpx_client(httpx.Client(mounts=mounts), recorder) as client:
        assert client.get(server.url("/ok")).content == OK_BODY

    route = route_of(recorder, server.host)
    assert route is not None and route.count == 1


def test_an_httpx_client_instrumented_twice_records_once(
    make_recorder: Callable[..., Recorder], server: LocalServer
) -> None:
    first, second = make_recorder(), make_recorder()
    with httpx.Client() as client:
        instrument_httpx_client(client, first)
        instrument_httpx_client(client, second)
        client.get(server.url("/ok"))

    assert first.snapshot().counters.requests == 0
    assert second.snapshot().counters.requests == 1


@pytest.mark.c_extension
def test_an_httpx_client_instrumented_again_with_the_other_core_records_once(
    segment_dir: Any, server: LocalServer
) -> None:
    from netprof_core import ProfilingConfig

    config = ProfilingConfig(segment_dir=str(segment_dir), app_name="test-app")
    first, second = Recorder(config, implementation="python"), Recorder(config, implementation="cython")
    try:
        with httpx.Client() as client:
            instrument_httpx_client(client, first)
            instrument_httpx_client(client, second)
            client.get(server.url("/ok"))
        assert first.snapshot().counters.requests == 0
        assert second.snapshot().counters.requests == 1
    finally:
        first.close()
        second.close()


def test_aiohttp_raise_for_status_keeps_the_status(recorder: Recorder, server: LocalServer) -> None:
    async def fetch() -> None:
        async with aiohttp.ClientSession(raise_for_status=True) as session:
            await session.get(server.url("/unavailable"))

    with pytest.raises(aiohttp.ClientResponseError):
        asyncio.run(fetch())

    [record] = records_of(recorder, server.host)
    assert (record.status, record.error_kind) == (503, ErrorKind.EXCEPTION)


def test_aiohttp_sessions_keep_their_own_trace_configs(recorder: Recorder, server: LocalServer) -> None:
    seen: list[int] = []

    async def on_request_end(session: Any, ctx: Any, params: aiohttp.TraceRequestEndParams) -> None:
        seen.append(params.response.status)

    own = aiohttp.TraceConfig()
    own.on_request_end.append(on_request_end)

    async def fetch() -> None:
        async with aiohttp.ClientSession(trace_configs=[own]) as session, session.get(server.url("/ok")):
            pass

    asyncio.run(fetch())
    assert seen == [200]
    assert recorder.snapshot().counters.requests == 1
