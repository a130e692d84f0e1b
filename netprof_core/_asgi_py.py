# cython: language_level=3, embedsignature=True, annotation_typing=False
"""The per-request work of the ASGI middleware (``netprof_core.asgi``).

This one source runs twice: as it is, and compiled by Cython as ``_asgi_c``
(``_asgi_c.py`` is a link to this file; ``_asgi_c.pxd`` gives it C types), as
``_wsgi_py.py`` does. Keep it to what Cython compiles from plain Python.

What makes it cheap: no coroutine of ours runs. ``serve`` returns the
application's own awaitable wrapped by ``awaiting`` (``_awaiting_c.pyx``: C
code that steps it and reports its end), where an ``async def`` would add a
coroutine to every request's await chain. The ``send`` the application gets is
an :class:`Exchange`, whose ``__call__`` notes the message and returns the
server's own awaitable, so the application awaits the server directly (an
``async def`` wrapper around ``send`` cost a server as much again as the rest
of the middleware); ``receive`` is wrapped by ``awaiting`` too. And a request
the recorder will not record (recording off, or sampled out: its ``admit()``
says 0 as the request starts) is not wrapped at all.
"""

from __future__ import annotations

import asyncio.coroutines
import inspect
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._clock import now_ns
from ._layout import ErrorKind
from .hooks import UNMATCHED_ROUTE, InboundHook, awaiting_for, cython_core

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_NONE = int(ErrorKind.NONE)
_EXCEPTION = int(ErrorKind.EXCEPTION)
_CLIENT_DISCONNECT = int(ErrorKind.CLIENT_DISCONNECT)
# What servers and frameworks name a client that has gone: Starlette's
# ClientDisconnect, uvicorn's and hypercorn's ClientDisconnected.
_DISCONNECT_NAMES = frozenset(("ClientDisconnect", "ClientDisconnected"))
# The marks of a coroutine function (asyncio's up to 3.11, inspect's from
# 3.12): the send and receive an app gets from the server are coroutine
# functions, and asgiref's async_to_sync (Django Channels) asks.
_ASYNCIO_MARK = getattr(asyncio.coroutines, "_is_coroutine", None)
_INSPECT_MARK = getattr(inspect, "_is_coroutine_mark", None)


def route_template(scope: dict[str, Any], root_path: str) -> str:
    """The template of the route the framework matched, else UNMATCHED_ROUTE.
    Never request data: under a Starlette ``Mount`` the route's own template
    lacks the mount's, which comes from the mount itself (see ``mounted_template``)."""
    route = scope.get("route")
    if route is not None:
        template = own_template(route)
        if template is not None:
            if scope.get("root_path", "") == root_path:  # no mount crossed
                return template
            return mounted_template(scope, route, template, root_path)
    return UNMATCHED_ROUTE


def own_template(route: object) -> str | None:
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) else None


# A route reached through mounts -> (the route, the router, its templates
# with the mounts leading to it): a route object may be mounted more than once.
_MOUNTED: dict[int, tuple[object, object, list[tuple[str, tuple[Any, ...]]]]] = {}
_MOUNTED_LIMIT = 4096
_MAX_MOUNT_DEPTH = 16


def mounted_template(scope: dict[str, Any], route: object, template: str, root_path: str) -> str:
    """The template of ``route``, matched under mounts: the mounts' templates
    (found by walking the application's router, ``scope["router"]``, down to
    ``route``) and its own. The request's path only chooses among the
    templates of a route mounted more than once. Where the route cannot be
    found, its own template (a mount's prefix is never taken from the
    request's ``root_path``: a client writes that)."""
    router = scope.get("router")
    known = _MOUNTED.get(id(route))
    if known is not None and known[0] is route and known[1] is router:
        candidates = known[2]
    else:
        candidates = []
        routes = getattr(router, "routes", None)
        if isinstance(routes, list):
            _find_route(routes, route, template, "", (), 0, candidates)
        if len(_MOUNTED) < _MOUNTED_LIMIT:
            _MOUNTED[id(route)] = (route, router, candidates)  # holding the route: its id is not reused
    if not candidates:
        return template
    if len(candidates) == 1:
        return candidates[0][0]
    path = scope.get("path", "")
    base = scope.get("app_root_path", root_path)
    if isinstance(path, str) and isinstance(base, str) and path.startswith(base):
        path = path[len(base) :]
    for found, mounts in candidates:
        if _mounts_match(mounts, path):
            return found
    return candidates[0][0]


def _find_route(
    routes: list[Any],
    target: object,
    template: str,
    prefix: str,
    mounts: tuple[Any, ...],
    depth: int,
    found: list[tuple[str, tuple[Any, ...]]],
) -> None:
    for route in routes:
        if route is target:
            found.append((prefix + template, mounts))
            continue
        inner = getattr(route, "routes", None)  # a Mount's or a Host's
        if not isinstance(inner, list) or not inner or depth >= _MAX_MOUNT_DEPTH:
            continue
        regex = getattr(route, "path_regex", None)
        mount = own_template(route) if regex is not None else None
        if mount is None:  # a Host: no path of its own
            _find_route(inner, target, template, prefix, mounts, depth + 1, found)
        else:
            own = mount.removesuffix("/{path}")
            _find_route(inner, target, template, prefix + own, (*mounts, route), depth + 1, found)


