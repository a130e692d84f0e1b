"""The applications the hook benchmarks serve: each as small as its kind allows,
so that what a middleware adds is not lost in the application's own work.

The in-process benchmarks (test_hook_benchmarks.py) build them with the
factories below. The end-to-end benchmark (test_end_to_end.py) has uvicorn
import this module by path and call ``starlette_app`` or ``netprof_starlette_app``
(``uvicorn --factory --app-dir benchmarks apps:netprof_starlette_app``); the
wrapped one records into ``$NETPROF_BENCH_SEGMENT_DIR`` with the core named by
``$NETPROF_BENCH_IMPLEMENTATION`` (the default when unset); it also runs
recording one request in four (``netprof_sampled_starlette_app``) and with
recording switched off (``netprof_off_starlette_app``). Beside it run two
controls, the least ASGI middleware (``passthrough_starlette_app``) and the
least timing middleware written in Python (``send_wrapper_starlette_app``), and
OpenTelemetry's middleware (``opentelemetry_starlette_app``).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BODY = b"OK"
# One templated route: the path a client asks for and the template a hook should report.
PATH = "/items/42"
TEMPLATE = "/items/{item_id}"


async def raw_asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The least an ASGI application can do: a start message and one body."""
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


# Requests the item route answered in this process: the end-to-end benchmark
# checks that netprof recorded each of them once (GET SERVED_PATH tells).
_served = 0
SERVED_PATH = "/served"


async def _item(request: Request) -> PlainTextResponse:
    global _served
    _served += 1
    return PlainTextResponse("OK")


async def _served_count(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(_served))


def starlette_app() -> Starlette:
    return Starlette(routes=[Route(TEMPLATE, _item), Route(SERVED_PATH, _served_count)])


def netprof_starlette_app(**config_keys: Any) -> Any:
    from netprof_core import ProfilingConfig, Recorder
    from netprof_core.asgi import NetProfMiddleware

    config = ProfilingConfig(
        segment_dir=os.environ["NETPROF_BENCH_SEGMENT_DIR"], app_name="bench-e2e", **config_keys
    )
    recorder = Recorder(config, implementation=os.environ.get("NETPROF_BENCH_IMPLEMENTATION") or None)
    return NetProfMiddleware(starlette_app(), recorder=recorder)


def netprof_sampled_starlette_app() -> Any:
    """The middleware recording one request in four (``sample_rate = 0.25``,
    the rollout's first step): the others are left alone as they start."""
    return netprof_starlette_app(sample_rate=0.25)


def netprof_off_starlette_app() -> Any:
    """The middleware with recording switched off (``enabled = false``, as the
    API's disable or an auto-disable leaves it): every request left alone."""
    return netprof_starlette_app(enabled=False)


# -- the controls and the competitor of the end-to-end benchmarks ----------------


def passthrough_starlette_app() -> Any:
    """Control: a middleware that only awaits the application, the one coroutine
    of its own the least ASGI middleware adds."""
    app = starlette_app()

    async def passthrough(scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, send)

    return passthrough


def send_wrapper_starlette_app() -> Any:
    """Control: the least a timing middleware written in Python does, the
    pattern of most of them cut to its bones, a lower bound for them: time the
    request, take the status from a wrapped ``send``, add the time up by
    status. No route, no method, no bytes, no histogram, no segment."""
    import time

    app = starlette_app()
    clock = time.perf_counter_ns
    totals: dict[int, int] = {}

    async def timing(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        start = clock()
        status = 0

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await app(scope, receive, send_noting_status)
        totals[status] = totals.get(status, 0) + clock() - start

    return timing


def opentelemetry_starlette_app() -> Any:
    """OpenTelemetry's ASGI middleware, set up as test_hook_benchmarks.py sets
    it up (tracing.py): the library a user would otherwise pick."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from tracing import counting_tracer_provider

    provider, _ = counting_tracer_provider()
    return OpenTelemetryMiddleware(starlette_app(), tracer_provider=provider)


def compile_bytecode() -> None:
    """Compile netprof's and this module's bytecode where it is stale, as pip
    does when it installs a package. A server that compiles them at start-up
    instead (an editable install under PYTHONDONTWRITEBYTECODE=1) keeps the
    compiler's freed blocks in its heap, and libc's malloc then spends more on
    every request (BENCHMARKS.md has the profile): a cost of the checkout, not
    of netprof. Where the bytecode cannot be written (a read-only checkout),
    says so: the figures then carry that cost."""
    import compileall
    import sys

    root = Path(__file__).resolve().parent
    compiled = compileall.compile_dir(root.parent / "netprof_core", quiet=2)
    for module in ("apps.py", "tracing.py"):
        compiled = compileall.compile_file(root / module, quiet=2) and compiled
    if not compiled:
        print(
            "warning: could not write netprof's bytecode; each server compiles it at start-up,"
            " and the figures include what that costs (apps.compile_bytecode)",
            file=sys.stderr,
        )


def fastapi_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get(TEMPLATE)
    async def item(item_id: int) -> PlainTextResponse:
        return PlainTextResponse("OK")

    return app


def raw_wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The least a WSGI application can do: start_response and a list body."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [BODY]


def flask_app() -> Any:
    """A new app each time: Flask refuses set-up (netprof's before_request)
    once an app has served a request."""
    from flask import Flask

    app = Flask("bench")

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> str:
        return "OK"

    return app
