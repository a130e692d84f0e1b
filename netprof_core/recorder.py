"""The recorder a process profiles itself with: one segment, one core, and the
conveniences around the hot-path ``record()`` call."""

from __future__ import annotations

import atexit
import functools
import inspect
import mmap
import multiprocessing.util
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from . import _layout as L
from ._display import printable
from ._recorder import core_module, implementation_of
from .config import ProfilingConfig, load_profiling_config
from .control import SegmentControl, initial_control, read_control_words
from .log import recorder_logger
from .reader import SegmentReader, SegmentSnapshot
from .segment import (
    create_segment,
    format_segment,
    mark_closed,
    parse_header,
    remove_stale_segments,
    write_route_name,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ("Measurement", "Recorder")

F = TypeVar("F", bound=Callable[..., Any])
# Distinct route keys remembered as going to the overflow route; past this,
# keys are not remembered, so a flood of unique paths cannot grow memory.
OVERFLOW_CACHE_LIMIT = 1024

_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()
_fork_hook_installed = False


class Recorder:
    """Records the requests of this process into its own segment.

    ``record(route_id, status, start_ns, end_ns, bytes_in=0, bytes_out=0,
    error_kind=0, ttfb_ns=0)`` is the hot path: plain ints, times from
    ``time.monotonic_ns()``, ``route_id`` from :meth:`route_id`. Called with
    those arguments it never raises while ``graceful_degradation`` is on: a bad
    value is counted as an internal error. Each process gets its own segment, a
    forked child too.

    The ASGI and WSGI middleware ask first: ``token = admit()`` as a request starts
    (0 when recording is off or the request is sampled out, counted as such:
    the hook then leaves the request alone), ``record_admitted(token,
    route_id, ...)`` as it ends.
    """

    record: RecordCall
    admit: Callable[[], int]
    record_admitted: RecordAdmittedCall

    def __init__(
        self,
        config: ProfilingConfig | None = None,
        *,
        implementation: str | None = None,
        created_ns: int | None = None,
    ) -> None:
        self.config = config if config is not None else load_profiling_config()
        self._core_class = core_module(implementation).RecorderCore
        self.implementation = implementation_of(self._core_class)
        budget = int(self.config.max_memory_mb * 2**20)
        self._requested = (self.config.max_stored_requests, self.config.max_routes)
        self.layout, self._shrinks = L.SegmentLayout.fitting(*self._requested, budget)
        if self._shrinks:
            recorder_logger.warning(
                "max_memory_mb=%s cannot hold %d records and %d routes: keeping %d records and %d routes",
                self.config.max_memory_mb,
                *self._requested,
                self.layout.ring_capacity,
                self.layout.route_capacity,
            )
        self._intern_lock = threading.Lock()
        self._route_ids: dict[tuple[int, str, str], int] = {}
        self._route_names: list[tuple[int, str, str]] = [(L.Direction.INBOUND, "", L.OVERFLOW_TEMPLATE)]
        self._overflowed = 0
        self._clean_stale_segments()
        self._open_segment(initial_control(self.config, self.layout.ring_capacity), created_ns)
        self._core = self._core_class(self._buf, self.layout, self._seed(), self._log_slow)
        self.record = self._core.record
        # The hooks' way, in two calls: admit() as a request starts (0: not to
        # be recorded, so left alone), record_admitted(token, ...) as it ends.
        self.admit = self._core.admit
        self.record_admitted = self._core.record_admitted
        _recorders.add(self)
        _install_process_hooks()

    # -- the segment ----------------------------------------------------------

    def _clean_stale_segments(self) -> None:
        try:
            remove_stale_segments(self.config.segment_dir, owner=self.config.segment_dir_owner)
        except Exception as exc:  # noqa: BLE001 - a cleanup that fails never stops the application
            recorder_logger.debug("stale segment cleanup skipped: %s", exc)

    def _open_segment(self, control: dict[int, int], created_ns: int | None = None) -> None:
        contents: dict[str, Any] = {
            "requested": self._requested,
            "memory_shrinks": self._shrinks,
            "control": control,
            "route_names": self._route_names,
            "created_ns": created_ns,
        }
        path: Path | None
        lock_fd: int | None
        try:
            path, buf, lock_fd = create_segment(
                self.config.segment_dir,
                self.config.app_name,
                self.layout,
                owner=self.config.segment_dir_owner,
                **contents,
            )
        except Exception as exc:
            # Whatever it was (a directory not to be trusted, no space left, a
            # path the OS cannot take), the application starts regardless.
            if not self.config.graceful_degradation:
                raise
            recorder_logger.error(
                "cannot create a segment in %s (%s); profiling in private memory, invisible to netprofd",
                self.config.segment_dir,
                exc,
            )
            # Private, anonymous memory: this process still sees its own statistics.
            path, buf, lock_fd = None, mmap.mmap(-1, self.layout.total_size), None
            format_segment(buf, self.config.app_name, self.layout, **contents)
        self.path = path
        self._buf: mmap.mmap = buf
        # Held open, locked, while this process writes the segment: its
        # writer is alive for readers (segment.writer_alive) until it closes,
        # or this recorder is dropped without closing (then the finalizer
        # closes it, so that no child forked later inherits it).
        self._lock_fd = lock_fd
        self._lock_closer = weakref.finalize(self, os.close, lock_fd) if lock_fd is not None else None
        self._pid = os.getpid()
        self.header = parse_header(buf, path or "<private>")
        self.control = SegmentControl(buf, self.header)
        self._sync_route_table()

    def _seed(self) -> int:
        """The sampling generator's seed; never 0, which xorshift cannot leave."""
        return ((self.header.pid << 32) ^ self.header.created_ns ^ 0x9E3779B97F4A7C15) & (2**64 - 1) or 1

    def _sync_route_table(self) -> None:
        L.ROUTE_TABLE_STRUCT.pack_into(self._buf, L.ROUTES_OFFSET, len(self._route_names), self._overflowed)

    # -- routes ---------------------------------------------------------------

    def route_id(self, template: str, method: str = "GET", direction: int = L.Direction.INBOUND) -> int:
        """The id of a route (interned once; call it once per route, not per
        request). When the table is full, new routes share the overflow route 0."""
        try:
            if direction is not L.Direction.INBOUND and direction is not L.Direction.OUTBOUND:
                direction = _checked_direction(direction)
            key = (direction, method, template)
            route = self._route_ids.get(key)
            if route is not None:
                return route
            return self._intern(key)
        except Exception as exc:  # noqa: BLE001 - an exception inside netprof never reaches the application
            self.internal_error(exc)
            return L.OVERFLOW_ROUTE_ID

    def _intern(self, key: tuple[int, str, str]) -> int:
        direction, method, template = key
        if not isinstance(method, str) or not isinstance(template, str):
            raise TypeError(f"method and template must be str, got {method!r}, {template!r}")
        with self._intern_lock:
            route = self._route_ids.get(key)
            if route is not None:
                return route
            if len(self._route_names) <= self.layout.route_capacity:
                route = len(self._route_names)
                write_route_name(self._buf, self.layout, route, direction, method, template)
                self._route_names.append((direction, method, template))
                self._route_ids[key] = route
            else:
                route = L.OVERFLOW_ROUTE_ID
                self._overflowed += 1
                if self._overflowed <= OVERFLOW_CACHE_LIMIT:
                    self._route_ids[key] = route
            # The count is raised after the name is written: readers see whole entries.
            self._sync_route_table()
            return route

    # -- errors and logging ----------------------------------------------------

    def internal_error(self, exc: BaseException) -> None:
        """Count an error inside netprof (a hook's, say). More than three in a
        row with ``auto_disable_on_error`` disable recording. Re-raises only when
        graceful degradation is off."""
        recorder_logger.debug("netprof internal error: %r", exc)
        self._core.internal_error(exc)

    def _log_slow(self, route_id: int, duration_ns: int, status: int, suppressed: int) -> None:
        """The core's slow-request callback (at most once a second), called
        inside the request's record(): a handler that fails (a full disk) or
        raises is not the request's business, so nothing of it goes back."""
        try:
            direction, method, template = (
                self._route_names[route_id] if route_id < len(self._route_names) else (0, "", "?")
            )
            recorder_logger.warning(
                "slow request: %s %s %s took %.3f s (status %d)%s",
                "outbound" if direction else "inbound",
                printable(method),  # the app's own log: a name never writes a line or a control
                printable(template),
                duration_ns / 1e9,
                status,
                f"; {suppressed} more slow requests not logged" if suppressed else "",
            )
        except Exception:  # noqa: BLE001, S110 - the log line is lost, the request goes on
            pass

    # -- conveniences -----------------------------------------------------------

    def measure(
        self, template: str, method: str = "GET", direction: int = L.Direction.OUTBOUND
    ) -> Measurement:
        """Time a block as one request of a route::

            with recorder.measure("/users/{id}", "GET") as m:
                response = call()
                m.status = response.status_code

        An exception escaping the block is counted as an error and goes on.
        """
        return Measurement(self, self.route_id(template, method, direction))

    def timed(
        self, template: str, method: str = "GET", direction: int = L.Direction.OUTBOUND
    ) -> Callable[[F], F]:
        """Decorate a function (sync or async) so every call is recorded as a request."""

        def decorate(func: F) -> F:
            route_id = self.route_id(template, method, direction)
            if inspect.iscoroutinefunction(func):

                @functools.wraps(func)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    with Measurement(self, route_id):
                        return await func(*args, **kwargs)

                return async_wrapper  # type: ignore[return-value]

            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with Measurement(self, route_id):
                    return func(*args, **kwargs)

            return wrapper  # type: ignore[return-value]

        return decorate

    def snapshot(self, *, records: bool = True) -> SegmentSnapshot:
        """A consistent snapshot of this process's own segment."""
        reader = SegmentReader(self.path or "<private>", mapped=(self._buf, self.header))
        return reader.snapshot(records=records)

    # -- life cycle -------------------------------------------------------------

    def close(self, *, remove: bool = False) -> None:
        """Stop recording and mark the segment closed; netprofd folds it in and
        removes it. ``remove=True`` removes it now (tests, demos)."""
        if self._buf.closed:
            return
        self.record = _record_nothing  # type: ignore[assignment]
        self.admit = _admit_nothing
        self.record_admitted = _record_nothing  # type: ignore[assignment]
        self._core.release()
        self._mark_closed()
        try:
            self._buf.close()
        except BufferError:
            # Closed by a signal handler inside this thread's own record(): the
            # pure-Python core lets the mapping go after that update; the
            # garbage collector unmaps it then.
            pass
        self._release_lock()
        if remove and self.path is not None:
            self.path.unlink(missing_ok=True)
        _recorders.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _after_fork_in_child(self) -> None:
        """A forked child writes its own segment: same routes, same settings, zero counts."""
        self._core.reset_lock()
        self._intern_lock = threading.Lock()
        control = dict(enumerate(read_control_words(self._buf)))
        control[L.C_CLEAN_FLOOR] = control[L.C_PUBLISH_REQUEST] = control[L.C_RESET_ERRORS_REQUEST] = 0
        self._overflowed = 0  # the parent's segment counts its own
        parent_buf = self._buf
        # The parent's lock stays with the parent: the child's copy of its
        # descriptor is closed, so the parent's end still shows.
        self._release_lock()
        self._core.release()  # not one more write to the parent's segment, whatever happens next
        self._open_segment(control)
        self._core.rebind(self._buf, self._seed())
        parent_buf.close()

    def _release_lock(self) -> None:
        closer, self._lock_closer, self._lock_fd = self._lock_closer, None, None
        if closer is not None:
            closer()  # closes the descriptor, once

    def _mark_closed(self) -> None:
        """Mark this process's own segment closed, once (close() and exit both come here)."""
        if (
            not self._buf.closed
            and os.getpid() == self._pid
            and not L.U64.unpack_from(self._buf, L.CLOSED_NS_OFFSET)[0]
        ):
            mark_closed(self._buf)


class Measurement:
    """One timed request; set ``status``, ``bytes_in``, ``bytes_out`` or
    ``error_kind`` inside the block."""

    __slots__ = ("_recorder", "bytes_in", "bytes_out", "error_kind", "route_id", "start_ns", "status")

    def __init__(self, recorder: Recorder, route_id: int) -> None:
        self._recorder = recorder
        self.route_id = route_id
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.error_kind = L.ErrorKind.NONE
        self.start_ns = 0

    def __enter__(self) -> Self:
        self.start_ns = time.monotonic_ns()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        end_ns = time.monotonic_ns()
        error_kind = self.error_kind
        if exc_type is not None and not error_kind:
            error_kind = L.ErrorKind.EXCEPTION
        # Passed as set: the core refuses (and counts) what is not an int.
        self._recorder.record(
            self.route_id, self.status, self.start_ns, end_ns, self.bytes_in, self.bytes_out, error_kind
        )


def _record_nothing(*args: object, **kwargs: object) -> None:
    return None


def _admit_nothing() -> int:
    return 0


def _checked_direction(direction: object) -> L.Direction:
    if isinstance(direction, int) and not isinstance(direction, bool) and direction in (0, 1):
        return L.Direction(direction)
    raise ValueError(f"direction must be Direction.INBOUND or OUTBOUND, got {direction!r}")


class RecordCall(Protocol):
    def __call__(
        self,
        route_id: int,
        status: int,
        start_ns: int,
        end_ns: int,
        bytes_in: int = 0,
        bytes_out: int = 0,
        error_kind: int = 0,
        ttfb_ns: int = 0,
    ) -> None: ...


class RecordAdmittedCall(Protocol):
    def __call__(
        self,
        admitted: int,
        route_id: int,
        status: int,
        start_ns: int,
        end_ns: int,
        bytes_in: int = 0,
        bytes_out: int = 0,
        error_kind: int = 0,
        ttfb_ns: int = 0,
    ) -> None: ...


def _install_process_hooks() -> None:
    global _fork_hook_installed
    if _fork_hook_installed:
        return
    _fork_hook_installed = True
    os.register_at_fork(after_in_child=_after_fork_in_child)
    atexit.register(_at_exit)
    # multiprocessing's children leave through os._exit, past atexit, but run
    # multiprocessing's finalizers first (registered anew in each child).
    _close_at_multiprocessing_exit(None)
    multiprocessing.util.register_after_fork(_MULTIPROCESSING_HOOK, _close_at_multiprocessing_exit)


class _MultiprocessingHook:
    """A weak-referenceable owner for multiprocessing's after-fork registry."""


_MULTIPROCESSING_HOOK = _MultiprocessingHook()


def _close_at_multiprocessing_exit(_: object) -> None:
    multiprocessing.util.Finalize(None, _at_exit, exitpriority=0)


def _after_fork_in_child() -> None:
    for recorder in list(_recorders):
        try:
            recorder._after_fork_in_child()
        except Exception as exc:  # noqa: BLE001 - never break the child over its profiler
            recorder_logger.error("netprof: could not give the forked child its own segment: %s", exc)


def _at_exit() -> None:
    for recorder in list(_recorders):
        try:
            recorder._mark_closed()
        except Exception:  # noqa: BLE001, S110 - never fail the exit; the other segments still get marked
            pass
