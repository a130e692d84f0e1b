"""A request the recorder will not record (recording switched off, the
feature flag off, or the request sampled out) is decided as it starts, and
the middleware then leaves it alone: the application gets the server's own
``send``, ``receive`` and ``start_response`` and its response goes back as it
is, so switching netprof off or sampling takes its cost away, not only its
records. Each such request is still counted once, as disabled or sampled out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from netprof_core.asgi import NetProfMiddleware as ASGIMiddleware
from netprof_core.control import SegmentControl
from netprof_core.hooks import RECORDING_ENVIRON_KEY
from netprof_core.reader import segment_paths
from netprof_core.wsgi import NetProfMiddleware as WSGIMiddleware
from tests.apps.servers import REQUEST_TIMEOUT, serve_and_drive, uvicorn_argv, wsgiref_argv

SWITCHES: dict[str, Callable[[Any], None]] = {
    "disabled": lambda control: control.disable(),
    "feature flag off": lambda control: control.set_feature_flag(False),
    "sampled out": lambda control: control.set_sample_rate(0.0),
}


def asgi_scope(path: str = "/x") -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "asgi": {"version": "3.0"},
    }


class Seen:
    """What the application was given, and what it sent."""

    def __init__(self) -> None:
        self.receive: Any = None
        self.send: Any = None
        self.sent: list[dict[str, Any]] = []


def asgi_app(seen: Seen) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.receive, seen.send = receive, send
        await receive()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"made"})

    return app


def serve_asgi(app: Any, seen: Seen) -> tuple[Any, Any]:
    """One request through ``app``; the server's own receive and send."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"abc", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        seen.sent.append(message)

    asyncio.run(app(asgi_scope(), receive, send))
    return receive, send


@pytest.mark.parametrize("switch", SWITCHES)
def test_an_asgi_request_not_to_be_recorded_is_left_alone(make_recorder: Any, switch: str) -> None:
    recorder = make_recorder()
    SWITCHES[switch](recorder.control)
    seen = Seen()
    app = ASGIMiddleware(asgi_app(seen), recorder=recorder)
    for _ in range(3):
        receive, send = serve_asgi(app, seen)
        assert seen.receive is receive and seen.send is send  # the server's own, not wrapped
    assert [m["type"] for m in seen.sent] == ["http.response.start", "http.response.body"] * 3
    counters = recorder.snapshot().counters
    assert counters.requests == 0
    assert (counters.sampled_out if switch == "sampled out" else counters.disabled_calls) == 3


def test_an_asgi_request_is_recorded_again_once_recording_is_back(make_recorder: Any) -> None:
    recorder = make_recorder()
    seen = Seen()
    app = ASGIMiddleware(asgi_app(seen), recorder=recorder)
    recorder.control.disable()
    serve_asgi(app, seen)
    recorder.control.enable()
    receive, send = serve_asgi(app, seen)
    assert seen.send is not send and seen.receive is not receive  # watched again
    snapshot = recorder.snapshot()
    assert (snapshot.counters.requests, snapshot.counters.disabled_calls) == (1, 1)
    (record,) = snapshot.records
    assert (record.status, record.bytes_in, record.bytes_out) == (201, 3, 4)


def test_an_asgi_request_admitted_as_it_started_is_recorded_when_it_ends(make_recorder: Any) -> None:
    """Switched off mid-request: the request already admitted is still
    recorded, once; the next is left alone."""
    recorder = make_recorder()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        recorder.control.disable()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = ASGIMiddleware(app, recorder=recorder)
    serve_asgi(wrapped, Seen())
    serve_asgi(wrapped, Seen())
    counters = recorder.snapshot().counters
    assert (counters.requests, counters.disabled_calls) == (1, 1)


def test_sampling_half_records_about_half_and_counts_the_rest(make_recorder: Any) -> None:
    recorder = make_recorder()
    recorder.control.set_sample_rate(0.5)
    seen = Seen()
    app = ASGIMiddleware(asgi_app(seen), recorder=recorder)
    for _ in range(400):
        serve_asgi(app, seen)
    counters = recorder.snapshot().counters
    assert counters.requests + counters.sampled_out == 400
    assert 120 <= counters.requests <= 280


