"""Per-request cost of the outbound httpx hook, in process: no server, no socket.

An ``httpx.Client`` sends its requests to ``httpx.MockTransport`` (httpx's own
in-memory transport, answering like a small JSON API), bare or instrumented
with ``instrument_httpx_client``, which wraps that transport. Each benchmark
makes CALLS requests, so a median divided by CALLS is the time per request
(``benchmarks/report.py`` does that division):

    cd /work/main && PYTHONPATH=. python -m pytest benchmarks/test_client_benchmarks.py \\
        -q -p no:cacheprovider --benchmark-json=clients.json

    overhead per request = test_httpx_instrumented[core] - test_httpx_bare   (goal: <= 2 µs, Cython)

The bare figure is httpx itself (tens of µs a request: building the request,
the URL, cookies, the response); the difference is what netprof adds: the
timing, the route lookup, reading Content-Length and one ``record()``. The
difference is small beside httpx's own time, so compare the two figures of one
run only, and expect a µs or so of noise on a shared machine.

The transport benchmarks measure the hook alone, without that noise: CALLS
requests built beforehand (each with its own parsed URL, as httpx makes one per
request) go straight to a transport that answers each with one prepared
response, bare or wrapped by the hook:

    overhead per request = test_httpx_transport_instrumented[core] - test_httpx_transport_bare
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from netprof_core.clients import instrument_httpx_client

CALLS = 1000
ROUNDS = 200
URL = "http://api.example.com:8080/items/42"
BODY = b'{"id": 42, "name": "widget"}'
HEADERS = {"content-type": "application/json", "server": "uvicorn", "date": "Thu, 26 Nov 2026 10:00:00 GMT"}


def handler(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=BODY, headers=HEADERS)


def send_requests(client: httpx.Client) -> None:
    for _ in range(CALLS):
        client.get(URL)


@pytest.mark.benchmark(min_rounds=20)
def test_httpx_bare(benchmark) -> None:
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        benchmark(send_requests, client)


@pytest.mark.benchmark(min_rounds=20)
def test_httpx_instrumented(benchmark, make_recorder) -> None:
    recorder = make_recorder()
    with instrument_httpx_client(httpx.Client(transport=httpx.MockTransport(handler)), recorder) as client:
        benchmark(send_requests, client)
    counters = recorder.snapshot(records=False).counters
    assert counters.requests >= CALLS and counters.internal_errors == 0


class PreparedTransport(httpx.BaseTransport):
    """Answers every request with the same response: the least a transport can do."""

    def __init__(self) -> None:
        self.response = handler(httpx.Request("GET", URL))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.response


def handle_requests(transport: httpx.BaseTransport, requests: list[httpx.Request]) -> None:
    handle = transport.handle_request
    for request in requests:
        handle(request)


def with_new_requests(transport: Any) -> Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]:
    """pedantic's setup: each round gets CALLS requests it has not seen."""
    return lambda: ((transport, [httpx.Request("GET", URL) for _ in range(CALLS)]), {})


def test_httpx_transport_bare(benchmark) -> None:
    benchmark.pedantic(handle_requests, setup=with_new_requests(PreparedTransport()), rounds=ROUNDS)


def test_httpx_transport_instrumented(benchmark, make_recorder) -> None:
    recorder = make_recorder()
    client = instrument_httpx_client(httpx.Client(transport=PreparedTransport()), recorder)
    hooked = client._transport  # the hook's wrapper around PreparedTransport
    benchmark.pedantic(handle_requests, setup=with_new_requests(hooked), rounds=ROUNDS)
    counters = recorder.snapshot(records=False).counters
    assert counters.requests == ROUNDS * CALLS and counters.internal_errors == 0


class PreparedAsyncTransport(httpx.AsyncBaseTransport):
    """PreparedTransport for httpx.AsyncClient: a coroutine that returns at once."""

    def __init__(self) -> None:
        self.response = handler(httpx.Request("GET", URL))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return self.response


def handle_async_requests(transport: httpx.AsyncBaseTransport, requests: list[httpx.Request]) -> None:
    async def awaited() -> None:
        handle = transport.handle_async_request
        for request in requests:
            await handle(request)

    # Driven by hand, not by an event loop: the transport never suspends,
    # and a loop's own cost per round would be most of the figure.
    coroutine = awaited()
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise RuntimeError("the prepared transport suspended")


def test_httpx_async_transport_bare(benchmark) -> None:
    benchmark.pedantic(
        handle_async_requests, setup=with_new_requests(PreparedAsyncTransport()), rounds=ROUNDS
    )


def test_httpx_async_transport_instrumented(benchmark, make_recorder) -> None:
    recorder = make_recorder()
    client = instrument_httpx_client(httpx.AsyncClient(transport=PreparedAsyncTransport()), recorder)
    hooked = client._transport
    benchmark.pedantic(handle_async_requests, setup=with_new_requests(hooked), rounds=ROUNDS)
    counters = recorder.snapshot(records=False).counters
    assert counters.requests == ROUNDS * CALLS and counters.internal_errors == 0
