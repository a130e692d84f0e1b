"""Pre-forking: gunicorn with two workers, each profiled into its own segment.

(a) UvicornWorker serving the Starlette app (ASGI middleware); (b) sync
workers serving the Flask app (WSGI middleware). Several client threads send
N requests, each on a new connection so that both workers serve some;
gunicorn is stopped with SIGTERM; then at least two worker processes must
have recorded requests, and the totals over all segments must be exactly the
requests sent, per route. (The master may have a segment with no requests.)
"""

from __future__ import annotations

import importlib.util
import secrets
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.apps.servers import (
    REQUEST_TIMEOUT,
    UNMATCHED,
    Run,
    RunCache,
    gunicorn_argv,
    serve_and_drive,
)

REQUESTS = 400
CLIENT_THREADS = 8
WORKERS = 2


def uvicorn_worker_class() -> str | None:
    """uvicorn's own gunicorn worker, or the uvicorn-worker package's; None if neither."""
    if importlib.util.find_spec("uvicorn.workers") is not None:
        return "uvicorn.workers.UvicornWorker"
    if importlib.util.find_spec("uvicorn_worker") is not None:
        return "uvicorn_worker.UvicornWorker"
    return None


def plan(items: tuple[str, str], orders: tuple[str, str]) -> list[tuple[str, tuple[str, str], int]]:
    """(path, route, expected status) for each of the REQUESTS requests."""
    requests = []
    for i in range(REQUESTS):
        if i % 10 == 0:
            requests.append((f"/users/u{i}/orders/{i}", orders, 200))
        elif i % 10 == 1:
            requests.append((f"/{secrets.token_hex(6)}", ("GET", UNMATCHED), 404))
        else:
            requests.append((f"/items/{i}", items, 200))
    return requests


def driver(requests: list[tuple[str, tuple[str, str], int]]) -> Any:
    def drive(base_url: str) -> Counter[tuple[tuple[str, str], int]]:
        def client(share: list[tuple[str, tuple[str, str], int]]) -> Counter[tuple[tuple[str, str], int]]:
            seen: Counter[tuple[tuple[str, str], int]] = Counter()
            # A new connection per request: each goes to whichever worker accepts it.
            with httpx.Client(
                base_url=base_url, timeout=REQUEST_TIMEOUT, headers={"connection": "close"}
            ) as http:
                for path, route, _ in share:
                    seen[(route, http.get(path).status_code)] += 1
            return seen

        shares = [requests[i::CLIENT_THREADS] for i in range(CLIENT_THREADS)]
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            return sum(pool.map(client, shares), Counter())

    return drive


@pytest.fixture(scope="module")
def runs() -> RunCache:
    return RunCache()


ASGI_ITEMS = ("GET", "/items/{item_id}")
ASGI_ORDERS = ("GET", "/users/{user_id}/orders/{order_id}")
WSGI_ITEMS = ("GET", "/items/<int:item_id>")
WSGI_ORDERS = ("GET", "/users/<user>/orders/<int:order_id>")


@pytest.fixture
def uvicorn_workers_run(implementation: str, runs: RunCache, tmp_path_factory: pytest.TempPathFactory) -> Run:
    worker_class = uvicorn_worker_class()
    if worker_class is None:
        pytest.skip("no gunicorn worker for uvicorn: neither uvicorn.workers nor the uvicorn-worker package")
    requests = plan(ASGI_ITEMS, ASGI_ORDERS)
    return runs.get(
        ("uvicorn-workers", implementation),
        lambda: serve_and_drive(
            lambda port: gunicorn_argv(
                "tests.apps.starlette_app:app", port, workers=WORKERS, worker_class=worker_class
            ),
            tmp_path_factory.mktemp(f"gunicorn-uvicorn-{implementation}"),
            implementation=implementation,
            drive=driver(requests),
            app_name="gunicorn-asgi",
            workers=WORKERS,
        ),
    )


