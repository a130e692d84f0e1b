"""The WSGI middleware and the Django middleware under a real WSGI server:
wsgiref's, in a background thread of a subprocess (``tests/apps/serve_wsgi.py``)
on 127.0.0.1 and a free port, stopped with SIGTERM; then the segments are read
back and must count exactly what was sent.

- Flask: ``netprof_core.wsgi.NetProfMiddleware(flask_app)``, made before the
  app serves anything: routes are Flask's URL rules.
- Django with ``netprof_core.django.NetProfMiddleware`` in MIDDLEWARE: routes
  are Django's (``/items/<int:item_id>``).
- Django's WSGI application wrapped in ``netprof_core.wsgi.NetProfMiddleware``,
  without the Django middleware: counted, all under one ``<unmatched>`` route
  per method, as ``netprof_core.wsgi`` documents.

Each app runs once per core, and the tests share the run. The same app served
bare must answer byte for byte the same.
"""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest

from netprof_core import ErrorKind
from tests.apps.common import STREAM_CHUNK, STREAM_CHUNKS, STREAM_SLEEP
from tests.apps.servers import (
    REQUEST_TIMEOUT,
    UNMATCHED,
    Captured,
    Req,
    Run,
    RunCache,
    assert_figures,
    assert_one_closed_segment,
    perform,
    serve_and_drive,
    status_classes,
    wsgiref_argv,
)

FLASK = "tests.apps.flask_app:app"
DJANGO = "tests.apps.django_app:application"
FLOOD = 100  # distinct random paths that no route matches


def traffic(routes: dict[str, tuple[str, str] | None]) -> tuple[tuple[Req, ...], tuple[Req, ...]]:
    """(probes, more) for an app whose route for each kind of request is in
    ``routes``; the probes go to the bare app too."""
    items, post, orders, boom, stream, healthz = (
        routes[k] for k in ("items", "post", "orders", "boom", "stream", "healthz")
    )
    probes = (
        Req("GET", "/items/1", items),
        Req("GET", "/items/2", items),
        Req("POST", "/items/3", post, body=b"x" * 100),
        Req("GET", "/users/ann/orders/7", orders),
        Req("GET", "/items/abc", routes["unmatched"]),
        Req("GET", "/no/such/page", routes["unmatched"]),
        Req("GET", "/boom", boom),
        Req("GET", "/stream", stream),
        Req("GET", "/healthz", healthz),
    )
    more = (
        *(Req("GET", f"/items/{i}", items) for i in range(10, 30)),
        Req("GET", "/boom", boom),
        *(Req("GET", "/healthz", healthz) for _ in range(4)),
    )
    return probes, more


FLASK_ROUTES: dict[str, tuple[str, str] | None] = {
    "items": ("GET", "/items/<int:item_id>"),
    "post": ("POST", "/items/<int:item_id>"),
    "orders": ("GET", "/users/<user>/orders/<int:order_id>"),
    "boom": ("GET", "/boom"),
    "stream": ("GET", "/stream"),
    "healthz": None,  # excluded
    "unmatched": ("GET", UNMATCHED),
}
DJANGO_ROUTES: dict[str, tuple[str, str] | None] = {
    "items": ("GET", "/items/<int:item_id>"),
    "post": ("POST", "/items/<int:item_id>"),
    "orders": ("GET", "/users/<str:user>/orders/<int:order_id>"),
    "boom": ("GET", "/boom"),
    "stream": ("GET", "/stream"),
    "healthz": ("GET", "/healthz"),  # the Django middleware has no exclusions
    "unmatched": ("GET", UNMATCHED),
}
# Django's WSGI application in the WSGI middleware, no Django middleware: one
# route per method, and the WSGI middleware's exclusions.
DJANGO_WRAPPED_ROUTES: dict[str, tuple[str, str] | None] = {
    **{key: ("GET", UNMATCHED) for key in DJANGO_ROUTES},
    "post": ("POST", UNMATCHED),
    "healthz": None,
}


def driver(routes: dict[str, tuple[str, str] | None], *, flood: bool = True) -> Any:
    probes, more = traffic(routes)
    flooding = [
        Req("GET", f"/{secrets.token_hex(6)}/{secrets.token_hex(4)}", routes["unmatched"])
        for _ in range(FLOOD)
    ]

    def drive(base_url: str) -> dict[str, Any]:
        with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT) as client:
            done = [(req, perform(client, req)) for req in probes]
            if flood:
                done += [(req, perform(client, req)) for req in (*more, *flooding)]
        return {"probes": done[: len(probes)], "exchanges": done}

    return drive


