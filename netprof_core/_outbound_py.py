# cython: language_level=3, embedsignature=True, annotation_typing=False
"""The per-request work of the outbound hooks (``netprof_core.clients``): the
one ``record`` every client hook ends in, and httpx's reading of a request.

This one source runs twice: as it is, and compiled by Cython as
``_outbound_c`` (``_outbound_c.py`` is a link to this file; ``_outbound_c.pxd``
gives it C types), so the two can never drift. Keep it to what Cython compiles
from plain Python: no ``cython`` import (annotations are for type checkers only).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import _instrumentation
from ._clock import now_ns
from ._failures import error_kind_of
from ._instrumentation import timed, timed_async
from ._layout import Direction, ErrorKind
from .hooks import ROUTE_CACHE_LIMIT, awaiting_for, content_length, cython_core

if TYPE_CHECKING:
    from typing_extensions import Self

    from .recorder import Recorder

PathTemplate = Callable[[str], str]

_OUTBOUND = Direction.OUTBOUND
_EXCEPTION = int(ErrorKind.EXCEPTION)
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class OutboundHook:
    """Where one instrumentation records, and how it names routes."""

    def __init__(self, recorder: Recorder, path_template: PathTemplate | None) -> None:
        self.recorder = recorder
        self.path_template = path_template
        self.routes: dict[tuple[str, str, int | None], int] = {}
        self.last_route: tuple[str, str, int | None, int] = ("", "", None, 0)  # no method is ""
        self.record_call = recorder.record
        self.core = cython_core(recorder)

    def record(
        self,
        method: str,
        host: str,
        port: int | None,
        url: object,
        status: int,
        start_ns: int,
        end_ns: int,
        bytes_in: int,
        bytes_out: int,
        exc: BaseException | None,
    ) -> None:
        """The one call every client hook ends in. ``host`` is IDNA-encoded,
        ``port`` None for the scheme's default; ``url`` is read only by a path template."""
        if self.path_template is not None:
            route = self._route(method, host, port, url)
        else:
            # Most calls go where the previous one went: compared with it, the
            # request's new strings need not be hashed for the dict.
            last = self.last_route
            if last[1] == host and last[2] == port and last[0] == method:
                route = last[3]
            else:
                route = self.routes.get((method, host, port))  # type: ignore[assignment]
                if route is None:
                    route = self._route(method, host, port, url)
                self.last_route = (method, host, port, route)  # one tuple: threads see all of it or none
        error_kind = 0 if exc is None else failure_kind(exc)
        if self.core is not None:
            try:  # compiled beside the Cython core: a C call
                self.core.record_ints(route, status, start_ns, end_ns, bytes_in, bytes_out, error_kind, 0)
                return
            except (OverflowError, TypeError):
                # A number no C integer holds (a server's Content-Length of
                # 2**64 - 1, say): record()'s rules decide, as in the twin.
                pass
        self.record_call(route, status, start_ns, end_ns, bytes_in, bytes_out, error_kind)

    def _route(self, method: str, host: str, port: int | None, url: object) -> int:
        # Without a path template the recorder is asked once per host; after
        # that, record() finds the route without even making its name.
        template = host_template(host, port)
        if self.path_template is not None:
            return self.recorder.route_id(template + self.path_template(str(url)), method, _OUTBOUND)
        route = self.recorder.route_id(template, method, _OUTBOUND)
        if len(self.routes) < ROUTE_CACHE_LIMIT:  # past it (a crawler, say), ask each time
            self.routes[method, host, port] = route
        return route

    def httpx_done(self, request: Any, response: Any, exc: BaseException | None, start_ns: int) -> None:
        """Records an httpx request sent at ``start_ns``: its response, or the exception it raised."""
        end_ns = now_ns()
        try:
            # httpx's own attributes where it has them: its public properties
            # (content, raw_host, headers.get) are Python code, most of this hook's cost.
            content = getattr(
                request, "_content", None
            )  # a body given whole is read when the request is made
            if content is not None:
                bytes_out = len(content)
            else:  # streamed, or a redirect's copy: its header, if any
                bytes_out = content_length(request.headers.get("content-length"))
            status = bytes_in = 0
            if response is not None:
                status = response.status_code
                bytes_in = _httpx_response_length(response.headers)
            url = request.url
            try:
                # The parsed URL: IDNA-encoded host, port None when the default.
                parsed = url._uri_reference
                host, port = parsed.host, parsed.port
            except AttributeError:  # another httpx: the public way
                host, port = url.raw_host.decode("ascii"), url.port
            self.record(request.method, host, port, url, status, start_ns, end_ns, bytes_in, bytes_out, exc)
        except Exception as error:  # noqa: BLE001 - an exception inside netprof never reaches the application
            self.recorder.internal_error(error)

    def requests_done(self, request: Any, response: Any, exc: BaseException | None, start_ns: int) -> None:
        """Records a requests request sent at ``start_ns``: its response, or the exception it raised."""
        end_ns = now_ns()
        try:
            url = urlsplit(request.url)
            bytes_out = content_length(request.headers.get("Content-Length"))
            status = bytes_in = 0
            if response is not None:
                status = response.status_code
                bytes_in = content_length(response.headers.get("Content-Length"))
            host, port, method = url.hostname or "", explicit_port(url.scheme, url.port), request.method
            self.record(method, host, port, request.url, status, start_ns, end_ns, bytes_in, bytes_out, exc)
        except Exception as error:  # noqa: BLE001 - an exception inside netprof never reaches the application
            self.recorder.internal_error(error)


