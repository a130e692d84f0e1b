"""The ASGI middleware under a real server: uvicorn, started by the tests on
127.0.0.1 and a free port, serving a Starlette and a FastAPI app wrapped in
``netprof_core.asgi.NetProfMiddleware``, driven by httpx, stopped with SIGTERM;
then the segments are read back and must count exactly what was sent.

Each app runs once per core (``implementation``; "python" sets
NETPROF_NO_EXTENSIONS=1 in the server's environment) and the tests share the
run. The same app served bare on another port must answer byte for byte the same.
"""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from netprof_core import ErrorKind, Recorder
from netprof_core.asgi import NetProfMiddleware
from tests.apps.common import SLOW_STREAM_CHUNKS, STREAM_CHUNK, STREAM_CHUNKS, STREAM_SLEEP
from tests.apps.servers import (
    REQUEST_TIMEOUT,
    UNMATCHED,
    Captured,
    Req,
    Run,
    RunCache,
    assert_figures,
    error_kinds,
    perform,
    serve_and_drive,
    status_classes,
    uvicorn_argv,
)

STARLETTE = "tests.apps.starlette_app:app"
FASTAPI = "tests.apps.fastapi_app:app"

ITEMS = ("GET", "/items/{item_id}")
FLOOD = 300  # distinct random paths that no route matches

# -- the Starlette app's traffic ---------------------------------------------------

# Sent to the profiled and to the bare server alike: the responses must be identical.
STARLETTE_PROBES = (
    Req("GET", "/items/1", ITEMS),
    Req("GET", "/items/2", ITEMS),
    Req("POST", "/items/3", ("POST", "/items/{item_id}"), body=b"x" * 100),
    Req("GET", "/users/ann/orders/7", ("GET", "/users/{user_id}/orders/{order_id}")),
    Req("GET", "/items/abc", ("GET", UNMATCHED)),  # the int convertor does not match
    Req("GET", "/no/such/page", ("GET", UNMATCHED)),
    Req("GET", "/boom", ("GET", "/boom"), close=True),
    Req("GET", "/stream", ("GET", "/stream")),
    Req("GET", "/healthz", None),  # excluded
)
STARLETTE_MORE = (
    *(Req("GET", f"/items/{i}", ITEMS) for i in range(10, 30)),
    Req("GET", "/boom", ("GET", "/boom"), close=True),
    *(Req("GET", "/healthz", None) for _ in range(4)),
)


def flood() -> list[Req]:
    return [
        Req("GET", f"/{secrets.token_hex(6)}/{secrets.token_hex(4)}", ("GET", UNMATCHED))
        for _ in range(FLOOD)
    ]


def drive_starlette(base_url: str) -> dict[str, Any]:
    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT) as client:
        probes = [(req, perform(client, req)) for req in STARLETTE_PROBES]
        more = [(req, perform(client, req)) for req in (*STARLETTE_MORE, *flood())]
    # A client that leaves in the middle of a streamed response.
    with (
        httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT) as client,
        client.stream("GET", "/slow-stream") as response,
    ):
        first = next(response.iter_raw())
        disconnect_status = response.status_code
    return {"probes": probes, "exchanges": probes + more, "disconnect": (disconnect_status, len(first))}


def drive_probes(probes: tuple[Req, ...]) -> Any:
    def drive(base_url: str) -> list[tuple[Req, Captured]]:
        with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT) as client:
            return [(req, perform(client, req)) for req in probes]

    return drive


# -- the FastAPI app's traffic -----------------------------------------------------

FASTAPI_PROBES = (
    Req("GET", "/items/1", ITEMS),
    Req("GET", "/items/2", ITEMS),
    Req("GET", "/items/abc", ITEMS),  # matched, then refused by validation: 422
    Req("POST", "/items/5/notes", ("POST", "/items/{item_id}/notes"), json={"text": "hello, netprof"}),
    Req("POST", "/items/5/notes", ("POST", "/items/{item_id}/notes"), json={"wrong": 1}),  # 422
    Req("GET", "/users/u1/orders/3", ("GET", "/users/{user_id}/orders/{order_id}")),  # a sync endpoint
    Req("GET", "/boom", ("GET", "/boom"), close=True),
    Req("GET", "/nope", ("GET", UNMATCHED)),
    Req("GET", "/healthz", None),
)
FASTAPI_MORE = (
    *(Req("GET", f"/items/{i}", ITEMS) for i in range(100, 120)),
    *(Req("GET", "/healthz", None) for _ in range(3)),
)


