"""Django: add ``"netprof_core.django.NetProfMiddleware"`` at the top of
``MIDDLEWARE``. Each request is recorded with Django's route
(``request.resolver_match.route``, as ``/items/<int:item_id>``).

Or wrap Django's WSGI application in ``netprof_core.wsgi.NetProfMiddleware``
instead: then the wrapper records (its timing includes the rest of Django), and
this middleware, if installed too, only tells it the route. Under ASGI, use
this middleware.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from ._layout import ErrorKind
from .hooks import RECORDING_ENVIRON_KEY, ROUTE_ENVIRON_KEY, UNMATCHED_ROUTE, InboundHook, content_length

__all__ = ("NetProfMiddleware",)

_monotonic_ns = time.monotonic_ns
_NONE = int(ErrorKind.NONE)
_EXCEPTION = int(ErrorKind.EXCEPTION)


class NetProfMiddleware(InboundHook):
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        super().__init__(get_response, None, (), None)
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self._async:
            return self._acall(request)
        start = _monotonic_ns()
        try:
            response = self.app(request)
        except BaseException:
            self._finish(request, None, start, _EXCEPTION)
            raise
        self._finish(request, response, start, _NONE)
        return response

    async def _acall(self, request: Any) -> Any:
        start = _monotonic_ns()
        try:
            response = await self.app(request)
        except BaseException:
            self._finish(request, None, start, _EXCEPTION)
            raise
        self._finish(request, response, start, _NONE)
        return response

    def _finish(self, request: Any, response: Any, start: int, error_kind: int) -> None:
        end = _monotonic_ns()
        try:
            match = getattr(request, "resolver_match", None)
            template = "/" + match.route.lstrip("/") if match is not None and match.route else UNMATCHED_ROUTE
            meta = request.META
            if meta.get(RECORDING_ENVIRON_KEY):  # a WSGI wrapper records this request
                meta[ROUTE_ENVIRON_KEY] = template
                return
            route = self.route_ids.get(request.method, {}).get(template)
            if route is None:
                route = self.intern(template, request.method)
            status = response.status_code if response is not None else 0
            # A streamed body goes out after this middleware returns: not counted.
            streaming = response is None or getattr(response, "streaming", False)
            bytes_out = 0 if streaming else len(response.content)
            bytes_in = content_length(meta.get("CONTENT_LENGTH"))
        except Exception as exc:  # noqa: BLE001 - an exception inside netprof never reaches the application
            self.recorder.internal_error(exc)
            return
        self.record(route, status, start, end, bytes_in, bytes_out, error_kind)
