"""The hooks in process, at their edges: what a client sends, what an app
returns or raises, must neither disturb the app nor the profile."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from flask import Flask

from netprof_core import ErrorKind
from netprof_core.asgi import NetProfMiddleware as ASGIMiddleware
from netprof_core.wsgi import NetProfMiddleware as WSGIMiddleware


def call_wsgi(app: Any, method: str = "GET", path: str = "/x", **environ: str) -> tuple[str, Any]:
    seen: list[str] = []
    env = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SERVER_NAME": "t",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "QUERY_STRING": "",
        **environ,
    }
    body = app(env, lambda status, headers, exc_info=None: seen.append(status))
    b"".join(body)
    getattr(body, "close", lambda: None)()
    return seen[0], body


def list_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def test_a_malformed_content_length_is_not_netprofs_error(make_recorder) -> None:
    recorder = make_recorder()
    app = WSGIMiddleware(list_app, recorder=recorder)
    for bad in ("abc", "-1", "1e3"):
        call_wsgi(app, "POST", CONTENT_LENGTH=bad)
    counters = recorder.snapshot().counters
    assert (counters.requests, counters.internal_errors, counters.disabled_calls) == (3, 0, 0)


def test_a_list_body_goes_back_to_the_server_as_it_is(make_recorder) -> None:
    recorder = make_recorder()
    body = ["the", "list"]

    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return body  # type: ignore[return-value]

    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    assert WSGIMiddleware(app, recorder=recorder)(env, lambda *a: None) is body
    (record,) = recorder.snapshot().records
    assert (record.status, record.bytes_out) == (200, 7)


def test_invented_methods_share_one_route(make_recorder) -> None:
    recorder = make_recorder()
    app = WSGIMiddleware(list_app, recorder=recorder)
    for i in range(50):
        call_wsgi(app, f"SCAN{i}", f"/nothing/{i}")
    routes = {(r.key.method, r.key.template): r.count for r in recorder.snapshot().routes if r.count}
    assert routes == {("OTHER", "<unmatched>"): 50}


def test_an_apps_own_oserror_is_an_exception_not_a_disconnect(make_recorder) -> None:
    recorder = make_recorder()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise FileNotFoundError("the file it was streaming")

    async def main() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: Any) -> None:
            pass

        scope = {"type": "http", "method": "GET", "path": "/file", "headers": []}
        with pytest.raises(FileNotFoundError):
            await ASGIMiddleware(app, recorder=recorder)(scope, receive, send)

    asyncio.run(main())
    (record,) = recorder.snapshot().records
    assert record.error_kind == ErrorKind.EXCEPTION


def test_flask_route_is_known_when_a_before_request_answers_early(make_recorder) -> None:
    recorder = make_recorder()
    flask_app = Flask("edges")

    @flask_app.before_request
    def refuse() -> tuple[str, int]:
        return "no", 401

    @flask_app.route("/items/<int:item_id>")
    def item(item_id: int) -> str:  # pragma: no cover - refused before it runs
        return "never"

    app = WSGIMiddleware(flask_app, recorder=recorder)
    status, _ = call_wsgi(app, "GET", "/items/7")

    assert status.startswith("401")
    (record,) = recorder.snapshot().records
    assert (record.route.template, record.status) == ("/items/<int:item_id>", 401)


def test_routes_under_a_starlette_mount_keep_the_mount_prefix(make_recorder) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def item(request: Any) -> PlainTextResponse:
        return PlainTextResponse("x")

    inner = [Route("/items/{item_id}", item)]
    app = Starlette(routes=[Mount("/v1", routes=inner), Mount("/v2", routes=inner)])
    recorder = make_recorder()
    wrapped = ASGIMiddleware(app, recorder=recorder)

    async def main() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: Any) -> None:
            pass

        for root, path in [("", "/v1/items/1"), ("", "/v2/items/2"), ("/api", "/api/v1/items/3")]:
            await wrapped(http_scope(path, root), receive, send)

    asyncio.run(main())
    routes = {r.key.template: r.count for r in recorder.snapshot().routes if r.count}
    assert routes == {"/v1/items/{item_id}": 2, "/v2/items/{item_id}": 1}


async def empty_receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def quiet_send(message: Any) -> None:
    pass


def http_scope(path: str = "/x", root_path: str = "") -> dict[str, Any]:
    """The scope of one GET of ``path``, as a server would make it."""
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [],
        "scheme": "http",
        "server": ("t", 80),
        "asgi": {"version": "3.0", "spec_version": "2.4"},
    }


def run_asgi(app: Any, send: Any = None, path: str = "/x") -> None:
    """One GET through ``app``, as a server would call it."""
    asyncio.run(app(http_scope(path), empty_receive, send or quiet_send))


def test_servers_see_an_asgi3_application(make_recorder) -> None:
    import inspect

    from uvicorn.config import Config

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called
        pass

    wrapped = ASGIMiddleware(app, recorder=make_recorder())
    # uvicorn and hypercorn tell ASGI 3 from ASGI 2 by these; as ASGI 2 the app would break.
    assert asyncio.iscoroutinefunction(wrapped.__call__) and inspect.iscoroutinefunction(wrapped.__call__)
    config = Config(wrapped)
    config.load()
    assert config.interface == "asgi3"


def test_a_background_task_is_not_the_clients_wait(make_recorder) -> None:
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    ran: list[bool] = []

    async def send_the_newsletter() -> None:
        await asyncio.sleep(0.3)
        ran.append(True)

    async def subscribe(request: Any) -> PlainTextResponse:
        return PlainTextResponse("subscribed", background=BackgroundTask(send_the_newsletter))

    recorder = make_recorder()
    run_asgi(
        ASGIMiddleware(Starlette(routes=[Route("/subscribe", subscribe)]), recorder=recorder),
        path="/subscribe",
    )
    (record,) = recorder.snapshot().records
    assert ran == [True]
    assert (record.route.template, record.status, record.bytes_out) == ("/subscribe", 200, len("subscribed"))
    # The response went out before the task's 0.3 s: the request ended there.
    assert record.duration_ns < 250_000_000
    assert 0 < record.ttfb_ns <= record.duration_ns


class ClientDisconnected(OSError):
    """uvicorn's and hypercorn's name for it."""


class PeerGone(OSError):
    """An ASGI 2.4 server's own OSError, named as it likes."""


