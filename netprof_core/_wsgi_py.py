# cython: language_level=3, embedsignature=True, annotation_typing=False
"""The per-request work of the WSGI middleware (``netprof_core.wsgi``).

This one source runs twice: as it is, and compiled by Cython as ``_wsgi_c``
(``_wsgi_c.py`` is a link to this file; ``_wsgi_c.pxd`` gives it C types), so
the two can never drift. Keep it to what Cython compiles from plain Python:
no ``cython`` import (annotations are for type checkers only).

A request the recorder will not record (recording off, or sampled out: its
``admit()`` says 0 as the request starts) goes to the application untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._clock import now_ns
from ._layout import ErrorKind
from .hooks import (
    RECORDING_ENVIRON_KEY,
    ROUTE_ENVIRON_KEY,
    UNMATCHED_ROUTE,
    InboundHook,
    content_length,
    cython_core,
)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

_NONE = int(ErrorKind.NONE)
_EXCEPTION = int(ErrorKind.EXCEPTION)
_STATUS_CODES: dict[str, int] = {}  # "200 OK" -> 200: servers send a handful of status lines
_STATUS_CODES_LIMIT = 1024
_INT64_MAX = 2**63 - 1


class WsgiRequests:
    """Serves the requests of one middleware: ``serve`` is its ``__call__``."""

    def __init__(self, hook: InboundHook) -> None:
        # The middleware's settings, copied once: typed fields are what make
        # the compiled code fast. (route_ids is the hook's own dict, shared.)
        self.hook = hook
        self.app = hook.app
        self.excluded = hook.excluded
        self.route_key = hook.route_key
        self.route_ids = hook.route_ids
        self.admit = hook.recorder.admit
        self.record_admitted = hook.recorder.record_admitted
        self.core = cython_core(hook.recorder)

    def serve(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        # Set for every request, recorded or not: a framework adapter beneath
        # (Django's middleware) must not record it instead.
        environ[RECORDING_ENVIRON_KEY] = True
        if self.excluded is not None and self.excluded(environ.get("PATH_INFO", "")):
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        admitted = self.core.admit() if self.core is not None else self.admit()
        if not admitted:  # recording is off, or this request is sampled out: left alone
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        request = Request(self, environ, start_response, admitted)
        try:
            body = self.app(environ, request.start_response)
        except BaseException:
            request.finish(_EXCEPTION)
            raise
        if type(body) is list:
            # All there: handed back as it is, so that the server still sees a list.
            bytes_out = 0
            for chunk in body:
                bytes_out += len(chunk)
            request.bytes_out = bytes_out
            request.finish(_NONE)
            return body  # type: ignore[no-any-return]
        if _is_file_wrapper(body, environ):
            request.finish(_NONE)  # sent by the server's sendfile, which must still see what it is
            return body  # type: ignore[no-any-return]
        request.body = body
        return request

    def finish(self, request: Request, error_kind: int) -> None:
        end = now_ns()
        environ = request.environ
        try:
            template = self.route_key(environ) if self.route_key is not None else None
            if not template:
                template = environ.get(ROUTE_ENVIRON_KEY)
                if not isinstance(template, str):
                    template = UNMATCHED_ROUTE
            method = environ.get("REQUEST_METHOD", "GET")
            templates = self.route_ids.get(method)
            route = templates.get(template) if templates is not None else None
            if route is None:
                route = self.hook.intern(template, method)
            status = _STATUS_CODES.get(request.status)
            if status is None:
                status = int(request.status[:3]) if request.status else 0
                if len(_STATUS_CODES) < _STATUS_CODES_LIMIT:
                    _STATUS_CODES[request.status] = status
            value = environ.get("CONTENT_LENGTH")
            bytes_in = content_length(value) if value else 0
        except Exception as exc:  # noqa: BLE001 - an exception inside netprof never reaches the application
            self.hook.recorder.internal_error(exc)
            return
        ttfb = request.first_byte - request.start if request.first_byte else 0
        if self.core is not None and bytes_in <= _INT64_MAX:  # compiled beside the Cython core: a C call
            self.core.record_admitted_ints(
                request.admitted, route, status, request.start, end, bytes_in, request.bytes_out, error_kind,
                ttfb,
            )  # fmt: skip
        else:  # (a Content-Length no C int64 holds, up to 2**64 - 1: recorded, as record() takes it)
            self.record_admitted(
                request.admitted, route, status, request.start, end, bytes_in, request.bytes_out, error_kind,
                ttfb,
            )  # fmt: skip


def _is_file_wrapper(body: object, environ: Environ) -> bool:
    file_wrapper = environ.get("wsgi.file_wrapper")
    return isinstance(file_wrapper, type) and isinstance(body, file_wrapper)


class Request:
    """One request in flight: its ``start_response`` is what the app calls,
    and it stands in for the app's response iterable, counting the bytes and
    recording the request when the server closes it (PEP 3333)."""

    def __init__(
        self, requests: WsgiRequests, environ: Environ, start_response: StartResponse, admitted: int
    ) -> None:
        self.requests: WsgiRequests | None = requests
        self.environ = environ
        self._start_response = start_response
        self.start = now_ns()
        self.status = ""
        self.body: Iterable[bytes] = ()
        self.bytes_out = 0
        self.first_byte = 0
        self.error_kind = _NONE
        self.admitted = admitted  # the recorder's admit() token

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.status = status
        return self._start_response(status, headers, exc_info)

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self.body:
                if not self.first_byte:
                    self.first_byte = now_ns()
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
        requests, self.requests = self.requests, None  # once, however often closed
        if requests is not None:
            requests.finish(self, error_kind)