def _mounts_match(mounts: tuple[Any, ...], path: str) -> bool:
    """Whether ``path`` (from the application's root) passes through ``mounts``, as Starlette matches them."""
    for mount in mounts:
        match = mount.path_regex.match(path)
        if match is None:
            return False
        path = "/" + match.groupdict().get("path", "")
    return True


def is_disconnect(exc: BaseException, send: object) -> bool:
    """Whether an exception out of the application means the client went
    away: one named so, an OSError raised inside the server's ``send`` (ASGI
    2.4: an app's own OSError, from its database say, is an EXCEPTION), or an
    exception group (anyio's task groups) holding one."""
    if type(exc).__name__ in _DISCONNECT_NAMES:
        return True
    if isinstance(exc, OSError):
        code = getattr(getattr(send, "__func__", send), "__code__", None)
        traceback = exc.__traceback__
        while traceback is not None:
            if traceback.tb_frame.f_code is code:
                return True
            traceback = traceback.tb_next
        return False
    inner = getattr(exc, "exceptions", None)  # BaseExceptionGroup, Python 3.11+
    if type(inner) is tuple:
        for each in inner:
            if isinstance(each, BaseException) and is_disconnect(each, send):
                return True
    return False


class AsgiRequests:
    """A middleware's settings, in the typed fields the compiled ``serve`` reads."""

    def __init__(self, hook: InboundHook) -> None:
        self.hook = hook
        self.app = hook.app
        self.excluded = hook.excluded
        self.route_key = hook.route_key
        self.route_ids = hook.route_ids
        self.admit = hook.recorder.admit
        self.record_admitted = hook.recorder.record_admitted
        self.core = cython_core(hook.recorder)
        self.awaiting = awaiting_for(hook.recorder)
        self.served = self.request_served  # bound once, not per request

    def request_served(
        self, exchange: Exchange, result: object, exc: BaseException | None, _: object
    ) -> None:
        """``awaiting``'s report: the application has returned, or raised ``exc``."""
        scope = exchange.scope
        exchange.scope = None  # an app may keep its send in the scope: no cycle left behind
        if exc is not None:
            exchange.failed(exc)
        if scope is not None:  # not served already
            self.finish(scope, exchange)

    def finish(self, scope: Scope, exchange: Exchange) -> None:
        if not exchange.end:
            exchange.end = now_ns()
        try:
            fields = scope if type(scope) is dict else dict(scope)
            template = self.route_key(scope) if self.route_key is not None else None
            if not template:
                template = route_template(fields, exchange.root_path)
            method = fields["method"]
            templates = self.route_ids.get(method)
            route = templates.get(template) if templates is not None else None
            if route is None:
                route = self.hook.intern(template, method)
        except Exception as exc:  # noqa: BLE001 - an exception inside netprof never reaches the application
            self.hook.recorder.internal_error(exc)
            return
        ttfb = exchange.first_byte - exchange.start if exchange.first_byte else 0
        if self.core is not None:
            # Compiled beside the Cython core: a C call, no number boxed.
            self.core.record_admitted_ints(
                exchange.admitted, route, exchange.status, exchange.start, exchange.end, exchange.bytes_in,
                exchange.bytes_out, exchange.error_kind, ttfb,
            )  # fmt: skip
        else:
            self.record_admitted(
                exchange.admitted, route, exchange.status, exchange.start, exchange.end, exchange.bytes_in,
                exchange.bytes_out, exchange.error_kind, ttfb,
            )  # fmt: skip


def requests_of(middleware: Any) -> AsgiRequests:
    return middleware._requests  # type: ignore[no-any-return]


