"""netprofd's HTTP listener: aiohttp's server on sockets bound to the very
addresses the configuration checked, with the limits aiohttp leaves to its
application (a cap on connections is "the application's duty",
aio-libs/aiohttp#675):

- at most ``max_connections`` open at once (lowered to a quarter of
  RLIMIT_NOFILE, so that connections never take the descriptors the segments
  need). At the cap a new connection closes the one idle longest (no request
  under way); when every one is busy it is answered 503 and closed at once.
  Both are counted on /metrics.
- a connection must send a whole request within ``idle_timeout_seconds`` of
  its opening or of its last answer: idle, slow (a header byte now and then)
  and partial requests are closed alike. A request's body is given as long
  (api.read_json_body).
- every answer that aiohttp makes itself (a request its parser refuses, a bug
  of ours) is JSON, and logged as one line at most: the first of a minute,
  then a count (RateLimitedLog), never a traceback for a client's junk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from netprof_core._display import shorten

from .config import ListenAddress
from .log import api_logger

__all__ = ("BACKLOG", "Listener", "RateLimitedLog", "connection_cap")

# Connections the kernel completes before netprofd accepts them: a burst
# may hold this many descriptors beyond the cap for a moment.
BACKLOG = 128
# Connections may take at most this share of RLIMIT_NOFILE: the rest is for
# the segments (two descriptors each), sqlite and the notifiers.
CONNECTION_SHARE = 4
MIN_CONNECTIONS = 8
# Time the requests under way are given at a stop.
SHUTDOWN_SECONDS = 5.0
# Of a parser's message, what is echoed back and logged.
MAX_DETAIL = 200

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def connection_cap(wanted: int) -> int:
    """``wanted`` (daemon.max_connections), or less where RLIMIT_NOFILE is low."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(MIN_CONNECTIONS, min(wanted, soft // CONNECTION_SHARE))


class RateLimitedLog:
    """The first event of a period logged as it is, the others counted and
    told in one line at the period's end (or at flush())."""

    def __init__(
        self, logger: logging.Logger, what: str, *, period: float = 60.0, level: int = logging.WARNING
    ) -> None:
        self.logger = logger
        self.what = what
        self.period = period
        self.level = level
        self._until = 0.0
        self._more = 0
        self._last = ""
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, message: str, *args: object, exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        if now >= self._until:
            self.flush()
            self._until = now + self.period
            self.logger.log(self.level, message, *args, exc_info=exc_info)
            return
        self._more += 1
        self._last = message % args if args else message
        if self._timer is None:
            with contextlib.suppress(RuntimeError):  # no loop running: told at the next flush()
                self._timer = asyncio.get_running_loop().call_later(self._until - now, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._more:
            self.logger.log(
                self.level,
                "%d more %s since the one logged (the last: %s)",
                self._more,
                self.what,
                self._last,
            )
            self._more = 0


def _one_line(text: str) -> str:
    return shorten(" ".join(text.split()), MAX_DETAIL)


def _describe(exc: BaseException | None, message: str | None) -> str:
    """What was wrong with a request aiohttp's parser refused, for the client."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the limit of"
        return f"malformed HTTP request: the request line or a header is longer than {limit} bytes"
    if isinstance(exc, HttpProcessingError) and exc.message:
        message = exc.message
    return f"malformed HTTP request: {_one_line(message or 'cannot be parsed')}"


def _json_answer(status: int, message: str) -> web.Response:
    response = web.json_response({"error": message, "status": status}, status=status)
    response.force_close()
    return response


_FULL_BODY = json.dumps(
    {"error": "netprofd has as many connections open as it takes, all busy: try again", "status": 503}
).encode()
_FULL_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(_FULL_BODY), _FULL_BODY)
)


class _Refused(asyncio.Protocol):
    """A connection beyond the cap: answered 503 (a best effort) and closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_FULL_ANSWER)
        transport.close()


