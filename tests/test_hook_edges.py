"""The hooks in process, at their edges: what a client sends, what an app
returns or raises, must neither disturb the app nor the profile."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from flask import Flask

from netprof_core import ErrorKind
from netprof_core.asgi import NetProfMiddleware as ASGIMiddleware
from netprof_core.wsgi import NetProfMiddleware as WSGIMiddleware


def call_wsgi(app: Any, method: str = "GET", path: str = "/x", **environ: str) -> tuple[str, Any]:
    seen: list[str] = []
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "SERVER_NAME": "t", "SERVER_PORT": "80",
           "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1", "QUERY_STRING": "", **environ}
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
            scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "root_path": root,
                     "query_string": b"", "headers": [], "scheme": "http", "server": ("t", 80)}
            await wrapped(scope, receive, send)

    asyncio.run(main())
    routes = {r.key.template: r.count for r in recorder.snapshot().routes if r.count}
    assert routes == {"/v1/items/{item_id}": 2, "/v2/items/{item_id}": 1}