def wsgi_environ() -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "SERVER_NAME": "t", "SERVER_PORT": "80"}


def generator_body() -> Iterator[bytes]:
    yield b"made"


@pytest.mark.parametrize("switch", SWITCHES)
def test_a_wsgi_request_not_to_be_recorded_is_left_alone(make_recorder: Any, switch: str) -> None:
    recorder = make_recorder()
    SWITCHES[switch](recorder.control)
    given: dict[str, Any] = {}
    body = generator_body()

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        given["start_response"], given["environ"] = start_response, environ
        start_response("201 Created", [])
        return body

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        given["status"] = status

    returned = WSGIMiddleware(app, recorder=recorder)(wsgi_environ(), start_response)
    assert returned is body and given["start_response"] is start_response  # the app's and the server's own
    assert given["status"] == "201 Created" and b"".join(returned) == b"made"
    # A framework adapter beneath (Django's middleware) must not record it instead.
    assert given["environ"][RECORDING_ENVIRON_KEY] is True
    counters = recorder.snapshot().counters
    assert counters.requests == 0
    assert (counters.sampled_out if switch == "sampled out" else counters.disabled_calls) == 1


def test_a_wsgi_request_is_recorded_again_once_recording_is_back(make_recorder: Any) -> None:
    recorder = make_recorder()

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        return generator_body()

    wrapped = WSGIMiddleware(app, recorder=recorder)
    recorder.control.set_feature_flag(False)
    body = wrapped(wsgi_environ(), lambda *args: None)
    b"".join(body)
    body.close()  # type: ignore[attr-defined]
    recorder.control.set_feature_flag(True)
    body = wrapped(wsgi_environ(), lambda *args: None)
    b"".join(body)
    body.close()  # type: ignore[attr-defined]
    snapshot = recorder.snapshot()
    assert (snapshot.counters.requests, snapshot.counters.disabled_calls) == (1, 1)
    (record,) = snapshot.records
    assert (record.status, record.bytes_out) == (200, 4)


# -- on real servers: switched from outside, as netprofd switches them ------------


def drive_through_the_switches(segment_dir: Path, path: str) -> Callable[[str], list[tuple[int, bytes]]]:
    """Sends ``path`` 10 times with recording off, 10 times sampled at 0, 10
    times recording all, switching the server's segment between them as
    netprofd does; returns every (status, body)."""

    def drive(base_url: str) -> list[tuple[int, bytes]]:
        (segment,) = segment_paths(segment_dir)
        answers = []
        with SegmentControl.open(segment) as control:
            switches = [
                control.disable,
                lambda: (control.enable(), control.set_sample_rate(0.0)),
                lambda: control.set_sample_rate(1.0),
            ]
            with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT) as client:
                for switch in switches:
                    switch()
                    for _ in range(10):
                        response = client.get(path)
                        answers.append((response.status_code, response.content))
        return answers

    return drive


@pytest.mark.parametrize(
    ("server", "target", "path", "template"),
    [
        ("uvicorn", "tests.apps.starlette_app:app", "/items/1", "/items/{item_id}"),
        ("wsgiref", "tests.apps.flask_app:app", "/items/1", "/items/<int:item_id>"),
    ],
)
def test_a_server_switched_off_or_sampled_out_answers_the_same_and_counts_each_request(
    implementation: str, tmp_path: Path, server: str, target: str, path: str, template: str
) -> None:
    argv = uvicorn_argv if server == "uvicorn" else wsgiref_argv
    run = serve_and_drive(
        lambda port: argv(target, port),
        tmp_path,
        implementation=implementation,
        drive=drive_through_the_switches(tmp_path / "segments", path),
    )
    answers = run.result
    assert len(answers) == 30 and len(set(answers)) == 1 and answers[0][0] == 200
    (snapshot,) = run.snapshots
    counters = snapshot.counters
    assert (counters.disabled_calls, counters.sampled_out, counters.requests) == (10, 10, 10)
    assert run.counts() == {("GET", template): 10}