def drive_fastapi(base_url: str) -> dict[str, Any]:
    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT) as client:
        probes = [(req, perform(client, req)) for req in FASTAPI_PROBES]
        more = [(req, perform(client, req)) for req in (*FASTAPI_MORE, *flood()[:100])]
    return {"probes": probes, "exchanges": probes + more}


# -- runs, shared by the tests of this module ----------------------------------------


@pytest.fixture(scope="module")
def runs() -> RunCache:
    return RunCache()


@pytest.fixture
def starlette_run(implementation: str, runs: RunCache, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return runs.get(
        ("starlette", implementation),
        lambda: serve_and_drive(
            lambda port: uvicorn_argv(STARLETTE, port),
            tmp_path_factory.mktemp(f"uvicorn-starlette-{implementation}"),
            implementation=implementation,
            drive=drive_starlette,
            app_name="starlette-app",
        ),
    )


@pytest.fixture
def fastapi_run(implementation: str, runs: RunCache, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return runs.get(
        ("fastapi", implementation),
        lambda: serve_and_drive(
            lambda port: uvicorn_argv(FASTAPI, port),
            tmp_path_factory.mktemp(f"uvicorn-fastapi-{implementation}"),
            implementation=implementation,
            drive=drive_fastapi,
            app_name="fastapi-app",
        ),
    )


def bare_run(
    runs: RunCache, tmp_path_factory: pytest.TempPathFactory, target: str, probes: tuple[Req, ...]
) -> Run:
    """The same app without netprof (NETPROF_TEST_WRAP=0), given the probes."""
    return runs.get(
        ("bare", target),
        lambda: serve_and_drive(
            lambda port: uvicorn_argv(target, port),
            tmp_path_factory.mktemp("uvicorn-bare"),
            implementation="python",
            drive=drive_probes(probes),
            wrap=False,
        ),
    )


def check_lifespan(run: Run) -> None:
    assert run.returncode in (0, -signal.SIGTERM), run.log
    assert "Application startup complete" in run.log
    assert run.events == [["startup", str(run.pid), run.implementation], ["shutdown", str(run.pid)]]


def check_one_segment(run: Run, app_name: str) -> None:
    assert [(s.header.pid, s.app_name) for s in run.snapshots] == [(run.pid, app_name)]
    snapshot = run.snapshots[0]
    assert snapshot.counters.internal_errors == 0
    assert snapshot.counters.overflowed_routes == 0
    assert snapshot.counters.requests == sum(run.counts().values())


# -- Starlette ------------------------------------------------------------------------


def test_starlette_lifespan_runs_and_server_starts(starlette_run: Run) -> None:
    check_lifespan(starlette_run)


def test_starlette_exact_counts_per_templated_route(starlette_run: Run) -> None:
    assert starlette_run.counts() == {
        ("GET", "/items/{item_id}"): 22,  # /items/1, /items/2, /items/10 ... /items/29: one route
        ("POST", "/items/{item_id}"): 1,
        ("GET", "/users/{user_id}/orders/{order_id}"): 1,
        ("GET", UNMATCHED): 2 + FLOOD,
        ("GET", "/boom"): 2,
        ("GET", "/stream"): 1,
        ("GET", "/slow-stream"): 1,
    }
    check_one_segment(starlette_run, "starlette-app")


def test_starlette_statuses_and_bytes_match_what_the_client_saw(starlette_run: Run) -> None:
    exchanges = starlette_run.result["exchanges"]
    assert_figures(starlette_run, exchanges)
    routes = starlette_run.routes
    assert status_classes(routes[ITEMS]) == {"2xx": 22}
    assert status_classes(routes[("GET", UNMATCHED)]) == {"4xx": 2 + FLOOD}
    assert routes[("POST", "/items/{item_id}")].bytes_in == 100
    assert routes[("GET", "/stream")].bytes_out == STREAM_CHUNKS * len(STREAM_CHUNK)
    # Only the failures are errors.
    assert {key: stats.errors for key, stats in routes.items() if stats.errors} == {
        ("GET", "/boom"): 2,
        ("GET", "/slow-stream"): 1,
    }


def test_starlette_exception_is_a_500_and_an_exception_error(starlette_run: Run) -> None:
    boom = [response for req, response in starlette_run.result["exchanges"] if req.path == "/boom"]
    assert [(r.status, r.body) for r in boom] == [
        (500, b"Internal Server Error")
    ] * 2  # the client still gets its 500
    stats = starlette_run.routes[("GET", "/boom")]
    assert status_classes(stats) == {"5xx": 2}
    assert error_kinds(stats) == {"EXCEPTION": 2}
    records = starlette_run.records("/boom")
    assert [(r.status, r.error_kind, r.error) for r in records] == [(500, ErrorKind.EXCEPTION, True)] * 2


def test_starlette_streaming_response_is_timed_to_its_end(starlette_run: Run) -> None:
    (record,) = starlette_run.records("/stream")
    assert record.status == 200
    assert record.error_kind == ErrorKind.NONE
    assert record.bytes_out == STREAM_CHUNKS * len(STREAM_CHUNK)
    assert 0 < record.ttfb_ns < record.duration_ns
    # The first chunk goes out before the app's sleeps; the record ends after
    # the last: its duration covers the whole stream (a lower bound, from the sleeps).
    assert record.duration_ns - record.ttfb_ns >= (STREAM_CHUNKS - 1) * STREAM_SLEEP * 1e9 * 0.9


def test_starlette_client_disconnect_mid_stream_is_counted(starlette_run: Run) -> None:
    status, received = starlette_run.result["disconnect"]
    assert (status, received) == (200, len(STREAM_CHUNK))
    stats = starlette_run.routes[("GET", "/slow-stream")]
    assert stats.count == 1
    assert stats.errors == 1
    assert error_kinds(stats) == {"CLIENT_DISCONNECT": 1}
    (record,) = starlette_run.records("/slow-stream")
    assert record.error_kind == ErrorKind.CLIENT_DISCONNECT
    assert record.status == 200
    # It stopped early: some of the stream went out, not all of it.
    assert len(STREAM_CHUNK) <= record.bytes_out < SLOW_STREAM_CHUNKS * len(STREAM_CHUNK)


def test_starlette_404_flood_stays_one_route(starlette_run: Run) -> None:
    (snapshot,) = starlette_run.snapshots
    templates = {route.key.template for route in snapshot.routes}
    assert templates == {
        "<other>",  # the overflow route, always there, unused
        "/items/{item_id}",
        "/users/{user_id}/orders/{order_id}",
        UNMATCHED,
        "/boom",
        "/stream",
        "/slow-stream",
    }
    assert snapshot.counters.overflowed_routes == 0
    assert starlette_run.routes[("GET", UNMATCHED)].count == 2 + FLOOD


def test_starlette_excluded_path_is_not_recorded(starlette_run: Run) -> None:
    healthz = [response for req, response in starlette_run.result["exchanges"] if req.path == "/healthz"]
    assert [(r.status, r.body) for r in healthz] == [(200, b"ok")] * 5
    (snapshot,) = starlette_run.snapshots
    assert not [route for route in snapshot.routes if "healthz" in route.key.template]
    assert not [record for record in snapshot.records if "healthz" in record.route.template]


def test_starlette_records_in_the_ring(starlette_run: Run) -> None:
    (snapshot,) = starlette_run.snapshots
    assert len(snapshot.records) == snapshot.counters.requests  # fewer than max_stored_requests
    assert [r.index for r in snapshot.records] == list(range(snapshot.counters.requests))


def test_starlette_segment_read_as_final_after_sigterm(starlette_run: Run) -> None:
    # uvicorn re-raises SIGTERM after its graceful shutdown, so atexit never
    # runs and the segment stays unclosed: the reader still knows it is final.
    (snapshot,) = starlette_run.snapshots
    assert snapshot.source == "final" and snapshot.complete


def test_starlette_responses_identical_without_middleware(
    starlette_run: Run, runs: RunCache, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bare = bare_run(runs, tmp_path_factory, STARLETTE, STARLETTE_PROBES)
    assert bare.snapshots == []  # netprof stayed out of the bare server
    profiled = [(req.method, req.path, response) for req, response in starlette_run.result["probes"]]
    unprofiled = [(req.method, req.path, response) for req, response in bare.result]
    assert profiled == unprofiled
    assert {response.status for _, _, response in profiled} == {200, 404, 500}


# -- FastAPI ----------------------------------------------------------------------------


def test_fastapi_lifespan_runs_and_server_starts(fastapi_run: Run) -> None:
    check_lifespan(fastapi_run)


def test_fastapi_exact_counts_statuses_and_bytes(fastapi_run: Run) -> None:
    assert fastapi_run.counts() == {
        ("GET", "/items/{item_id}"): 23,
        ("POST", "/items/{item_id}/notes"): 2,
        ("GET", "/users/{user_id}/orders/{order_id}"): 1,
        ("GET", "/boom"): 1,
        ("GET", UNMATCHED): 101,
    }
    check_one_segment(fastapi_run, "fastapi-app")
    assert_figures(fastapi_run, fastapi_run.result["exchanges"])
    routes = fastapi_run.routes
    assert status_classes(routes[ITEMS]) == {"2xx": 22, "4xx": 1}  # /items/abc: 422 on the route
    assert status_classes(routes[("POST", "/items/{item_id}/notes")]) == {"2xx": 1, "4xx": 1}
    assert routes[("POST", "/items/{item_id}/notes")].bytes_in > 0
    assert status_classes(routes[("GET", UNMATCHED)]) == {"4xx": 101}
    assert not [route for route in fastapi_run.snapshots[0].routes if "healthz" in route.key.template]


def test_fastapi_exception_is_a_500_and_an_exception_error(fastapi_run: Run) -> None:
    stats = fastapi_run.routes[("GET", "/boom")]
    assert (stats.count, stats.errors) == (1, 1)
    assert status_classes(stats) == {"5xx": 1}
    assert error_kinds(stats) == {"EXCEPTION": 1}
    assert {key: s.errors for key, s in fastapi_run.routes.items() if s.errors} == {("GET", "/boom"): 1}


def test_fastapi_responses_identical_without_middleware(
    fastapi_run: Run, runs: RunCache, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bare = bare_run(runs, tmp_path_factory, FASTAPI, FASTAPI_PROBES)
    assert bare.snapshots == []
    profiled = [(req.method, req.path, response) for req, response in fastapi_run.result["probes"]]
    unprofiled = [(req.method, req.path, response) for req, response in bare.result]
    assert profiled == unprofiled
    assert {response.status for _, _, response in profiled} == {200, 404, 422, 500}


# -- websockets --------------------------------------------------------------------------


def drive_websocket(base_url: str) -> dict[str, Any]:
    from websockets.exceptions import ConnectionClosedOK
    from websockets.sync.client import connect

    replies = []
    with connect(base_url.replace("http://", "ws://") + "/ws", open_timeout=10, close_timeout=5) as ws:
        for text in ("hello", "netprof"):
            ws.send(text)
            replies.append(ws.recv(timeout=10))
        ws.send("bye")
        with pytest.raises(ConnectionClosedOK):  # the server closes
            ws.recv(timeout=10)
    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT) as client:
        status = client.get("/items/1").status_code
    return {"replies": replies, "status": status}


def test_websocket_passes_through_untouched_on_uvicorn(implementation: str, tmp_path: Path) -> None:
    if importlib.util.find_spec("websockets") is None:
        pytest.skip("the websockets package is not installed: uvicorn cannot serve websockets")
    run = serve_and_drive(
        lambda port: uvicorn_argv(STARLETTE, port, "--ws", "websockets"),
        tmp_path,
        implementation=implementation,
        drive=drive_websocket,
        app_name="starlette-ws",
    )
    assert run.result == {"replies": ["echo: hello", "echo: netprof"], "status": 200}
    assert run.counts() == {ITEMS: 1}  # the websocket was not recorded
    assert not [r for s in run.snapshots for r in s.routes if r.key.template == "/ws"]


def test_websocket_and_lifespan_scopes_reach_the_app_as_they_are(make_recorder: Any) -> None:
    """In process, without a server (the real-server test needs the websockets
    package): a websocket or lifespan scope reaches the app with the very
    scope, receive and send it came with, and nothing is recorded."""
    recorder: Recorder = make_recorder()
    seen: list[tuple[object, object, object]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        pass

    middleware = NetProfMiddleware(app, recorder=recorder)
    scopes = [{"type": "websocket", "path": "/ws", "headers": []}, {"type": "lifespan"}]
    for scope in scopes:
        asyncio.run(middleware(scope, receive, send))
    assert len(seen) == 2
    for (got_scope, got_receive, got_send), scope in zip(seen, scopes):
        assert got_scope is scope and got_receive is receive and got_send is send
    snapshot = recorder.snapshot()
    assert snapshot.counters.requests == 0
    assert [route.key.template for route in snapshot.routes] == ["<other>"]