class HttpxTransport:
    """Times each request of the httpx transport it wraps. It has
    ``httpx.BaseTransport``'s interface; not its class, which would import httpx."""

    def __init__(self, inner: Any, hook: OutboundHook) -> None:
        self.inner = inner
        self.hook = hook

    def handle_request(self, request: Any) -> Any:
        if (
            _instrumentation.active is not None
        ):  # instrument() too: timed() keeps its patch beneath from recording again
            return timed(self.hook.httpx_done, request, self.inner.handle_request, request)
        # timed(), inlined: the hot path of an instrumented client.
        start_ns = now_ns()
        try:
            response = self.inner.handle_request(request)
        except BaseException as exc:
            self.hook.httpx_done(request, None, exc, start_ns)
            raise
        self.hook.httpx_done(request, response, None, start_ns)
        return response

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> Self:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.inner.__exit__(*exc_info)


class AsyncHttpxTransport:
    """``HttpxTransport`` for ``httpx.AsyncBaseTransport``. Its requests are
    awaited through ``awaiting`` (``_awaiting_c.pyx``): beside the Cython core,
    C code where an ``async def`` would be one more coroutine per request."""

    def __init__(self, inner: Any, hook: OutboundHook) -> None:
        self.inner = inner
        self.hook = hook
        self.awaiting = awaiting_for(hook.recorder)
        self.done = hook.httpx_done  # bound once, not per request

    def handle_async_request(self, request: Any) -> Awaitable[Any]:
        if _instrumentation.active is not None:  # see HttpxTransport
            return timed_async(self.done, request, self.inner.handle_async_request, request)
        start_ns = now_ns()
        try:
            sending = self.inner.handle_async_request(request)
        except BaseException as exc:  # a transport that fails before it is awaited
            self.done(request, None, exc, start_ns)
            raise
        return self.awaiting(sending, self.done, request, start_ns)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.inner.__aexit__(*exc_info)


def _httpx_response_length(headers: Any) -> int:
    # httpx's own (raw name, lower-cased name, value) triples: its public
    # views (raw, get) build a new list or decode every header first.
    try:
        triples = headers._list
    except AttributeError:  # another httpx: the public way
        return content_length(headers.get("content-length"))
    for _, name, value in triples:
        if name == b"content-length":
            return _decimal(value)
    return 0


def _decimal(digits: bytes) -> int:
    """A header's decimal value; 0 when it is not one, or beyond
    MAX_CONTENT_LENGTH (as ``content_length``). (Compiled, a C loop: int() on
    bytes costs more than the rest of the header scan.)"""
    if not digits.isdigit():
        return 0
    if len(digits) > 18:  # more than the loop's 64-bit number holds
        return content_length(digits.decode("ascii"))
    number = 0
    for digit in digits:
        number = number * 10 + (digit - 48)
    return number


def failure_kind(exc: BaseException) -> int:
    """``error_kind_of(exc)``; EXCEPTION for an exception that cannot even
    be looked at (its attributes raise): the application's, not netprof's error."""
    try:
        return int(error_kind_of(exc))
    except Exception:  # noqa: BLE001
        return _EXCEPTION


def host_template(host: str, port: int | None) -> str:
    if ":" in host:
        host = f"[{host}]"  # IPv6
    return host if port is None else f"{host}:{port}"


def explicit_port(scheme: str, port: int | None) -> int | None:
    """``port``, or None when it is the scheme's default."""
    return None if port == _DEFAULT_PORTS.get(scheme) else port