def serve(middleware: Any, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
    """``NetProfMiddleware.__call__``: the application's awaitable, wrapped
    when the request is one to record. Marked as a coroutine function below,
    as servers check; what it returns is a ``collections.abc.Coroutine``."""
    requests = requests_of(middleware)
    if scope["type"] != "http" or (requests.excluded is not None and requests.excluded(scope["path"])):
        return requests.app(scope, receive, send)  # type: ignore[no-any-return]
    admitted = requests.core.admit() if requests.core is not None else requests.admit()
    if not admitted:  # recording is off, or this request is sampled out: left alone
        return requests.app(scope, receive, send)  # type: ignore[no-any-return]
    exchange = new_exchange(scope, scope if type(scope) is dict else dict(scope), send, admitted)
    try:
        application = requests.app(scope, new_receiver(exchange, receive, requests.awaiting), exchange)
    except BaseException as exc:  # an application that fails before it is awaited
        requests.request_served(exchange, None, exc, None)
        raise
    return requests.awaiting(application, requests.served, exchange, None)  # type: ignore[no-any-return]


# The marks of a coroutine function, which servers look for on the ASGI 3
# callable (uvicorn through asyncio's, Python 3.14's through inspect's).
serve._is_coroutine = _ASYNCIO_MARK  # type: ignore[attr-defined]
serve._is_coroutine_marker = _INSPECT_MARK  # type: ignore[attr-defined]


def new_exchange(scope: Scope, fields: dict[str, Any], send: Send, admitted: int) -> Exchange:
    """A request starts. (``__new__`` and the fields set here, not ``__init__``:
    compiled, that takes an object from a free list, without parsing arguments.)"""
    exchange = Exchange.__new__(Exchange)
    exchange._send = send
    exchange.scope = scope
    exchange.root_path = fields.get("root_path", "")
    exchange.start = now_ns()
    exchange.status = 0
    exchange.bytes_in = 0
    exchange.bytes_out = 0
    exchange.first_byte = 0
    exchange.end = 0
    exchange.trailers = False
    exchange.error_kind = _NONE
    exchange.admitted = admitted
    return exchange


class Exchange:
    """One request in flight. It is the ``send`` the application gets:
    calling it notes the message and hands back the server's awaitable.

    The request ends with its last body message, or its last trailers when
    it announced some (a Starlette background task that runs after it is not
    the client's wait), or when the application returns or raises without one. Taken as the message is handed over, the
    end leaves out the server's wait for the client to take the chunk before."""

    _send: Send
    scope: Scope | None  # as the server gave it, until the request is served
    root_path: str  # scope["root_path"] when the request came in
    start: int  # monotonic ns
    status: int  # -1 when the app's start message had no valid one
    bytes_in: int
    bytes_out: int
    first_byte: int  # monotonic ns of the first body message, 0 before
    end: int  # monotonic ns of the last body (or trailers) message, 0 before
    trailers: bool  # the response ends with trailers (HTTP trailers extension)
    error_kind: int
    admitted: int  # the recorder's admit() token
    _is_coroutine = _ASYNCIO_MARK
    _is_coroutine_marker = _INSPECT_MARK

    def __call__(self, message: Message) -> Awaitable[None]:
        self.note(message if type(message) is dict else dict(message))
        return self._send(message)

    def note(self, message: dict[str, Any]) -> None:
        if self.end:  # complete: the server refuses what comes after
            return
        kind = message["type"]
        if kind == "http.response.body":
            body = message.get("body")
            if body:
                self.bytes_out += len(body)
            if message.get("more_body", False) or self.trailers:
                if not self.first_byte:
                    self.first_byte = now_ns()
            else:
                self.end = now_ns()
                if not self.first_byte:
                    self.first_byte = self.end
        elif kind == "http.response.start":
            status = message["status"]
            # Not a status (a bug of the app's): -1, which record() refuses and counts.
            self.status = status if isinstance(status, int) and 0 <= status <= 0xFFFF else -1
            self.trailers = bool(message.get("trailers", False))
        elif kind == "http.response.trailers" and not message.get("more_trailers", False):
            self.end = now_ns()

    def failed(self, exc: BaseException) -> None:
        """The application raised ``exc``."""
        if self.error_kind == _NONE:
            try:
                disconnect = is_disconnect(exc, self._send)
            except Exception:  # noqa: BLE001 - an exception whose attributes raise: the app's, as it is
                disconnect = False
            self.error_kind = _CLIENT_DISCONNECT if disconnect else _EXCEPTION


def new_receiver(exchange: Exchange, receive: Receive, awaiting: Callable[..., Any]) -> Receiver:
    receiver = Receiver.__new__(Receiver)
    receiver.exchange = exchange
    receiver._receive = receive
    receiver._awaiting = awaiting
    return receiver


class Receiver:
    """The ``receive`` the application gets: counts the request body and
    notes a client that went away before the response was complete. (Its own
    object, not a bound method of the exchange: that would be an allocation
    per request, and the exchange must not point back to it, or each request
    would be a reference cycle for the garbage collector.)"""

    exchange: Exchange
    _receive: Receive
    _awaiting: Callable[..., Any]
    _is_coroutine = _ASYNCIO_MARK
    _is_coroutine_marker = _INSPECT_MARK

    def __call__(self) -> Awaitable[Message]:
        return self._awaiting(self._receive(), received, self.exchange, None)  # type: ignore[no-any-return]


def received(exchange: Exchange, message: Any, exc: BaseException | None, _: object) -> None:
    """``awaiting``'s report on a ``receive``: its message, or the exception it raised."""
    if message is None:
        return
    kind = message["type"]
    if kind == "http.request":
        body = message.get("body")
        if body:
            exchange.bytes_in += len(body)
    elif kind == "http.disconnect" and not exchange.end:
        exchange.error_kind = _CLIENT_DISCONNECT