@pytest.fixture(scope="module")
def runs() -> RunCache:
    return RunCache()


def wsgiref_run(
    runs: RunCache,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    target: str,
    implementation: str,
    routes: dict[str, tuple[str, str] | None],
    *,
    wrap: bool = True,
    django_mode: str = "middleware",
) -> Run:
    return runs.get(
        (name, implementation, wrap),
        lambda: serve_and_drive(
            lambda port: wsgiref_argv(target, port),
            tmp_path_factory.mktemp(f"wsgiref-{name}-{implementation}"),
            implementation=implementation,
            drive=driver(routes, flood=wrap),
            app_name=f"{name}-app",
            wrap=wrap,
            extra_env={"NETPROF_TEST_DJANGO_MODE": django_mode},
        ),
    )


@pytest.fixture
def flask_run(implementation: str, runs: RunCache, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return wsgiref_run(runs, tmp_path_factory, "flask", FLASK, implementation, FLASK_ROUTES)


@pytest.fixture
def django_run(implementation: str, runs: RunCache, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return wsgiref_run(runs, tmp_path_factory, "django", DJANGO, implementation, DJANGO_ROUTES)


@pytest.fixture
def django_wrapped_run(implementation: str, runs: RunCache, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return wsgiref_run(
        runs,
        tmp_path_factory,
        "django-wsgi",
        DJANGO,
        implementation,
        DJANGO_WRAPPED_ROUTES,
        django_mode="wsgi",
    )


def assert_identical_to_bare(run: Run, bare: Run) -> None:
    assert bare.snapshots == []  # netprof stayed out of the bare server
    assert bare.events[0] == ["startup", str(bare.pid)]
    profiled = [(req.method, req.path, response) for req, response in run.result["probes"]]
    unprofiled = [(req.method, req.path, response) for req, response in bare.result["probes"]]
    assert profiled == unprofiled
    assert {response.status for _, _, response in profiled} == {200, 404, 500}


def check_started_and_stopped(run: Run) -> None:
    assert run.returncode == 0, run.log
    assert run.events == [["startup", str(run.pid), run.implementation], ["shutdown", str(run.pid)]]


def exchanged(run: Run, path: str) -> list[Captured]:
    return [response for req, response in run.result["exchanges"] if req.path == path]


# -- Flask --------------------------------------------------------------------------------


def test_flask_exact_counts_per_url_rule(flask_run: Run) -> None:
    check_started_and_stopped(flask_run)
    assert flask_run.counts() == {
        ("GET", "/items/<int:item_id>"): 22,
        ("POST", "/items/<int:item_id>"): 1,
        ("GET", "/users/<user>/orders/<int:order_id>"): 1,
        ("GET", UNMATCHED): 2 + FLOOD,  # /items/abc, /no/such/page and the flood: one route
        ("GET", "/boom"): 2,
        ("GET", "/stream"): 1,
    }
    snapshot = assert_one_closed_segment(flask_run, "flask-app")
    assert len(snapshot.records) == snapshot.counters.requests


def test_flask_statuses_and_bytes_match_what_the_client_saw(flask_run: Run) -> None:
    assert_figures(flask_run, flask_run.result["exchanges"])
    routes = flask_run.routes
    assert status_classes(routes[("GET", UNMATCHED)]) == {"4xx": 2 + FLOOD}
    assert routes[("POST", "/items/<int:item_id>")].bytes_in == 100
    assert routes[("GET", "/stream")].bytes_out == STREAM_CHUNKS * len(STREAM_CHUNK)


def test_flask_view_exception_is_counted_as_an_error(flask_run: Run) -> None:
    assert [r.status for r in exchanged(flask_run, "/boom")] == [500, 500]
    stats = flask_run.routes[("GET", "/boom")]
    assert (stats.count, stats.errors) == (2, 2)
    assert status_classes(stats) == {"5xx": 2}
    # Flask turns the exception into its 500 response: the middleware sees a 500, not an exception.
    assert {key: s.errors for key, s in flask_run.routes.items() if s.errors} == {("GET", "/boom"): 2}
    assert all(record.error for record in flask_run.records("/boom"))


def test_flask_excluded_path_is_not_recorded(flask_run: Run) -> None:
    assert [(r.status, r.body) for r in exchanged(flask_run, "/healthz")] == [(200, b"ok")] * 5
    (snapshot,) = flask_run.snapshots
    assert not [route for route in snapshot.routes if "healthz" in route.key.template]


def test_flask_streamed_response_is_timed_to_its_end(flask_run: Run) -> None:
    (record,) = flask_run.records("/stream")
    assert (record.status, record.error_kind) == (200, ErrorKind.NONE)
    assert record.bytes_out == STREAM_CHUNKS * len(STREAM_CHUNK)
    assert 0 < record.ttfb_ns < record.duration_ns
    # The first chunk goes out before the app's sleeps, the record ends after
    # the last one (a lower bound from the sleeps, not a speed check).
    assert record.duration_ns - record.ttfb_ns >= (STREAM_CHUNKS - 1) * STREAM_SLEEP * 1e9 * 0.9


def test_flask_responses_identical_without_middleware(
    flask_run: Run, runs: RunCache, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bare = wsgiref_run(runs, tmp_path_factory, "flask", FLASK, "python", FLASK_ROUTES, wrap=False)
    assert_identical_to_bare(flask_run, bare)


# -- Django with netprof's Django middleware ------------------------------------------------


def test_django_middleware_exact_counts_per_route(django_run: Run) -> None:
    check_started_and_stopped(django_run)
    assert django_run.counts() == {
        ("GET", "/items/<int:item_id>"): 22,
        ("POST", "/items/<int:item_id>"): 1,
        ("GET", "/users/<str:user>/orders/<int:order_id>"): 1,
        ("GET", UNMATCHED): 2 + FLOOD,
        ("GET", "/boom"): 2,
        ("GET", "/stream"): 1,
        ("GET", "/healthz"): 5,
    }
    assert_one_closed_segment(django_run, "django-app")


def test_django_middleware_statuses_errors_and_bytes(django_run: Run) -> None:
    # The Django middleware counts the bytes of a response it holds whole; a
    # streamed response's body goes out after it has recorded.
    assert_figures(django_run, django_run.result["exchanges"], skip_bytes_out=[("GET", "/stream")])
    routes = django_run.routes
    assert status_classes(routes[("GET", UNMATCHED)]) == {"4xx": 2 + FLOOD}
    assert routes[("POST", "/items/<int:item_id>")].bytes_in == 100
    assert [r.status for r in exchanged(django_run, "/boom")] == [500, 500]
    boom = routes[("GET", "/boom")]
    assert (boom.errors, status_classes(boom)) == (2, {"5xx": 2})
    assert {key: s.errors for key, s in routes.items() if s.errors} == {("GET", "/boom"): 2}


def test_django_middleware_responses_identical_without_netprof(
    django_run: Run, runs: RunCache, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bare = wsgiref_run(runs, tmp_path_factory, "django", DJANGO, "python", DJANGO_ROUTES, wrap=False)
    assert_identical_to_bare(django_run, bare)


# -- Django's WSGI application in the WSGI middleware -----------------------------------------


def test_django_wrapped_in_wsgi_middleware_counts_every_request(django_wrapped_run: Run) -> None:
    """Without the Django middleware the WSGI wrapper has no route to take:
    netprof_core.wsgi promises "one UNMATCHED_ROUTE for all" (per method)."""
    check_started_and_stopped(django_wrapped_run)
    assert django_wrapped_run.counts() == {
        ("GET", UNMATCHED): 22 + 1 + 2 + FLOOD + 2 + 1,  # all but /healthz (excluded) and the POST
        ("POST", UNMATCHED): 1,
    }
    assert_one_closed_segment(django_wrapped_run, "django-wsgi-app")
    # Whole figures, the streamed response's bytes too: the WSGI wrapper sees the body go out.
    assert_figures(django_wrapped_run, django_wrapped_run.result["exchanges"])
    stats = django_wrapped_run.routes[("GET", UNMATCHED)]
    assert status_classes(stats) == {"2xx": 22 + 1 + 1, "4xx": 2 + FLOOD, "5xx": 2}
    assert stats.errors == 2
    (stream,) = [
        r for r in django_wrapped_run.snapshots[0].records if r.bytes_out == STREAM_CHUNKS * len(STREAM_CHUNK)
    ]
    assert 0 < stream.ttfb_ns < stream.duration_ns


def test_django_wrapped_in_wsgi_middleware_responses_identical(
    django_wrapped_run: Run, runs: RunCache, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bare = wsgiref_run(runs, tmp_path_factory, "django", DJANGO, "python", DJANGO_ROUTES, wrap=False)
    assert_identical_to_bare(django_wrapped_run, bare)
