"""What every framework hook shares: the process's default recorder, and the
rules that turn a request into a route. Each hook ends in one call to
``Recorder.record``."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

from .config import ProfilingConfig
from .recorder import Recorder

__all__ = ("ROUTE_ENVIRON_KEY", "UNMATCHED_ROUTE", "PathFilter", "get_recorder")

# Requests no route of the application matched (404 floods, scanners) share one route.
UNMATCHED_ROUTE = "<unmatched>"
# Where a framework adapter leaves the matched route template in a WSGI environ.
ROUTE_ENVIRON_KEY = "netprof.route"

_default: Recorder | None = None
_default_lock = threading.Lock()


def get_recorder(config: ProfilingConfig | None = None) -> Recorder:
    """The process's default recorder, made on first use (never at import) from
    ``config``, or else from the file named by ``NETPROF_CONFIG``. Every hook
    given no recorder of its own shares it."""
    global _default
    recorder = _default
    if recorder is None:
        with _default_lock:
            if _default is None:
                _default = Recorder(config)
            recorder = _default
    return recorder


class PathFilter:
    """Paths the hooks leave alone, as regular expressions (``re.search``),
    e.g. ``[r"^/healthz$", r"^/metrics$"]``."""

    __slots__ = ("search",)

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        patterns = list(patterns)
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"exclude_paths: {pattern!r} is not a regular expression: {exc}") from None
        # None when nothing is excluded, so a hook tests it before calling.
        self.search = re.compile("|".join(f"(?:{p})" for p in patterns)).search if patterns else None

    def excludes(self, path: str) -> bool:
        return self.search is not None and self.search(path) is not None
