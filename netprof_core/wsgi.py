"""WSGI middleware: ``app = NetProfMiddleware(app)`` records every request.

A streamed response ends when the server closes it, so it is timed to its
end; a list (the whole body at once) or a ``wsgi.file_wrapper`` is recorded
when the app returns it, and handed to the server unchanged. The route is the ``route_key`` given, else
Flask's URL rule when the app is a Flask app, else Django's route when
``netprof_core.django`` noted it, else one UNMATCHED_ROUTE for all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._layout import ErrorKind
from .hooks import RECORDING_ENVIRON_KEY, ROUTE_ENVIRON_KEY, UNMATCHED_ROUTE, InboundHook, content_length
from .log import logger
from .recorder import Recorder

__all__ = ("NetProfMiddleware",)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
RouteKey = Callable[[Environ], "str | None"]

_monotonic_ns = time.monotonic_ns


def _is_file_wrapper(body: object, environ: Environ) -> bool:
    file_wrapper = environ.get("wsgi.file_wrapper")
    return isinstance(file_wrapper, type) and isinstance(body, file_wrapper)

_STATUS_CODES: dict[str, int] = {}  # "200 OK" -> 200: servers send a handful of status lines
_NONE = int(ErrorKind.NONE)
_EXCEPTION = int(ErrorKind.EXCEPTION)


class NetProfMiddleware(InboundHook):
    """Records each request of a WSGI application; see the ASGI middleware
    of the same name for the arguments. Safe under threaded and pre-forking
    servers: each thread times its own request, each process has its segment.

    Given a Flask app (or its ``wsgi_app``), it adds a URL value preprocessor
    that notes the URL rule the request matched (it runs before any
    ``before_request`` function, which may answer early). Behind another WSGI
    wrapper (ProxyFix...), pass ``route_key`` instead.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        recorder: Recorder | None = None,
        exclude_paths: Iterable[str] = (),
        route_key: RouteKey | None = None,
    ) -> None:
        super().__init__(app, recorder, exclude_paths, route_key)
        _note_flask_rules(app)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self.excluded is not None and self.excluded(environ.get("PATH_INFO", "")):
            return self.app(environ, start_response)
        environ[RECORDING_ENVIRON_KEY] = True
        request = _Request(self, environ, start_response)
        try:
            body = self.app(environ, request.start_response)
        except BaseException:
            request.finish(_EXCEPTION)
            raise
        if type(body) is list or _is_file_wrapper(body, environ):
            # All there, or sent by the server's sendfile: handed back as it is,
            # so that the server still sees what it is (and can size or send it).
            request.bytes_out = sum(map(len, body)) if type(body) is list else 0
            request.finish(_NONE)
            return body
        request.body = body
        return request

    def _finish(self, request: _Request, error_kind: int) -> None:
        end = _monotonic_ns()
        environ = request.environ
        try:
            template = self.route_key(environ) if self.route_key else None
            if not template:
                template = environ.get(ROUTE_ENVIRON_KEY)
                if not isinstance(template, str):
                    template = UNMATCHED_ROUTE
            method = environ.get("REQUEST_METHOD", "GET")
            route = self.route_ids.get((template, method))
            if route is None:
                route = self.intern(template, method)
            status = _STATUS_CODES.get(request.status)
            if status is None:
                status = int(request.status[:3]) if request.status else 0
                if len(_STATUS_CODES) < 1024:
                    _STATUS_CODES[request.status] = status
            bytes_in = content_length(environ.get("CONTENT_LENGTH"))
        except Exception as exc:
            self.recorder.internal_error(exc)
            return
        ttfb = request.first_byte - request.start if request.first_byte else 0
        self.record(route, status, request.start, end, bytes_in, request.bytes_out, error_kind, ttfb)


class _Request:
    """One request in flight: its ``start_response`` is what the app calls,
    and it stands in for the app's response iterable, counting the bytes and
    recording the request when the server closes it (PEP 3333)."""

    __slots__ = (
        "_start_response",
        "body",
        "bytes_out",
        "environ",
        "error_kind",
        "first_byte",
        "middleware",
        "start",
        "status",
    )

    def __init__(self, middleware: NetProfMiddleware, environ: Environ, start_response: StartResponse) -> None:
        self.middleware: NetProfMiddleware | None = middleware
        self.environ = environ
        self._start_response = start_response
        self.start = _monotonic_ns()
        self.status = ""
        self.body: Iterable[bytes] = ()
        self.bytes_out = 0
        self.first_byte = 0
        self.error_kind = _NONE

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.status = status
        return self._start_response(status, headers, exc_info)

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self.body:
                if not self.first_byte:
                    self.first_byte = _monotonic_ns()
                self.bytes_out += len(chunk)
                yield chunk
        except GeneratorExit:
            raise
        except BaseException:
            self.error_kind = _EXCEPTION
            raise

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.finish(self.error_kind)

    def finish(self, error_kind: int) -> None:
        middleware, self.middleware = self.middleware, None  # once, however often closed
        if middleware is not None:
            middleware._finish(self, error_kind)


def _note_flask_rules(app: Any) -> None:
    """Flask keeps the matched URL rule on its request object, which is gone
    by the time the middleware records: copy it into the environ."""
    flask_app = getattr(app, "__self__", app)  # app.wsgi_app is a bound method
    if not (hasattr(flask_app, "url_map") and hasattr(flask_app, "url_value_preprocessor")):
        return
    try:
        from flask import request
    except ImportError:
        return

    def note_rule(endpoint: str | None, values: dict[str, Any] | None) -> None:
        rule = request.url_rule
        if rule is not None:
            request.environ[ROUTE_ENVIRON_KEY] = rule.rule

    try:
        flask_app.url_value_preprocessor(note_rule)
    except AssertionError:  # Flask refuses set-up once it has served a request
        logger.warning("netprof: wrap the Flask app before it serves requests to see its URL rules")
