"""Shared by the deployment guide's scripts: a small client of netprofd's
debug API that sends the bearer key and turns every failure into one
:class:`DaemonError` whose message names the URL and the HTTP status."""

from __future__ import annotations

import os
from typing import Any

import httpx

from netprof_core._display import printable

__all__ = ("API_KEY_ENV", "DEBUG_PREFIX", "NP_PREFIX", "DaemonClient", "DaemonError", "default_api_key")

API_KEY_ENV = "NETPROF_API_KEY"
DEBUG_PREFIX = "/api/v1/debug"
NP_PREFIX = f"{DEBUG_PREFIX}/network-profiling"


def default_api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


class DaemonError(Exception):
    """netprofd could not be reached, or refused a call. ``status`` is the
    HTTP status (None when there was no answer at all)."""

    def __init__(self, url: str, message: str, status: int | None = None) -> None:
        where = f"{url}: HTTP {status}" if status is not None else url
        # The message is the daemon's text (or whatever answers at the URL): shown escaped.
        super().__init__(printable(f"{where}: {message}"))
        self.url = url
        self.status = status

    @property
    def auth_failed(self) -> bool:
        return self.status in (401, 403)


def _explain(response: httpx.Response) -> str:
    try:
        message = str(response.json().get("error") or response.reason_phrase)
    except (ValueError, AttributeError):
        message = response.reason_phrase or "unexpected answer"
    if response.status_code == 401:
        message += f" (check --api-key or {API_KEY_ENV})"
    return message


class DaemonClient:
    """Synchronous calls to one netprofd (``base_url``: scheme, host and port)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, method: str, path: str, **params: str) -> Any:
        """The JSON answer of ``method path``; DaemonError unless it is a 2xx."""
        url = f"{self.base_url}{path}"
        try:
            response = self._http.request(method, path, params=params or None)
        except httpx.HTTPError as exc:
            raise DaemonError(url, f"cannot reach netprofd ({type(exc).__name__}: {exc})") from None
        if not response.is_success:
            raise DaemonError(url, _explain(response), response.status_code)
        try:
            return response.json()
        except ValueError:
            status = response.status_code
            raise DaemonError(url, "the answer is not JSON (is this netprofd?)", status) from None

    def get(self, path: str, **params: str) -> Any:
        return self.call("GET", path, **params)

    def post(self, path: str, **params: str) -> Any:
        return self.call("POST", path, **params)

    # -- the guide's calls ---------------------------------------------------------

    def production_metrics(self, app: str | None = None) -> dict[str, Any]:
        return self.get(f"{NP_PREFIX}/production-metrics", **_app(app))  # type: ignore[no-any-return]

    def memory_usage(self, app: str | None = None) -> dict[str, Any]:
        return self.get(f"{NP_PREFIX}/memory-usage", **_app(app))  # type: ignore[no-any-return]

    def network_stats(self, window: str, app: str | None = None) -> dict[str, Any]:
        path = f"{DEBUG_PREFIX}/network-stats"
        return self.get(path, window=window, slowest="0", **_app(app))  # type: ignore[no-any-return]

    def set_profiling(self, on: bool, app: str | None = None) -> dict[str, Any]:
        path = f"{NP_PREFIX}/{'enable' if on else 'disable'}"
        return self.post(path, **_app(app))  # type: ignore[no-any-return]


def _app(app: str | None) -> dict[str, str]:
    return {"app": app} if app else {}
