"""What every framework hook shares: the process's default recorder, and the
rules that turn a request into a route. Each hook ends in one call to
``Recorder.record``; the ASGI and WSGI middleware split it in two,
``Recorder.admit`` as a request starts and ``Recorder.record_admitted`` as it
ends, so that a request not to be recorded (recording off, or sampled out) is
left alone. (An outbound hook's work is small beside the network call it
times; it asks at the end, in ``record``.)"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from . import _awaiting_py
from ._layout import Direction
from ._recorder import NO_EXTENSIONS
from .config import ProfilingConfig
from .recorder import Recorder

__all__ = (
    "MAX_CONTENT_LENGTH",
    "ROUTE_ENVIRON_KEY",
    "UNMATCHED_ROUTE",
    "InboundHook",
    "compile_excludes",
    "content_length",
    "get_recorder",
)

# Requests no route of the application matched (404 floods, scanners) share one route.
UNMATCHED_ROUTE = "<unmatched>"
# Where a framework adapter leaves the matched route template in a WSGI environ.
ROUTE_ENVIRON_KEY = "netprof.route"
# Set in the environ by the WSGI middleware: a framework adapter beneath it
# then only notes the route, and the request is recorded once.
RECORDING_ENVIRON_KEY = "netprof.recording"
# How many routes a hook keeps at hand for its hot path.
ROUTE_CACHE_LIMIT = 4096
# Methods a client may invent: any other is recorded as OTHER, so that a scanner
# sending random methods cannot fill the route table.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})


# The largest length counted: what a segment's counters hold (record() takes up to this).
MAX_CONTENT_LENGTH = 2**64 - 1


def content_length(value: str | None) -> int:
    """A Content-Length header's value; 0 when missing, malformed or beyond
    MAX_CONTENT_LENGTH (it comes from the client, or from the server of an
    outbound request: a bad one is their problem, never an error of netprof's)."""
    if not value or not value.isascii() or not value.isdigit():
        return 0
    digits = value.lstrip("0")
    if len(digits) > 20:  # past MAX_CONTENT_LENGTH; and int() refuses more than 4300 digits
        return 0
    number = int(digits) if digits else 0
    return number if number <= MAX_CONTENT_LENGTH else 0


def _compiled_awaiting() -> Callable[..., Any] | None:
    if NO_EXTENSIONS:
        return None
    try:
        return importlib.import_module("netprof_core._awaiting_c").awaiting  # type: ignore[no-any-return]
    except ImportError:  # the build is made to fail loudly; this is an editable tree
        return None


_COMPILED_AWAITING = _compiled_awaiting()

_default: Recorder | None = None
_default_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A thread that held the lock at the fork does not exist in the child: a
    # new lock, or the child's get_recorder() would wait for it forever.
    global _default_lock
    _default_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def cython_core(recorder: Recorder) -> Any:
    """The recorder's Cython core, which the compiled hooks call with C
    integers (``record_ints``); None beside the pure-Python twin."""
    return recorder._core if recorder.implementation == "cython" else None


def awaiting_for(recorder: Recorder) -> Callable[..., Any]:
    """``awaiting`` (``_awaiting_py.py``) to match the recorder's core: in C
    beside the Cython core, an ``async def`` beside the pure-Python twin."""
    if recorder.implementation == "cython" and _COMPILED_AWAITING is not None:
        return _COMPILED_AWAITING
    return _awaiting_py.awaiting


def get_recorder(config: ProfilingConfig | None = None) -> Recorder:
    """The process's default recorder, made on first use (never at import) from
    ``config``, or else from the file named by ``NETPROF_CONFIG``; once it is
    made, ``config`` is not looked at. Every hook given no recorder shares it."""
    global _default
    recorder = _default
    if recorder is None:
        with _default_lock:
            if _default is None:
                _default = Recorder(config)
            recorder = _default
    return recorder


def compile_excludes(patterns: Iterable[str]) -> Callable[[str], object] | None:
    """A search over the paths the hooks leave alone (regular expressions,
    ``re.search``, e.g. ``[r"^/healthz$", r"^/metrics$"]``); None when there
    are none, which a hook tests before calling it."""
    patterns = list(patterns)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"exclude_paths: {pattern!r} is not a regular expression: {exc}") from None
    return re.compile("|".join(f"(?:{p})" for p in patterns)).search if patterns else None


class InboundHook:
    """What the ASGI and WSGI middleware share: their settings, and the route
    ids they look up on every request (``self.route_ids[method][template]``
    on the hot path, :meth:`intern` on a miss: by method first, so that a
    lookup allocates no key)."""

    def __init__(
        self,
        app: Any,
        recorder: Recorder | None,
        exclude_paths: Iterable[str],
        route_key: Callable[[Any], str | None] | None,
    ) -> None:
        self.app = app
        # Made now, with the app: a bad NETPROF_CONFIG fails at start-up, loudly,
        # and a pre-forking server's workers each get their own segment.
        self.recorder = recorder if recorder is not None else get_recorder()
        self.excluded = compile_excludes(exclude_paths)
        self.route_key = route_key
        self.record = self.recorder.record
        self.route_ids: dict[str, dict[str, int]] = {}  # method -> template -> route id
        self._cached_routes = 0

    def intern(self, template: str, method: str) -> int:
        route = self.recorder.route_id(
            template, method if method in KNOWN_METHODS else "OTHER", Direction.INBOUND
        )
        # No lock: a fork while another thread held one would leave the child
        # waiting for it forever. Threads that miss the same route at once may
        # each count it: the limit is a bound, not a tally.
        if self._cached_routes < ROUTE_CACHE_LIMIT:  # a route_key, or a client's method, may be anything
            templates = self.route_ids.setdefault(method, {})
            if template not in templates:
                templates[template] = route
                self._cached_routes += 1
        return route