@pytest.fixture
def sync_workers_run(implementation: str, runs: RunCache, tmp_path_factory: pytest.TempPathFactory) -> Run:
    requests = plan(WSGI_ITEMS, WSGI_ORDERS)
    return runs.get(
        ("sync-workers", implementation),
        lambda: serve_and_drive(
            lambda port: gunicorn_argv(
                "tests.apps.flask_app:app", port, workers=WORKERS, worker_class="sync"
            ),
            tmp_path_factory.mktemp(f"gunicorn-sync-{implementation}"),
            implementation=implementation,
            drive=driver(requests),
            app_name="gunicorn-wsgi",
            workers=WORKERS,
        ),
    )


def check_per_worker_segments(
    run: Run, items: tuple[str, str], orders: tuple[str, str], app_name: str
) -> None:
    # Every request was answered as planned.
    answered: Counter[tuple[tuple[str, str], int]] = run.result
    assert sum(answered.values()) == REQUESTS
    assert all(
        (route == ("GET", UNMATCHED)) == (status == 404) and status in (200, 404)
        for (route, status), n in answered.items()
    ), answered
    assert run.returncode == 0, run.log

    # Each worker loaded the app after the fork, with the core asked for, and ended.
    workers = {int(event[1]) for event in run.events if event[0] == "startup"}
    assert len(workers) == WORKERS and run.pid not in workers
    assert all(event[2] == run.implementation for event in run.events if event[0] == "startup")
    assert {int(event[1]) for event in run.events if event[0] == "shutdown"} == workers

    # One segment per process, each its own; the workers' hold the requests.
    pids = [snapshot.header.pid for snapshot in run.snapshots]
    assert len(pids) == len(set(pids))
    assert {snapshot.app_name for snapshot in run.snapshots} == {app_name}
    busy = {snapshot.header.pid for snapshot in run.snapshots if snapshot.counters.requests}
    assert len(busy) >= 2, f"only {busy} recorded requests: both workers should have served some"
    assert busy <= workers
    for snapshot in run.snapshots:
        assert snapshot.counters.internal_errors == 0
        assert snapshot.counters.requests == sum(route.count for route in snapshot.routes)

    # The totals over all segments are exactly what was sent, per route.
    sent: Counter[tuple[str, str]] = Counter()
    for (route, _), n in answered.items():
        sent[route] += n
    assert sent == {items: 320, orders: 40, ("GET", UNMATCHED): 40}
    assert run.counts() == dict(sent)
    assert sum(snapshot.counters.requests for snapshot in run.snapshots) == REQUESTS
    routes = run.routes
    assert routes[("GET", UNMATCHED)].status_classes[4] == 40
    assert routes[items].status_classes[2] == 320
    assert sum(stats.errors for stats in routes.values()) == 0


def test_uvicorn_workers_each_record_into_their_own_segment(uvicorn_workers_run: Run) -> None:
    check_per_worker_segments(uvicorn_workers_run, ASGI_ITEMS, ASGI_ORDERS, "gunicorn-asgi")


def test_uvicorn_workers_segments_read_as_final(uvicorn_workers_run: Run) -> None:
    # The workers die by the SIGTERM uvicorn re-raises (atexit never runs):
    # unclosed, but the reader knows they are final.
    busy = [snapshot for snapshot in uvicorn_workers_run.snapshots if snapshot.counters.requests]
    assert busy and all(snapshot.source == "final" and snapshot.complete for snapshot in busy)


def test_sync_workers_each_record_into_their_own_segment(sync_workers_run: Run) -> None:
    check_per_worker_segments(sync_workers_run, WSGI_ITEMS, WSGI_ORDERS, "gunicorn-wsgi")
    # A sync worker leaves through sys.exit: atexit marks its segment closed.
    busy = [snapshot for snapshot in sync_workers_run.snapshots if snapshot.counters.requests]
    assert all(snapshot.header.closed and snapshot.source == "final" for snapshot in busy)
