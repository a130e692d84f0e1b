"""The demo shop: a Starlette app with netprof's ASGI middleware, and outbound
calls (httpx, instrumented) to a "payments" service it serves itself.

Its behaviour follows a mode that the demo driver sets with
``POST /_demo/mode?mode=normal|slow|failing`` (excluded from profiling):
``slow`` makes searches and payments slow, ``failing`` makes half of the
checkouts fail.

    uvicorn netprof_core.demo.app:app --port 8000      # NETPROF_CONFIG names the config
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from netprof_core.asgi import NetProfMiddleware
from netprof_core.clients import instrument_httpx_client

MODES = ("normal", "slow", "failing")
_state = {"mode": os.environ.get("NETPROF_DEMO_MODE", "normal")}
_client: httpx.AsyncClient | None = None


async def _pause(normal_ms: float, slow_ms: float) -> None:
    base = slow_ms if _state["mode"] == "slow" else normal_ms
    await asyncio.sleep(random.uniform(0.5, 1.5) * base / 1000)


async def item(request: Request) -> Response:
    await _pause(2, 4)
    return JSONResponse({"id": request.path_params["item_id"], "name": "teapot", "price": 42})


async def search(request: Request) -> Response:
    await _pause(8, 250)
    return JSONResponse({"query": request.query_params.get("q", ""), "results": list(range(10))})


async def checkout(request: Request) -> Response:
    assert _client is not None
    payment = await _client.post(f"{request.base_url}upstream/payments", json={"amount": 42})
    if payment.status_code >= 500:
        return JSONResponse({"error": "payment failed"}, status_code=502)
    return JSONResponse({"order": random.randint(1000, 9999), "paid": True}, status_code=201)


async def payments(request: Request) -> Response:
    await _pause(15, 400)
    if _state["mode"] == "failing" and random.random() < 0.5:
        return JSONResponse({"error": "card declined by the bank's outage"}, status_code=503)
    return JSONResponse({"status": "captured"})


async def set_mode(request: Request) -> Response:
    mode = request.query_params.get("mode", "")
    if mode not in MODES:
        return JSONResponse(
            {"error": f"mode must be one of {', '.join(MODES)}", "parameter": "mode"}, status_code=400
        )
    _state["mode"] = mode
    return JSONResponse({"mode": mode})


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global _client
    _client = instrument_httpx_client(httpx.AsyncClient(timeout=10.0))
    try:
        yield
    finally:
        await _client.aclose()


shop = Starlette(
    routes=[
        Route("/api/items/{item_id:int}", item),
        Route("/api/search", search),
        Route("/api/checkout", checkout, methods=["POST"]),
        Route("/upstream/payments", payments, methods=["POST"]),
        Route("/_demo/mode", set_mode, methods=["POST"]),
        Route("/healthz", healthz),
    ],
    lifespan=lifespan,
)
app = NetProfMiddleware(shop, exclude_paths=[r"^/healthz$", r"^/_demo/"])
