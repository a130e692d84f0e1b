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
unchanged. Every hook ends in ``OutboundHook.record`` (in ``_outbound_py.py``):
one ``Recorder.record`` call.

The client libraries are imported only when they are hooked: none is required.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import _instrumentation
from ._failures import error_kind_of
from ._hookpaths import hook_path
from ._instrumentation import timed, timed_async
from ._outbound_py import OutboundHook, explicit_port
from .hooks import MAX_CONTENT_LENGTH, content_length, get_recorder
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

_MISSING = object()
_patches: list[tuple[type, str, object, object]] = []  # owner, name, original (or _MISSING), patch

_lock = threading.Lock()


def _hook(recorder: Recorder | None, path_template: PathTemplate | None) -> OutboundHook:
    """A hook recording into ``recorder`` (by default the process's), with
    the per-request code that matches its core (see _outbound_py.py)."""
    recorder = recorder if recorder is not None else get_recorder()
    return hook_path("outbound", recorder.implementation).OutboundHook(recorder, path_template)  # type: ignore[no-any-return]


# -- the public API ---------------------------------------------------------------------


def instrument(recorder: Recorder | None = None, *, path_template: PathTemplate | None = None) -> None:
    """Record the outbound requests of every installed client library into
    ``recorder`` (by default the process's): httpx's default transports,
    requests' ``HTTPAdapter`` and the aiohttp sessions made from now on. A
    second call replaces the first's settings; a request is still recorded once."""
    hook = _hook(recorder, path_template)
    with _lock:
        _instrumentation.active = hook
        if _patches:
            return
        for install in (_install_httpx, _install_requests, _install_aiohttp):
            try:
                install()
            except ImportError:
                continue  # not installed
            except Exception as exc:  # noqa: BLE001 - a library version we do not know: the others still work
                recorder_logger.error(
                    "netprof: cannot hook %s: %r", install.__name__[len("_install_") :], exc
                )


def uninstrument() -> None:
    """Undo ``instrument()``: the original methods are back and nothing more is recorded."""
    with _lock:
        _instrumentation.active = None
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

    hook = _hook(recorder, path_template)
    twin = hook_path("outbound", hook.recorder.implementation)  # the one that matches the hook's core
    wrapper: type = twin.AsyncHttpxTransport if isinstance(client, httpx.AsyncClient) else twin.HttpxTransport
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
    hook = _hook(recorder, path_template)
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
    return _trace_config(_hook(recorder, path_template))


# -- shared by the clients ----------------------------------------------------------------


def _patch(owner: type, name: str, make_patch: Callable[[Any], Any]) -> None:
    replacement = make_patch(getattr(owner, name))
    _patches.append((owner, name, owner.__dict__.get(name, _MISSING), replacement))
    setattr(owner, name, replacement)


# -- httpx ----------------------------------------------------------------------------------


_WRAPPERS = tuple(
    {
        wrapper
        for core in ("cython", "python")
        for wrapper in (
            hook_path("outbound", core).HttpxTransport,
            hook_path("outbound", core).AsyncHttpxTransport,
        )
    }
)


def _wrap_transport(transport: Any, hook: OutboundHook, wrapper: type) -> Any:
    if isinstance(transport, _WRAPPERS):
        # Instrumented again: the latest settings, still one record (a wrapper
        # of the twin that matches the new hook's core, around the same transport).
        if type(transport) is wrapper:
            transport.hook = hook  # type: ignore[attr-defined]
            return transport
        transport = transport.inner
    return wrapper(transport, hook)


def _install_httpx() -> None:
    import httpx

    def sync_patch(original: Any) -> Any:
        @functools.wraps(original)
        def handle_request(self: Any, request: Any) -> Any:
            hook = _instrumentation.active
            if hook is None or _instrumentation.timing.get():
                return original(self, request)
            return timed(hook.httpx_done, request, original, self, request)

        return handle_request

    def async_patch(original: Any) -> Any:
        @functools.wraps(original)
        async def handle_async_request(self: Any, request: Any) -> Any:
            hook = _instrumentation.active
            if hook is None or _instrumentation.timing.get():
                return await original(self, request)
            return await timed_async(hook.httpx_done, request, original, self, request)

        return handle_async_request

    _patch(httpx.HTTPTransport, "handle_request", sync_patch)
    _patch(httpx.AsyncHTTPTransport, "handle_async_request", async_patch)