@pytest.mark.parametrize("gone", [ConnectionResetError, BrokenPipeError, ClientDisconnected, PeerGone])
def test_a_send_that_fails_because_the_client_left_is_a_disconnect(make_recorder, gone: type) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body":
            raise gone("the client went away")

    recorder = make_recorder()
    with pytest.raises(gone):
        run_asgi(ASGIMiddleware(app, recorder=recorder), send)
    (record,) = recorder.snapshot().records
    assert (record.status, record.error_kind) == (200, ErrorKind.CLIENT_DISCONNECT)


def test_an_apps_own_connection_error_is_an_exception(make_recorder) -> None:
    """The app's database refusing a connection is not the client leaving."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ConnectionRefusedError("the database refused the connection")

    recorder = make_recorder()
    with pytest.raises(ConnectionRefusedError):
        run_asgi(ASGIMiddleware(app, recorder=recorder))
    (record,) = recorder.snapshot().records
    assert record.error_kind == ErrorKind.EXCEPTION


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups are Python 3.11+")
def test_a_disconnect_inside_a_task_group_is_a_disconnect(make_recorder) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})

        async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
            group.create_task(stream())

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body":
            raise ClientDisconnected()

    recorder = make_recorder()
    with pytest.raises(BaseException) as raised:
        run_asgi(ASGIMiddleware(app, recorder=recorder), send)
    assert type(raised.value).__name__ == "ExceptionGroup"
    (record,) = recorder.snapshot().records
    assert record.error_kind == ErrorKind.CLIENT_DISCONNECT


def test_a_response_with_trailers_ends_with_them(make_recorder) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"data"})
        await asyncio.sleep(0.05)  # computing the checksum
        await send({"type": "http.response.trailers", "headers": [(b"checksum", b"abc")]})

    recorder = make_recorder()
    run_asgi(ASGIMiddleware(app, recorder=recorder))
    (record,) = recorder.snapshot().records
    assert (record.status, record.bytes_out, record.error_kind) == (200, 4, ErrorKind.NONE)
    assert record.duration_ns >= 50_000_000


def test_the_app_gets_coroutine_functions(make_recorder) -> None:
    """``send`` and ``receive`` look like the server's: asgiref's
    async_to_sync (Django Channels) asks."""
    seen: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.extend(asyncio.iscoroutinefunction(f) for f in (send, receive))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body"})

    run_asgi(ASGIMiddleware(app, recorder=make_recorder()))
    assert seen == [True, True]


def test_a_template_that_is_a_str_subclass_is_a_template(make_recorder) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    class Template(str):
        pass

    async def item(request: Any) -> PlainTextResponse:
        return PlainTextResponse("x")

    route = Route("/items/{item_id}", item)
    route.path_format = Template(route.path_format)
    recorder = make_recorder()
    run_asgi(ASGIMiddleware(Starlette(routes=[route]), recorder=recorder), path="/items/3")
    (record,) = recorder.snapshot().records
    assert (record.route.template, record.status) == ("/items/{item_id}", 200)


@pytest.mark.parametrize(
    ("header", "recorded"),
    [
        ("0", 0),
        ("28", 28),
        ("000123", 123),
        ("9" * 18, 10**18 - 1),
        ("9" * 19, 10**19 - 1),
        ("12a", 0),
        ("-1", 0),
        ("", 0),
        ("\u0663", 0),  # a digit to str.isdigit, not to a server
    ],
)
def test_the_httpx_hook_reads_a_responses_content_length(make_recorder, header, recorded) -> None:
    import httpx

    from netprof_core.clients import instrument_httpx_client

    def handler(request: httpx.Request) -> httpx.Response:
        raw = [(b"content-length", header.encode())]
        return httpx.Response(200, headers=raw, stream=httpx.ByteStream(b""))

    recorder = make_recorder()
    with instrument_httpx_client(httpx.Client(transport=httpx.MockTransport(handler)), recorder) as client:
        client.get("http://upstream.example/x")
    (record,) = recorder.snapshot().records
    assert record.bytes_in == recorded


def test_a_content_length_no_c_integer_holds_is_still_recorded(make_recorder) -> None:
    """A server answering Content-Length 2**64 - 1 (a -1 cast to unsigned):
    recorded, not an error of netprof's, which would switch recording off."""
    import httpx

    from netprof_core.clients import instrument_httpx_client

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=[("content-length", str(2**64 - 1))], stream=httpx.ByteStream(b""))

    recorder = make_recorder()
    with instrument_httpx_client(httpx.Client(transport=httpx.MockTransport(handler)), recorder) as client:
        for _ in range(10):
            client.get("http://upstream.example/x")
    snapshot = recorder.snapshot()
    assert (snapshot.counters.requests, snapshot.counters.internal_errors) == (10, 0)
    assert {record.bytes_in for record in snapshot.records} == {2**64 - 1}


