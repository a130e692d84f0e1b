"""A Starlette app for the uvicorn and gunicorn tests.

``app`` is wrapped in netprof's ASGI middleware unless NETPROF_TEST_WRAP=0;
``/healthz`` is excluded from profiling.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from netprof_core.asgi import NetProfMiddleware

from .common import (
    EXCLUDE_PATHS,
    SLOW_STREAM_CHUNKS,
    SLOW_STREAM_SLEEP,
    STREAM_CHUNK,
    STREAM_CHUNKS,
    STREAM_SLEEP,
    note_event,
    wrapped,
)


async def item(request: Request) -> Response:
    item_id = request.path_params["item_id"]
    body = await request.body()
    return JSONResponse(
        {"item_id": item_id, "method": request.method, "received": len(body)},
        headers={"x-item": str(item_id)},
    )


async def order(request: Request) -> Response:
    return PlainTextResponse(f"user {request.path_params['user_id']} order {request.path_params['order_id']}")


async def boom(request: Request) -> Response:
    raise RuntimeError("boom: an application error")


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(STREAM_CHUNKS):
            if i:
                await asyncio.sleep(STREAM_SLEEP)
            yield STREAM_CHUNK

    return StreamingResponse(chunks(), media_type="application/octet-stream")


async def slow_stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(SLOW_STREAM_CHUNKS):
            if i:
                await asyncio.sleep(SLOW_STREAM_SLEEP)
            yield STREAM_CHUNK

    return StreamingResponse(chunks(), media_type="application/octet-stream")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    while True:
        text = await websocket.receive_text()
        if text == "bye":
            await websocket.close(code=1000)
            return
        await websocket.send_text("echo: " + text)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    note_event("startup")
    yield
    note_event("shutdown")


raw_app = Starlette(
    routes=[
        Route("/items/{item_id:int}", item, methods=["GET", "POST"]),
        Route("/users/{user_id}/orders/{order_id}", order),
        Route("/boom", boom),
        Route("/healthz", healthz),
        Route("/stream", stream),
        Route("/slow-stream", slow_stream),
        WebSocketRoute("/ws", echo),
    ],
    lifespan=lifespan,
)

app = NetProfMiddleware(raw_app, exclude_paths=EXCLUDE_PATHS) if wrapped() else raw_app