# -- requests ---------------------------------------------------------------------------------


class _TimedSend:
    """An adapter's ``send``, timed. Set on the adapter instance, so the session
    keeps its own adapter objects, with their settings."""

    __slots__ = ("hook", "send")

    def __init__(self, hook: OutboundHook, send: Callable[..., Any]) -> None:
        self.hook = hook
        self.send = send

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return timed(self.hook.requests_done, request, self.send, request, *args, **kwargs)


def _install_requests() -> None:
    import requests.adapters

    def patch(original: Any) -> Any:
        @functools.wraps(original)
        def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            hook = _instrumentation.active
            if hook is None or _instrumentation.timing.get():
                return original(self, request, *args, **kwargs)
            return timed(hook.requests_done, request, original, self, request, *args, **kwargs)

        return send

    _patch(requests.adapters.HTTPAdapter, "send", patch)


# -- aiohttp ----------------------------------------------------------------------------------

_our_trace_configs: weakref.WeakSet[Any] = weakref.WeakSet()


def _aiohttp_done(
    hook: OutboundHook | None, ctx: Any, params: Any, response: Any, exc: BaseException | None
) -> None:
    end_ns = time.monotonic_ns()
    start_ns = getattr(ctx, "netprof_start_ns", None)
    if hook is None or start_ns is None:
        return
    try:
        status = bytes_in = bytes_out = 0
        if response is not None:
            status = response.status
            bytes_in = response.content_length or 0  # aiohttp's parse of the header: any int
            if not 0 <= bytes_in <= MAX_CONTENT_LENGTH:
                bytes_in = 0  # as content_length() takes a length no counter holds
            bytes_out = content_length(response.request_info.headers.get("Content-Length"))
        elif isinstance(exc, sys.modules["aiohttp"].ClientResponseError):
            status = exc.status  # raise_for_status: there was a response
        url = params.url
        host, port = url.raw_host or "", explicit_port(url.scheme, url.port)
        hook.record(params.method, host, port, url, status, start_ns, end_ns, bytes_in, bytes_out, exc)
    except Exception as error:  # noqa: BLE001 - an exception inside netprof never reaches the application
        hook.recorder.internal_error(error)


def _trace_config(hook: OutboundHook | None) -> aiohttp.TraceConfig:
    """A trace config recording into ``hook``; with None, into instrument()'s
    hook of the moment (none after uninstrument())."""
    import aiohttp

    async def on_request_start(session: Any, ctx: Any, params: Any) -> None:
        ctx.netprof_start_ns = time.monotonic_ns()

    async def on_request_redirect(session: Any, ctx: Any, params: Any) -> None:
        # Each hop is a request of its own, as httpx and requests see them.
        # aiohttp says so before it knows whether it will follow: the next
        # hop's clock starts only when that hop takes a connection.
        _aiohttp_done(hook or _instrumentation.active, ctx, params, params.response, None)
        ctx.netprof_start_ns = None

    async def on_connection(session: Any, ctx: Any, params: Any) -> None:
        if getattr(ctx, "netprof_start_ns", 0) is None:
            ctx.netprof_start_ns = time.monotonic_ns()

    async def on_request_end(session: Any, ctx: Any, params: Any) -> None:
        _aiohttp_done(hook or _instrumentation.active, ctx, params, params.response, None)

    async def on_request_exception(session: Any, ctx: Any, params: Any) -> None:
        _aiohttp_done(hook or _instrumentation.active, ctx, params, None, params.exception)

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
            if _instrumentation.active is None or any(
                config in _our_trace_configs for config in trace_configs or ()
            ):
                return trace_configs
            return [*(trace_configs or ()), everywhere]
        except Exception as error:  # noqa: BLE001 - an exception inside netprof never reaches the application
            if (hook := _instrumentation.active) is not None:
                hook.recorder.internal_error(error)
            return trace_configs

    def patch(original: Any) -> Any:
        @functools.wraps(original)
        def __init__(self: Any, *args: Any, trace_configs: Any = None, **kwargs: Any) -> None:
            original(self, *args, trace_configs=with_ours(trace_configs), **kwargs)

        return __init__

    _patch(aiohttp.ClientSession, "__init__", patch)
