"""Outbound hooks for the HTTP clients httpx, requests and aiohttp.

``instrument()`` hooks every installed client library, ``uninstrument()``
undoes it; ``instrument_httpx_client``, ``instrument_requests_session`` and
``aiohttp_trace_config`` hook one client::

    from netprof_core.clients import instrument
    instrument()                      # the process's recorder; or instrument(recorder)

Each request is recorded on the route ``host[:port]`` (the default port left
out), plus ``path_template(url)`` when that function is given (it gets the URL
as a string), timed from the send until the response headers arrive; each hop
of a redirect is a request. A request that fails is recorded with the kind of
its failure (``error_kind_of``), and its exception goes on to the application
unchanged. Every hook ends in ``_Hook.record``: one ``Recorder.record`` call.

The client libraries are imported only when they are hooked: none is required.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import socket
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from ._layout import Direction, ErrorKind
from .hooks import ROUTE_CACHE_LIMIT, content_length, get_recorder
from .log import recorder_logger
from .recorder import Recorder

if TYPE_CHECKING:
    import aiohttp

__all__ = (
    "aiohttp_trace_config",
    "error_kind_of",
    "instrument",
    "instrument_httpx_client",
    "instrument_requests_session",
    "uninstrument",
)

PathTemplate = Callable[[str], str]
C = TypeVar("C")
# Called once a request is over: (hook, request, response or None, exception or None, start_ns).
_Done = Callable[["_Hook", Any, Any, "BaseException | None", int], None]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_OUTBOUND = Direction.OUTBOUND
_MISSING = object()

_lock = threading.Lock()
# instrument()'s hook, read by the patched methods on every call; None when not instrumented.
_active: _Hook | None = None
_patches: list[tuple[type, str, object, object]] = []  # owner, name, original (or _MISSING), patch
# Set while a hook times a request when instrument() is active too, so that its
# patch of a transport or adapter beneath an instrumented client does not record
# the request a second time.
_timing: contextvars.ContextVar[bool] = contextvars.ContextVar("netprof_timing", default=False)


class _Hook:
    """Where one instrumentation records, and how it names routes."""

    __slots__ = ("_routes", "path_template", "recorder")

    def __init__(self, recorder: Recorder | None, path_template: PathTemplate | None) -> None:
        self.recorder = recorder if recorder is not None else get_recorder()
        self.path_template = path_template
        self._routes: dict[tuple[str, str, int | None], int] = {}

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
        route = self._routes.get((method, host, port)) if self.path_template is None else None
        if route is None:
            route = self._route(method, host, port, url)
        error_kind = 0 if exc is None else error_kind_of(exc)
        self.recorder.record(route, status, start_ns, end_ns, bytes_in, bytes_out, error_kind)

    def _route(self, method: str, host: str, port: int | None, url: object) -> int:
        # Without a path template the recorder is asked once per host; after
        # that, record() finds the route without even making its name.
        template = _host_template(host, port)
        if self.path_template is not None:
            return self.recorder.route_id(template + self.path_template(str(url)), method, _OUTBOUND)
        route = self.recorder.route_id(template, method, _OUTBOUND)
        if len(self._routes) < ROUTE_CACHE_LIMIT:  # past it (a crawler, say), ask each time
            self._routes[method, host, port] = route
        return route


# -- the public API ---------------------------------------------------------------------


def instrument(recorder: Recorder | None = None, *, path_template: PathTemplate | None = None) -> None:
    """Record the outbound requests of every installed client library into
    ``recorder`` (by default the process's): httpx's default transports,
    requests' ``HTTPAdapter`` and the aiohttp sessions made from now on. A
    second call replaces the first's settings; a request is still recorded once."""
    global _active
    hook = _Hook(recorder, path_template)
    with _lock:
        _active = hook
        if _patches:
            return
        for install in (_install_httpx, _install_requests, _install_aiohttp):
            try:
                install()
            except ImportError:
                continue  # not installed
            except Exception as exc:  # a library version we do not know: the others still work
                recorder_logger.error("netprof: cannot hook %s: %r", install.__name__[len("_install_"):], exc)


def uninstrument() -> None:
    """Undo ``instrument()``: the original methods are back and nothing more is recorded."""
    global _active
    with _lock:
        _active = None
        while _patches:
            owner, name, original, replacement = _patches.pop()
            if owner.__dict__.get(name) is not replacement:
                # Patched again over ours: taking ours out would take theirs too.
                # Ours stays underneath, inert now that no hook is active.
                recorder_logger.warning("netprof: %s.%s was patched after netprof; left as is", owner, name)
            elif original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def instrument_httpx_client(
    client: C, recorder: Recorder | None = None, *, path_template: PathTemplate | None = None
) -> C:
    """Record the requests of one ``httpx.Client`` or ``httpx.AsyncClient`` (its
    transport and mounts are wrapped). Returns the client."""
    import httpx

    hook = _Hook(recorder, path_template)
    wrapper = _AsyncTransport if isinstance(client, httpx.AsyncClient) else _Transport
    # httpx has no public way to reach an existing client's transports.
    client._transport = _wrap_transport(client._transport, hook, wrapper)  # type: ignore[attr-defined]
    mounts = client._mounts  # type: ignore[attr-defined]
    for pattern, transport in mounts.items():
        if transport is not None:
            mounts[pattern] = _wrap_transport(transport, hook, wrapper)
    return client


def instrument_requests_session(
    session: C, recorder: Recorder | None = None, *, path_template: PathTemplate | None = None
) -> C:
    """Record the requests of one ``requests.Session``, through the adapters
    mounted on it at this call. Returns the session."""
    hook = _Hook(recorder, path_template)
    for adapter in session.adapters.values():  # type: ignore[attr-defined]
        current = getattr(adapter, "__dict__", {}).get("send")
        if isinstance(current, _TimedSend):
            current.hook = hook  # instrumented again: the latest settings, still one record
        else:
            adapter.send = _TimedSend(hook, adapter.send)
    return session


def aiohttp_trace_config(
    recorder: Recorder | None = None, *, path_template: PathTemplate | None = None
) -> aiohttp.TraceConfig:
    """A trace config recording one session's requests:
    ``aiohttp.ClientSession(trace_configs=[aiohttp_trace_config()])``."""
    return _trace_config(_Hook(recorder, path_template))


def error_kind_of(exc: BaseException) -> ErrorKind:
    """Why a request failed, from its exception and the exceptions it wraps."""
    timeouts, dns, connection = _failure_types()
    kind = ErrorKind.EXCEPTION
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, timeouts):
            return ErrorKind.TIMEOUT
        if isinstance(link, ConnectionRefusedError) or getattr(link, "errno", None) == errno.ECONNREFUSED:
            return ErrorKind.CONNECTION_REFUSED
        if isinstance(link, dns):
            return ErrorKind.DNS
        if isinstance(link, connection):
            kind = ErrorKind.CONNECTION  # unless a more telling cause comes further down
        link = link.__cause__ if link.__cause__ is not None else link.__context__
    return kind