def test_a_request_whose_task_is_destroyed_is_recorded_once(make_recorder) -> None:
    """A server's task destroyed with its loop while the app waits: the
    request is still recorded, once, as an exception."""
    import gc

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(10)

    recorder = make_recorder()
    wrapped = ASGIMiddleware(app, recorder=recorder)
    scope = {"type": "http", "method": "GET", "path": "/x", "root_path": "", "headers": []}
    loop = asyncio.new_event_loop()
    task = loop.create_task(wrapped(scope, empty_receive, quiet_send))
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    del task
    gc.collect()
    (record,) = recorder.snapshot().records
    assert record.error_kind == ErrorKind.EXCEPTION


def test_a_request_leaves_no_garbage_for_the_collector(make_recorder) -> None:
    """Under load every request's objects are young; one that only the cycle
    collector can free would make each collection longer, for every request."""
    import gc

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["state"]["send"] = send  # a reference back to the middleware's own objects
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"hello"}

    async def send(message: Any) -> None:
        pass

    recorder = make_recorder()
    wrapped = ASGIMiddleware(app, recorder=recorder)
    scope = {"type": "http", "method": "GET", "path": "/x", "root_path": "", "headers": []}

    async def main() -> int:
        await wrapped({**scope, "state": {}}, receive, send)  # the first request interns the route
        gc.collect()
        gc.disable()
        try:
            for _ in range(100):
                await wrapped({**scope, "state": {}}, receive, send)
            return gc.collect()
        finally:
            gc.enable()

    assert asyncio.run(main()) == 0
    assert recorder.snapshot().counters.requests == 101
