"""Why an outbound request failed: the kinds of ``ErrorKind`` read from a
client library's exception and the exceptions it wraps."""

from __future__ import annotations

import errno
import socket
import sys

from ._layout import ErrorKind

__all__ = ("error_kind_of",)


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