# -- shared by the clients ----------------------------------------------------------------


def _failure_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """Timeout, DNS and connection exception types of the client libraries
    loaded (one that is not cannot have raised)."""
    timeouts: list[type] = [TimeoutError]  # also asyncio.TimeoutError and aiohttp's timeouts
    dns: list[type] = [socket.gaierror, socket.herror]
    connection: list[type] = [OSError]  # also ConnectionError and aiohttp.ClientOSError
    if (httpx := sys.modules.get("httpx")) is not None:
        timeouts.append(httpx.TimeoutException)
        connection.append(httpx.NetworkError)
    if (requests := sys.modules.get("requests")) is not None:
        timeouts.append(requests.Timeout)
        connection.append(requests.ConnectionError)
    if (aiohttp := sys.modules.get("aiohttp")) is not None:
        if hasattr(aiohttp, "ClientConnectorDNSError"):  # aiohttp >= 3.10
            dns.append(aiohttp.ClientConnectorDNSError)
        connection.append(aiohttp.ClientConnectionError)
    return tuple(timeouts), tuple(dns), tuple(connection)


def _timed(
    done: _Done, hook: _Hook, request: Any, send: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """``send(*args, **kwargs)``; then ``done`` records ``request``, whatever happened."""
    start_ns = time.monotonic_ns()
    # Only instrument()'s patches look at _timing; without them, spare the cost.
    token = _timing.set(True) if _active is not None else None
    try:
        response = send(*args, **kwargs)
    except BaseException as exc:
        done(hook, request, None, exc, start_ns)
        raise
    finally:
        if token is not None:
            _timing.reset(token)
    done(hook, request, response, None, start_ns)
    return response


async def _timed_async(
    done: _Done, hook: _Hook, request: Any, send: Callable[..., Awaitable[Any]], *args: Any
) -> Any:
    start_ns = time.monotonic_ns()
    token = _timing.set(True) if _active is not None else None
    try:
        response = await send(*args)
    except BaseException as exc:
        done(hook, request, None, exc, start_ns)
        raise
    finally:
        if token is not None:
            _timing.reset(token)
    done(hook, request, response, None, start_ns)
    return response


def _host_template(host: str, port: int | None) -> str:
    if ":" in host:
        host = f"[{host}]"  # IPv6
    return host if port is None else f"{host}:{port}"


def _explicit_port(scheme: str, port: int | None) -> int | None:
    """``port``, or None when it is the scheme's default."""
    return None if port == _DEFAULT_PORTS.get(scheme) else port


def _patch(owner: type, name: str, make_patch: Callable[[Any], Any]) -> None:
    replacement = make_patch(getattr(owner, name))
    _patches.append((owner, name, owner.__dict__.get(name, _MISSING), replacement))
    setattr(owner, name, replacement)


# -- httpx ----------------------------------------------------------------------------------


def _httpx_done(hook: _Hook, request: Any, response: Any, exc: BaseException | None, start_ns: int) -> None:
    end_ns = time.monotonic_ns()
    try:
        try:
            bytes_out = len(request.content)  # a body given whole is read when the request is made
        except sys.modules["httpx"].RequestNotRead:  # streamed, or a redirect's copy: its header, if any
            bytes_out = content_length(request.headers.get("content-length"))
        status = bytes_in = 0
        if response is not None:
            status = response.status_code
            bytes_in = _httpx_response_length(response.headers)
        url = request.url
        try:
            # The parsed URL: IDNA-encoded host, port None when the default;
            # the public raw_host and port properties cost a fifth of this hook.
            parsed = url._uri_reference
            host, port = parsed.host, parsed.port
        except AttributeError:  # another httpx: the public way
            host, port = url.raw_host.decode("ascii"), url.port
        hook.record(request.method, host, port, url, status, start_ns, end_ns, bytes_in, bytes_out, exc)
    except Exception as error:
        hook.recorder.internal_error(error)


def _httpx_response_length(headers: Any) -> int:
    # httpx's own (raw name, lower-cased name, value) triples: its public
    # views (raw, get) build a new list or decode every header first, which
    # made up half of this hook's cost.
    try:
        triples = headers._list
    except AttributeError:  # another httpx: the public way
        return content_length(headers.get("content-length"))
    for _, name, value in triples:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


class _Transport:
    """Times each request of the httpx transport it wraps. It has
    ``httpx.BaseTransport``'s interface; not its class, which would import httpx."""

    __slots__ = ("hook", "inner")

    def __init__(self, inner: Any, hook: _Hook) -> None:
        self.inner = inner
        self.hook = hook

    def handle_request(self, request: Any) -> Any:
        if _active is not None:  # instrument() too: _timed keeps its patch beneath from recording again
            return _timed(_httpx_done, self.hook, request, self.inner.handle_request, request)
        # _timed, inlined: the hot path of an instrumented client.
        start_ns = time.monotonic_ns()
        try:
            response = self.inner.handle_request(request)
        except BaseException as exc:
            _httpx_done(self.hook, request, None, exc, start_ns)
            raise
        _httpx_done(self.hook, request, response, None, start_ns)
        return response

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> _Transport:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.inner.__exit__(*exc_info)


class _AsyncTransport:
    """``_Transport`` for ``httpx.AsyncBaseTransport``."""

    __slots__ = ("hook", "inner")

    def __init__(self, inner: Any, hook: _Hook) -> None:
        self.inner = inner
        self.hook = hook

    async def handle_async_request(self, request: Any) -> Any:
        return await _timed_async(_httpx_done, self.hook, request, self.inner.handle_async_request, request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> _AsyncTransport:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.inner.__aexit__(*exc_info)


def _wrap_transport(transport: Any, hook: _Hook, wrapper: type[_Transport | _AsyncTransport]) -> Any:
    if isinstance(transport, (_Transport, _AsyncTransport)):
        transport.hook = hook  # instrumented again: the latest settings, still one record
        return transport
    return wrapper(transport, hook)


def _install_httpx() -> None:
    import httpx

    def sync_patch(original: Any) -> Any:
        @functools.wraps(original)
        def handle_request(self: Any, request: Any) -> Any:
            hook = _active
            if hook is None or _timing.get():
                return original(self, request)
            return _timed(_httpx_done, hook, request, original, self, request)

        return handle_request

    def async_patch(original: Any) -> Any:
        @functools.wraps(original)
        async def handle_async_request(self: Any, request: Any) -> Any:
            hook = _active
            if hook is None or _timing.get():
                return await original(self, request)
            return await _timed_async(_httpx_done, hook, request, original, self, request)

        return handle_async_request

    _patch(httpx.HTTPTransport, "handle_request", sync_patch)
    _patch(httpx.AsyncHTTPTransport, "handle_async_request", async_patch)


# -- requests ---------------------------------------------------------------------------------


def _requests_done(
    hook: _Hook, request: Any, response: Any, exc: BaseException | None, start_ns: int
) -> None:
    end_ns = time.monotonic_ns()
    try:
        url = urlsplit(request.url)
        bytes_out = content_length(request.headers.get("Content-Length"))
        status = bytes_in = 0
        if response is not None:
            status = response.status_code
            bytes_in = content_length(response.headers.get("Content-Length"))
        host, port, method = url.hostname or "", _explicit_port(url.scheme, url.port), request.method
        hook.record(method, host, port, request.url, status, start_ns, end_ns, bytes_in, bytes_out, exc)
    except Exception as error:
        hook.recorder.internal_error(error)


class _TimedSend:
    """An adapter's ``send``, timed. Set on the adapter instance, so the session
    keeps its own adapter objects, with their settings."""

    __slots__ = ("hook", "send")

    def __init__(self, hook: _Hook, send: Callable[..., Any]) -> None:
        self.hook = hook
        self.send = send

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return _timed(_requests_done, self.hook, request, self.send, request, *args, **kwargs)


def _install_requests() -> None:
    import requests.adapters

    def patch(original: Any) -> Any:
        @functools.wraps(original)
        def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            hook = _active
            if hook is None or _timing.get():
                return original(self, request, *args, **kwargs)
            return _timed(_requests_done, hook, request, original, self, request, *args, **kwargs)

        return send

    _patch(requests.adapters.HTTPAdapter, "send", patch)


# -- aiohttp ----------------------------------------------------------------------------------

_our_trace_configs: weakref.WeakSet[Any] = weakref.WeakSet()


def _aiohttp_done(
    hook: _Hook | None, ctx: Any, params: Any, response: Any, exc: BaseException | None
) -> None:
    end_ns = time.monotonic_ns()
    start_ns = getattr(ctx, "netprof_start_ns", None)
    if hook is None or start_ns is None:
        return
    try:
        status = bytes_in = bytes_out = 0
        if response is not None:
            status = response.status
            bytes_in = response.content_length or 0
            bytes_out = content_length(response.request_info.headers.get("Content-Length"))
        elif isinstance(exc, sys.modules["aiohttp"].ClientResponseError):
            status = exc.status  # raise_for_status: there was a response
        url = params.url
        host, port = url.raw_host or "", _explicit_port(url.scheme, url.port)
        hook.record(params.method, host, port, url, status, start_ns, end_ns, bytes_in, bytes_out, exc)
    except Exception as error:
        hook.recorder.internal_error(error)


def _trace_config(hook: _Hook | None) -> aiohttp.TraceConfig:
    """A trace config recording into ``hook``; with None, into instrument()'s
    hook of the moment (none after uninstrument())."""
    import aiohttp

    async def on_request_start(session: Any, ctx: Any, params: Any) -> None:
        ctx.netprof_start_ns = time.monotonic_ns()

    async def on_request_redirect(session: Any, ctx: Any, params: Any) -> None:
        # Each hop is a request of its own, as httpx and requests see them.
        # aiohttp says so before it knows whether it will follow: the next
        # hop's clock starts only when that hop takes a connection.
        _aiohttp_done(hook or _active, ctx, params, params.response, None)
        ctx.netprof_start_ns = None

    async def on_connection(session: Any, ctx: Any, params: Any) -> None:
        if getattr(ctx, "netprof_start_ns", 0) is None:
            ctx.netprof_start_ns = time.monotonic_ns()

    async def on_request_end(session: Any, ctx: Any, params: Any) -> None:
        _aiohttp_done(hook or _active, ctx, params, params.response, None)

    async def on_request_exception(session: Any, ctx: Any, params: Any) -> None:
        _aiohttp_done(hook or _active, ctx, params, None, params.exception)

    config = aiohttp.TraceConfig()
    config.on_request_start.append(on_request_start)
    config.on_request_redirect.append(on_request_redirect)
    config.on_connection_create_start.append(on_connection)
    config.on_connection_reuseconn.append(on_connection)
    config.on_request_end.append(on_request_end)
    config.on_request_exception.append(on_request_exception)
    _our_trace_configs.add(config)
    return config


def _install_aiohttp() -> None:
    import aiohttp

    everywhere = _trace_config(None)

    def with_ours(trace_configs: Any) -> Any:
        try:
            # A session given a trace config of ours records through that one only.
            if _active is None or any(config in _our_trace_configs for config in trace_configs or ()):
                return trace_configs
            return [*(trace_configs or ()), everywhere]
        except Exception as error:
            if (hook := _active) is not None:
                hook.recorder.internal_error(error)
            return trace_configs

    def patch(original: Any) -> Any:
        @functools.wraps(original)
        def __init__(self: Any, *args: Any, trace_configs: Any = None, **kwargs: Any) -> None:
            original(self, *args, trace_configs=with_ours(trace_configs), **kwargs)

        return __init__

    _patch(aiohttp.ClientSession, "__init__", patch)
