"""A small client of netprofd's API for the ``netprof`` CLI and the demo
(the standard library's urllib: the CLI needs nothing more)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

from ._display import printable

__all__ = ("DEFAULT_URL", "DaemonClient", "DaemonError")

DEFAULT_URL = "http://127.0.0.1:9465"
PREFIX = "/api/v1/debug"


class DaemonError(Exception):
    """netprofd could not be reached, or refused the call: the message says which."""


class DaemonClient:
    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("NETPROF_API_KEY")
        self.timeout = timeout

    def _open(self, method: str, path: str, params: Mapping[str, Any] | None = None) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
        request = urllib.request.Request(f"{self.url}{path}{'?' + query if query else ''}", method=method)
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):  # not JSON, or not an object
                reason = exc.reason
            # The reason is the answer's text: whatever is at the URL wrote it.
            raise DaemonError(printable(f"{method} {self.url}{path}: HTTP {exc.code}: {reason}")) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DaemonError(printable(f"cannot reach netprofd at {self.url}: {reason}")) from None

    def get(self, path: str, **params: Any) -> Any:
        with self._open("GET", path, params) as response:
            return json.loads(response.read())

    def post(self, path: str, **params: Any) -> Any:
        with self._open("POST", path, params) as response:
            return json.loads(response.read())

    def stream(self, path: str, **params: Any) -> Iterator[bytes]:
        with self._open("GET", path, params) as response:
            while chunk := response.read(64 * 1024):
                yield chunk

    # -- the calls ------------------------------------------------------------------

    def network_stats(self, window: str = "1m", app: str | None = None, slowest: int = 0) -> Any:
        return self.get(f"{PREFIX}/network-stats", window=window, app=app, slowest=slowest)

    def control(self, action: str, app: str | None = None) -> Any:
        """``enable``, ``disable``, ``force-cleanup`` or ``reset-errors``."""
        return self.post(f"{PREFIX}/network-profiling/{action}", app=app)

    def alerts(self) -> Any:
        return self.get(f"{PREFIX}/network-profiling/alerts", history=20)

    def production_metrics(self) -> Any:
        return self.get(f"{PREFIX}/network-profiling/production-metrics")
