"""A minimal Django project in one module: settings, URLs, views, WSGI app.

NETPROF_TEST_DJANGO_MODE chooses how netprof sees it:

- ``middleware`` (default): ``netprof_core.django.NetProfMiddleware`` in
  MIDDLEWARE, and ``application`` is Django's own WSGI application;
- ``wsgi``: no Django middleware; ``application`` is Django's WSGI application
  wrapped in ``netprof_core.wsgi.NetProfMiddleware``.

NETPROF_TEST_WRAP=0 leaves netprof out entirely.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Iterator

import django
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import path

from .common import EXCLUDE_PATHS, STREAM_CHUNK, STREAM_CHUNKS, STREAM_SLEEP, note_event, wrapped

MODE = os.environ.get("NETPROF_TEST_DJANGO_MODE", "middleware") if wrapped() else "none"
if MODE not in ("middleware", "wsgi", "none"):
    raise RuntimeError(f"NETPROF_TEST_DJANGO_MODE={MODE!r}")

settings.configure(
    DEBUG=False,
    SECRET_KEY="netprof-tests-only",
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=["netprof_core.django.NetProfMiddleware"] if MODE == "middleware" else [],
    INSTALLED_APPS=[],
    DATABASES={},
    USE_TZ=True,
    LOGGING_CONFIG=None,  # the 500s' tracebacks are expected; keep the server log short
)
django.setup()


def item(request: HttpRequest, item_id: int) -> HttpResponse:
    response = JsonResponse({"item_id": item_id, "method": request.method, "received": len(request.body)})
    response["X-Item"] = str(item_id)
    return response


def order(request: HttpRequest, user: str, order_id: int) -> HttpResponse:
    return HttpResponse(f"user {user} order {order_id}", content_type="text/plain")


def boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("boom: an application error")


def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")


def stream(request: HttpRequest) -> HttpResponse:
    def chunks() -> Iterator[bytes]:
        for i in range(STREAM_CHUNKS):
            if i:
                time.sleep(STREAM_SLEEP)
            yield STREAM_CHUNK

    return StreamingHttpResponse(chunks(), content_type="application/octet-stream")


urlpatterns = [
    path("items/<int:item_id>", item),
    path("users/<str:user>/orders/<int:order_id>", order),
    path("boom", boom),
    path("healthz", healthz),
    path("stream", stream),
]

from django.core.wsgi import get_wsgi_application  # after settings.configure()

application = get_wsgi_application()
if MODE == "wsgi":
    from netprof_core.wsgi import NetProfMiddleware

    application = NetProfMiddleware(application, exclude_paths=EXCLUDE_PATHS)

note_event("startup")
atexit.register(note_event, "shutdown")
