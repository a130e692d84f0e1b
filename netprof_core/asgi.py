"""ASGI middleware: ``app = NetProfMiddleware(app)`` records every HTTP request.

Pure ASGI (no BaseHTTPMiddleware): lifespan and websocket scopes pass straight
through, and the application's messages go out unchanged. The route is the
framework's template (``scope["route"].path_format`` in Starlette and FastAPI),
so ``/items/1`` and ``/items/2`` are one route.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from ._hookpaths import hook_path
from .hooks import InboundHook
from .recorder import Recorder

__all__ = ("NetProfMiddleware",)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_ASGI = hook_path("asgi", "cython")

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RouteKey = Callable[[Scope], "str | None"]


class NetProfMiddleware(InboundHook):
    """Records each HTTP request of an ASGI application.

    ``recorder``: defaults to the process's (``get_recorder()``, configured from
    ``NETPROF_CONFIG``). ``exclude_paths``: regular expressions of paths to leave
    alone. ``route_key(scope)``: a route name of your own; None falls back to
    the framework's template.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        recorder: Recorder | None = None,
        exclude_paths: Iterable[str] = (),
        route_key: RouteKey | None = None,
    ) -> None:
        super().__init__(app, recorder, exclude_paths, route_key)
        self._requests = _ASGI.AsgiRequests(self)
        if not inspect.iscoroutinefunction(self.__call__):
            # Before Python 3.13 (3.12.0 and 3.12.1 at least) inspect does not
            # see the marks through a bound method. What hypercorn's ASGI 3 test,
            # `inspect.iscoroutinefunction(app.__call__)`, finds then is this
            # instance attribute; a call `app(...)` still goes to the class's.
            self.__call__ = self._call_as_coroutine

    # The per-request work: compiled when netprof was built with its Cython
    # core, else the source itself (see _asgi_py.py). It returns the app's
    # awaitable wrapped, no coroutine of ours, and carries the marks of a
    # coroutine function, which servers check to tell ASGI 3 from ASGI 2.
    __call__ = _ASGI.serve

    async def _call_as_coroutine(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _ASGI.serve(self, scope, receive, send)
