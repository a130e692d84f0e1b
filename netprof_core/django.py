"""Django: add ``"netprof_core.django.NetProfMiddleware"`` at the top of
``MIDDLEWARE``. Each request is recorded with Django's route
(``request.resolver_match.route``, e.g. ``items/<int:item_id>``).

Wrapping the WSGI or ASGI application in ``netprof_core.wsgi`` or
``netprof_core.asgi`` works too; with this middleware also installed, the
wrapper takes the route from it, and the wrapper's timing includes the rest of
Django. Use one or the other for a request, not both, or it counts twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from ._layout import Direction, ErrorKind
from .hooks import ROUTE_ENVIRON_KEY, UNMATCHED_ROUTE, get_recorder

__all__ = ("NetProfMiddleware",)

_monotonic_ns = time.monotonic_ns


class NetProfMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.recorder = get_recorder()
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        start = _monotonic_ns()
        try:
            response = self.get_response(request)
        except BaseException:
            self._record(request, None, start, ErrorKind.EXCEPTION)
            raise
        self._record(request, response, start, ErrorKind.NONE)
        return response

    async def _acall(self, request: Any) -> Any:
        start = _monotonic_ns()
        try:
            response = await self.get_response(request)
        except BaseException:
            self._record(request, None, start, ErrorKind.EXCEPTION)
            raise
        self._record(request, response, start, ErrorKind.NONE)
        return response

    def _record(self, request: Any, response: Any, start: int, error_kind: int) -> None:
        end = _monotonic_ns()
        recorder = self.recorder
        try:
            match = getattr(request, "resolver_match", None)
            template = match.route if match is not None and match.route else UNMATCHED_ROUTE
            request.META[ROUTE_ENVIRON_KEY] = template  # for a WSGI wrapper around Django
            status = response.status_code if response is not None else 0
            content = getattr(response, "content", b"") if response is not None and not getattr(response, "streaming", False) else b""
            route = recorder.route_id("/" + template.lstrip("/") if template != UNMATCHED_ROUTE else template, request.method, Direction.INBOUND)
            bytes_in = int(request.META.get("CONTENT_LENGTH") or 0)
        except Exception as exc:
            recorder.internal_error(exc)
            return
        recorder.record(route, status, start, end, bytes_in, len(content), error_kind)
