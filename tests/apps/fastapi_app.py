"""A FastAPI app for the uvicorn tests; wrapped in netprof's ASGI middleware
unless NETPROF_TEST_WRAP=0, ``/healthz`` excluded."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from netprof_core.asgi import NetProfMiddleware

from .common import EXCLUDE_PATHS, note_event, wrapped


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    note_event("startup")
    yield
    note_event("shutdown")


raw_app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)


class Note(BaseModel):
    text: str


@raw_app.get("/items/{item_id}")
async def get_item(item_id: int) -> dict[str, object]:
    return {"item_id": item_id}


@raw_app.post("/items/{item_id}/notes")
async def add_note(item_id: int, note: Note) -> dict[str, object]:
    return {"item_id": item_id, "length": len(note.text)}


@raw_app.get("/users/{user_id}/orders/{order_id}")
def get_order(user_id: str, order_id: int) -> dict[str, object]:  # a sync endpoint: run in a thread
    return {"user_id": user_id, "order_id": order_id}


@raw_app.get("/boom")
async def boom() -> None:
    raise RuntimeError("boom: an application error")


@raw_app.get("/healthz", response_class=PlainTextResponse)
async def healthz() -> str:
    return "ok"


app = NetProfMiddleware(raw_app, exclude_paths=EXCLUDE_PATHS) if wrapped() else raw_app