class _Connection(web.RequestHandler):
    """aiohttp's handler of one connection, with the listener's accounting:
    whether a request is under way, and the deadline of the next one."""

    __slots__ = ("_deadline", "_listener", "busy")

    def __init__(self, listener: Listener, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._listener = listener
        self.busy = 0  # requests of this connection in the app's handlers
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._listener.opened(self)
        self.rest()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._listener.closed(self)
        self.work()
        super().connection_lost(exc)

    def work(self) -> None:
        """A request is under way: its body has the handler's own deadline."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def rest(self) -> None:
        """Between requests: closed unless a whole request comes in time
        (aiohttp's keep-alive timer, in the versions that arm it at the
        connection's start, says the same)."""
        self.work()
        self._deadline = asyncio.get_running_loop().call_later(self._listener.idle_timeout, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if not self.busy:
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own answers (a request its parser refused, an exception
        that escaped the app): JSON, logged one line at most."""
        if request.writer.output_size > 0:  # as aiohttp: the answer has begun, the connection ends
            raise ConnectionError("the answer had begun: the connection is closed instead")
        return self._listener.error_answer(request, status, exc, message)


class Listener:
    """The aiohttp app on the checked addresses, with the limits above."""

    def __init__(
        self,
        app: web.Application,
        addresses: list[ListenAddress],
        *,
        max_connections: int,
        idle_timeout: float,
    ) -> None:
        self.addresses = addresses
        self.max_connections = connection_cap(max_connections)
        self.idle_timeout = idle_timeout
        self.refused = 0  # beyond the cap, every connection busy
        self.evicted = 0  # idle ones closed at the cap to make room
        self.malformed = 0  # requests aiohttp's parser refused
        # Open connections, the one idle longest first (moved last after each answer).
        self._open: dict[_Connection, None] = {}
        self._servers: list[asyncio.AbstractServer] = []
        app.middlewares.insert(0, self._track)  # the outermost: it sees every request of the app
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS
        )
        self._malformed_log = RateLimitedLog(api_logger, "malformed requests")
        self._error_log = RateLimitedLog(api_logger, "internal errors", level=logging.ERROR)
        self._full_log = RateLimitedLog(api_logger, "connections closed at the cap")

    async def start(self) -> list[tuple[str, int]]:
        """Bind every address and serve; the (host, port) bound, each once."""
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        bound = []
        try:
            for family, sockaddr in self.addresses:
                sock = _listening_socket(family, sockaddr)
                self._servers.append(await loop.create_server(self._accept, sock=sock, backlog=BACKLOG))
                bound.append(tuple(sock.getsockname()[:2]))
        except BaseException:
            await self.stop()
            raise
        return bound

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        await self._runner.cleanup()  # the requests under way get SHUTDOWN_SECONDS
        for log in (self._malformed_log, self._error_log, self._full_log):
            log.flush()

    # -- connections ------------------------------------------------------------------

    def _accept(self) -> asyncio.BaseProtocol:
        if len(self._open) >= self.max_connections and not self._evict():
            self.refused += 1
            self._full_log(
                "%d HTTP connections open, all busy (daemon.max_connections): a new one was refused",
                len(self._open),
            )
            return _Refused()
        server = self._runner.server
        assert server is not None
        return _Connection(
            self,
            server,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=self.idle_timeout,
            access_log=None,
        )

    def _evict(self) -> bool:
        """Close the connection idle longest, if one is idle."""
        for connection in self._open:
            if not connection.busy:
                del self._open[connection]  # (the loop ends here)
                connection.force_close()
                self.evicted += 1
                self._full_log(
                    "%d HTTP connections open (daemon.max_connections): the one idle longest was closed",
                    self.max_connections,
                )
                return True
        return False

    def opened(self, connection: _Connection) -> None:
        self._open[connection] = None

    def closed(self, connection: _Connection) -> None:
        self._open.pop(connection, None)

    @web.middleware
    async def _track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        connection = request.protocol
        if not isinstance(connection, _Connection):
            return await handler(request)
        connection.busy += 1
        connection.work()
        try:
            return await handler(request)
        finally:
            connection.busy -= 1
            if not connection.busy and connection in self._open:
                del self._open[connection]
                self._open[connection] = None  # now the one idle for the shortest time
                connection.rest()

    # -- aiohttp's own answers ----------------------------------------------------------

    def error_answer(
        self, request: web.BaseRequest, status: int, exc: BaseException | None, message: str | None
    ) -> web.Response:
        if status >= 500:
            self._error_log("%s %s failed", request.method, request.path, exc_info=exc)
            if status == 504:
                return _json_answer(status, "the request took too long")
            return _json_answer(status, "internal error in netprofd; see its log")
        self.malformed += 1
        text = _describe(exc, message)
        self._malformed_log("%s from %s", text, request.remote)
        return _json_answer(status, text)

    # -- /metrics -----------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("netprofd_http_connections", "HTTP connections open", value=len(self._open))
        yield GaugeMetricFamily(
            "netprofd_http_max_connections",
            "The cap on HTTP connections in force (daemon.max_connections, or a quarter of RLIMIT_NOFILE)",
            value=self.max_connections,
        )
        closed = CounterMetricFamily(
            "netprofd_http_connections_closed",
            "HTTP connections closed at the cap: the one idle longest to make room (evicted), "
            "or the new one when all were busy (refused)",
            labels=["reason"],
        )
        closed.add_metric(["evicted"], self.evicted)
        closed.add_metric(["refused"], self.refused)
        yield closed
        yield CounterMetricFamily(
            "netprofd_http_malformed_requests", "Requests refused by the HTTP parser", value=self.malformed
        )


def _listening_socket(family: socket.AddressFamily, sockaddr: tuple[Any, ...]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # this address only, not every IPv4 one too
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
