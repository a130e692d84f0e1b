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
from tests.test_hook_edges import http_scope

SWITCHES: dict[str, Callable[[Any], None]] = {
    "disabled": lambda control: control.disable(),
    "feature flag off": lambda control: control.set_feature_flag(False),
    "sampled out": lambda control: control.set_sample_rate(0.0),
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

    asyncio.run(app(http_scope(), receive, send))
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


def test_a_route_seen_only_while_switched_off_takes_no_place_in_the_route_table(make_recorder: Any) -> None:
    recorder = make_recorder()
    seen = Seen()
    app = ASGIMiddleware(asgi_app(seen), recorder=recorder)
    recorder.control.disable()
    serve_asgi(app, seen)
    assert "<unmatched>" not in {route.key.template for route in recorder.snapshot().routes}
    recorder.control.enable()
    serve_asgi(app, seen)
    assert "<unmatched>" in {route.key.template for route in recorder.snapshot().routes}


def test_an_exception_from_an_app_left_alone_reaches_the_server_as_it_is(make_recorder: Any) -> None:
    recorder = make_recorder()
    recorder.control.disable()
    failure = RuntimeError("the app's own")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise failure

    with pytest.raises(RuntimeError) as raised:
        serve_asgi(ASGIMiddleware(app, recorder=recorder), Seen())
    assert raised.value is failure
    counters = recorder.snapshot().counters
    assert (counters.requests, counters.disabled_calls, counters.internal_errors) == (0, 1, 0)


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_the_profilers_own_cost_is_still_timed_one_request_in_64(make_recorder: Any, kind: str) -> None:
    """The token admit() hands out carries the decision to time the update
    (``performance_monitoring``) to the end of the request: requests 0, 64
    and 128 of 130 are timed, as record() times them."""
    recorder = make_recorder(performance_monitoring=True)
    if kind == "asgi":
        app = ASGIMiddleware(asgi_app(Seen()), recorder=recorder)
        for _ in range(130):
            serve_asgi(app, Seen())
    else:
        wrapped = WSGIMiddleware(lambda environ, start: (start("200 OK", []), [b"ok"])[1], recorder=recorder)
        for _ in range(130):
            wrapped(wsgi_environ(), lambda *args: None)
    counters = recorder.snapshot().counters
    assert (counters.requests, counters.overhead_count) == (130, 3)


def test_record_admitted_takes_what_admit_returned_and_nothing_else(make_recorder: Any) -> None:
    recorder = make_recorder(performance_monitoring=False)
    route = recorder.route_id("/t", "GET")
    recorder.record_admitted(0, route, 200, 1, 2)  # not admitted: nothing recorded
    recorder.record_admitted(None, route, 200, 1, 2)
    token = recorder.admit()
    assert token
    recorder.record_admitted(token, route, 200, 1, 2)
    recorder.record_admitted(True, route, 200, 1, 2)  # any true token records, untimed
    counters = recorder.snapshot().counters
    assert (counters.requests, counters.internal_errors, counters.overhead_count) == (2, 0, 0)


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


def test_a_wsgi_request_admitted_as_it_started_is_recorded_when_it_is_closed(make_recorder: Any) -> None:
    recorder = make_recorder()

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        return generator_body()

    wrapped = WSGIMiddleware(app, recorder=recorder)
    body = wrapped(wsgi_environ(), lambda *args: None)
    recorder.control.disable()  # while the body is still being sent
    b"".join(body)
    body.close()  # type: ignore[attr-defined]
    counters = recorder.snapshot().counters
    assert (counters.requests, counters.disabled_calls) == (1, 0)


def test_an_exception_from_a_wsgi_app_left_alone_reaches_the_server_as_it_is(make_recorder: Any) -> None:
    recorder = make_recorder()
    recorder.control.set_sample_rate(0.0)
    failure = ValueError("the app's own")

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise failure

    with pytest.raises(ValueError) as raised:
        WSGIMiddleware(app, recorder=recorder)(wsgi_environ(), lambda *args: None)
    assert raised.value is failure
    counters = recorder.snapshot().counters
    assert (counters.requests, counters.sampled_out, counters.internal_errors) == (0, 1, 0)


def test_an_excluded_wsgi_path_is_not_recorded_by_a_framework_hook_beneath(make_recorder: Any) -> None:
    """A Django middleware beneath the WSGI one records only what the WSGI one
    does not see: an excluded path is neither's to record."""
    recorder = make_recorder()
    given: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        given.update(environ)
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = WSGIMiddleware(app, recorder=recorder, exclude_paths=[r"^/healthz$"])
    wrapped({**wsgi_environ(), "PATH_INFO": "/healthz"}, lambda *args: None)
    assert given[RECORDING_ENVIRON_KEY] is True
    counters = recorder.snapshot().counters
    assert (counters.requests, counters.disabled_calls, counters.sampled_out) == (0, 0, 0)


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
