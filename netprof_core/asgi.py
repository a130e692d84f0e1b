"""ASGI middleware: ``app = NetProfMiddleware(app)`` records every HTTP request.

Pure ASGI (no BaseHTTPMiddleware): lifespan and websocket scopes pass straight
through, and the application's messages go out unchanged. The route is the
framework's template (``scope["route"].path_format`` in Starlette and FastAPI),
so ``/items/1`` and ``/items/2`` are one route.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from ._layout import ErrorKind
from .hooks import UNMATCHED_ROUTE, InboundHook
from .recorder import Recorder

__all__ = ("NetProfMiddleware",)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RouteKey = Callable[[Scope], "str | None"]

_monotonic_ns = time.monotonic_ns
_NONE = int(ErrorKind.NONE)
_EXCEPTION = int(ErrorKind.EXCEPTION)
_CLIENT_DISCONNECT = int(ErrorKind.CLIENT_DISCONNECT)


def route_template(scope: Scope, root_path: str = "") -> str:
    """The template of the route the framework matched, else UNMATCHED_ROUTE.
    Under a Starlette ``Mount``, the route's own template lacks the mount's
    prefix: that is what the mounts added to ``root_path`` since ``root_path``."""
    route = scope.get("route")
    if route is not None:
        template = getattr(route, "path_format", None) or getattr(route, "path", None)
        if isinstance(template, str):
            return scope.get("root_path", "")[len(root_path) :] + template
    return UNMATCHED_ROUTE


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.excluded is not None and self.excluded(scope["path"])):
            await self.app(scope, receive, send)
            return
        start = _monotonic_ns()
        root_path = scope.get("root_path", "")
        # One list for the request's state: cheaper than closures over several cells.
        state = [0, 0, 0, 0, False, _NONE]  # status, bytes in, bytes out, first byte, finished, error kind

        async def counting_receive() -> Message:
            message = await receive()
            kind = message["type"]
            if kind == "http.request":
                state[1] += len(message.get("body", b""))
            elif kind == "http.disconnect" and not state[4]:
                state[5] = _CLIENT_DISCONNECT
            return message

        async def watching_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.body":
                if not state[3]:
                    state[3] = _monotonic_ns()
                state[2] += len(message.get("body", b""))
                state[4] = not message.get("more_body", False)
            elif kind == "http.response.start":
                state[0] = message["status"]
            try:
                await send(message)
            except OSError:  # ASGI 2.4: the client went away (frameworks may wrap it)
                state[5] = _CLIENT_DISCONNECT
                raise

        try:
            await self.app(scope, counting_receive, watching_send)
        except BaseException:
            if not state[5]:  # (a failed send has set CLIENT_DISCONNECT already)
                state[5] = _EXCEPTION
            raise
        finally:
            end = _monotonic_ns()
            status, bytes_in, bytes_out, first_byte, _, error_kind = state
            try:
                template = (self.route_key(scope) if self.route_key else None) or route_template(scope, root_path)
                route = self.route_ids.get((template, scope["method"]))
                if route is None:
                    route = self.intern(template, scope["method"])
            except Exception as exc:
                self.recorder.internal_error(exc)
            else:
                self.record(route, status, start, end, bytes_in, bytes_out, error_kind, first_byte - start if first_byte else 0)
