"""The ``netprof_overhead`` fixture: a CI check that NetProfMiddleware costs your
own ASGI or WSGI app no more than a bound you set, per request.

Registered through the ``pytest11`` entry point, so it is there wherever netprof
is installed; it does nothing unless a test asks for the fixture, which needs
pytest-benchmark::

    def test_overhead(netprof_overhead):
        netprof_overhead.asgi(app, path="/items/1", max_overhead_us=5.0)
        # or: netprof_overhead.wsgi(wsgi_app, path="/items/1", max_overhead_us=5.0)

Each call builds the request once, as a server would (a fresh scope, receive and
send per request; or a fresh environ and start_response), checks that the app
answers it with ``status`` bare and through the middleware, then runs rounds of
``requests_per_round`` requests in process, alternately bare and wrapped, timed
by the test's ``benchmark`` fixture: the wrapped rounds are what pytest-benchmark
records and compares (``benchmark.pedantic``; times per round), each bare round
runs just before one, with the same timer. The overhead per request is
median(wrapped) - median(bare); both medians and the overhead go into
``benchmark.extra_info`` (``bare_median_us``, ``wrapped_median_us``,
``overhead_us``, ``max_overhead_us``, ``requests_per_round``), and the test fails
when the overhead is above the bound. The recorder writes into a temporary
segment directory, removed afterwards, and its request count must equal the
requests the middleware served: a hook that records nothing fails, whatever it
costs.

The bound: ``max_overhead_us=``, else ``--netprof-max-overhead-us``, else the
ini option ``netprof_max_overhead_us``; with none, the overhead is measured and
recorded only. ``--benchmark-min-rounds``, ``--benchmark-max-time``,
``--benchmark-timer`` and ``--benchmark-disable-gc`` apply to both sides. With
``--benchmark-disable`` (or under xdist) a few requests of each run, the recording
is checked, and a warning says that the bound was not.
"""

from __future__ import annotations

import gc
import io
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # these, and netprof's hooks, are imported only when a test uses the fixture
    import asyncio

    from netprof_core.config import ProfilingConfig
    from netprof_core.recorder import Recorder

__all__ = ("NetProfOverhead", "NetProfOverheadWarning", "OverheadResult", "netprof_overhead")

INI = "netprof_max_overhead_us"
REQUESTS_PER_ROUND = 100
DISABLED_REQUESTS = 5  # per side under --benchmark-disable: enough to check the recording
_SHM = "/dev/shm"  # where production segments live: the same memory as in production

Headers = Sequence[tuple[str, str]]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class NetProfOverheadWarning(pytest.PytestWarning):
    """An overhead check that ran without checking its bound."""


@dataclass(frozen=True, slots=True)
class OverheadResult:
    """What one check measured. Times are per request, in µs; None under
    ``--benchmark-disable``."""

    hook: str  # "asgi" or "wsgi"
    implementation: str  # the recorder core
    requests_per_round: int
    rounds: int
    requests_recorded: int
    bare_median_us: float | None
    wrapped_median_us: float | None
    overhead_us: float | None
    max_overhead_us: float | None
    bound_checked: bool


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("netprof", "netprof overhead checks (the netprof_overhead fixture)")
    group.addoption(
        "--netprof-max-overhead-us",
        type=float,
        default=None,
        dest=INI,
        metavar="US",
        help="fail a netprof_overhead check above US microseconds per request (max_overhead_us= wins)",
    )
    parser.addini(INI, "netprof_overhead's bound, µs per request (the command line and max_overhead_us= win)")


@pytest.fixture
def netprof_overhead(request: pytest.FixtureRequest, benchmark: Any) -> NetProfOverhead:
    """``.asgi(app, path=..., max_overhead_us=...)`` or ``.wsgi(...)``: fails the
    test when NetProfMiddleware adds more than the bound to each request.
    (``benchmark`` is pytest-benchmark's; named here, so that
    ``--benchmark-only`` and ``--benchmark-skip`` see these tests as benchmarks.)"""
    return NetProfOverhead(benchmark, _configured_bound(request.config))


class NetProfOverhead:
    """One check per test (pytest-benchmark times one thing per test)."""

    def __init__(self, benchmark: Any, default_bound: float | None) -> None:
        self._benchmark = benchmark
        self._default_bound = default_bound
        self._used = False

    def asgi(
        self,
        app: ASGIApp,
        *,
        path: str = "/",
        method: str = "GET",
        headers: Headers = (),
        body: bytes = b"",
        status: int = 200,
        max_overhead_us: float | None = None,
        requests_per_round: int = REQUESTS_PER_ROUND,
        config: ProfilingConfig | None = None,
        implementation: str | None = None,
    ) -> OverheadResult:
        """``path`` may carry a query string; ``config``'s ``segment_dir`` is
        replaced by a temporary one; ``implementation``: "cython" or "python"."""
        from netprof_core.asgi import NetProfMiddleware

        bound = self._bound(max_overhead_us)
        request = _ASGIRequest(method, path, headers, body)
        with _recorder(config, implementation) as recorder, _event_loop() as loop:
            wrapped = NetProfMiddleware(app, recorder=recorder)
            _check_status("the app", request.check(loop, app), status, method, path)
            _check_status("NetProfMiddleware(app)", request.check(loop, wrapped), status, method, path)

            def serve(target: ASGIApp) -> Callable[[int], object]:
                return lambda n: loop.run_until_complete(request.serve(target, n))

            return self._measure("asgi", recorder, serve(app), serve(wrapped), bound, requests_per_round)

    def wsgi(
        self,
        app: WSGIApp,
        *,
        path: str = "/",
        method: str = "GET",
        headers: Headers = (),
        body: bytes = b"",
        status: int = 200,
        max_overhead_us: float | None = None,
        requests_per_round: int = REQUESTS_PER_ROUND,
        config: ProfilingConfig | None = None,
        implementation: str | None = None,
    ) -> OverheadResult:
        """As :meth:`asgi`. A Flask app (or its ``wsgi_app``) must not have
        served a request yet: the middleware hooks its URL rules first."""
        from netprof_core.wsgi import NetProfMiddleware

        bound = self._bound(max_overhead_us)
        request = _WSGIRequest(method, path, headers, body)
        with _recorder(config, implementation) as recorder:
            wrapped = NetProfMiddleware(app, recorder=recorder)  # before any request: see above
            _check_status("the app", request.check(app), status, method, path)
            _check_status("NetProfMiddleware(app)", request.check(wrapped), status, method, path)

            def serve(target: WSGIApp) -> Callable[[int], object]:
                return lambda n: request.serve(target, n)

            return self._measure("wsgi", recorder, serve(app), serve(wrapped), bound, requests_per_round)

    def _bound(self, explicit: float | None) -> float | None:
        if self._used:
            pytest.fail(
                "netprof_overhead checks one app per test: parametrise the test for more", pytrace=False
            )
        self._used = True
        if explicit is None:
            return self._default_bound
        if not _valid_bound(explicit):
            raise ValueError(
                f"max_overhead_us={explicit!r}: expected a number of microseconds >= 0, e.g. 5.0"
            )
        return float(explicit)

    def _measure(
        self,
        hook: str,
        recorder: Recorder,
        bare: Callable[[int], object],
        wrapped: Callable[[int], object],
        bound: float | None,
        requests_per_round: int,
    ) -> OverheadResult:
        if requests_per_round < 1:
            raise ValueError(f"requests_per_round={requests_per_round!r}: expected at least 1")
        benchmark, timing = self._benchmark, _Timing(self._benchmark)
        n = requests_per_round if benchmark.enabled else min(requests_per_round, DISABLED_REQUESTS)
        served = 1  # the check request
        bare_times: list[float] = []

        def wrapped_round() -> None:
            nonlocal served
            wrapped(n)
            served += n

        def bare_round() -> None:
            bare_times.append(timing.time(lambda: bare(n)))

        rounds = 1
        if benchmark.enabled:  # one pair to warm up and to size the run, as pytest-benchmark sizes its own
            pair = timing.time(lambda: bare(n)) + timing.time(wrapped_round)
            rounds = max(timing.min_rounds, math.ceil(timing.max_time / pair))
        benchmark.pedantic(_on_fresh_stack, (wrapped_round,), setup=bare_round, rounds=rounds)
        recorded = _check_recorded(recorder, served)

        measured = benchmark.enabled and benchmark.stats is not None
        bare_us = wrapped_us = overhead = None
        if measured:
            from statistics import median

            # --benchmark-cprofile runs setup once more, after the rounds: [:rounds]
            bare_us = median(bare_times[:rounds]) / n * 1e6
            wrapped_us = benchmark.stats.stats.median / n * 1e6
            overhead = wrapped_us - bare_us
        result = OverheadResult(
            hook=hook,
            implementation=recorder.implementation,
            requests_per_round=n,
            rounds=rounds,
            requests_recorded=recorded,
            bare_median_us=bare_us,
            wrapped_median_us=wrapped_us,
            overhead_us=overhead,
            max_overhead_us=bound,
            bound_checked=measured and bound is not None,
        )
        benchmark.extra_info.update(asdict(result))
        if not measured:
            warnings.warn(
                NetProfOverheadWarning(
                    f"benchmarks are disabled: served {n} requests bare and through NetProfMiddleware"
                    " and checked the recording; the overhead bound was not checked"
                ),
                stacklevel=3,
            )
        elif bound is not None and overhead is not None and overhead > bound:
            pytest.fail(
                f"NetProfMiddleware ({hook}, {recorder.implementation} core) adds {overhead:.3f} µs per request,"
                f" above the bound of {bound:g} µs (max_overhead_us): median per request {wrapped_us:.3f} µs"
                f" through the middleware, {bare_us:.3f} µs bare ({rounds} rounds of {n} requests)",
                pytrace=False,
            )
        return result


# -- the bound -------------------------------------------------------------------


def _valid_bound(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _configured_bound(config: pytest.Config) -> float | None:
    value = config.getoption(INI)
    where = "--netprof-max-overhead-us"
    if value is None:
        raw = str(config.getini(INI) or "").strip()
        if not raw:
            return None
        where = f"{INI} = {raw!r} in {config.inipath or 'the ini file'}"
        try:
            value = float(raw)
        except ValueError:
            value = None
    if not _valid_bound(value):
        raise pytest.UsageError(f"{where}: expected a number of microseconds >= 0, e.g. 5.0")
    return float(value)


# -- timing ----------------------------------------------------------------------


class _Timing:
    """The benchmark's settings for this test (command line and marker) and
    its way of timing a round, for the bare rounds it does not time itself."""

    def __init__(self, benchmark: Any) -> None:
        from pytest_benchmark.fixture import PauseInstrumentation

        # Private attributes (unchanged since pytest-benchmark 3): the fixture
        # exposes no other way to time with its timer under its settings.
        self.timer: Callable[[], float] = getattr(benchmark, "_timer", time.perf_counter)
        self.min_rounds = int(getattr(benchmark, "_min_rounds", 5))
        self.max_time = float(getattr(benchmark, "_max_time", 1.0))
        self.disable_gc = bool(getattr(benchmark, "_disable_gc", False))
        # pytest-benchmark pauses tracers (coverage) around its rounds: so must the bare ones.
        self.pause = PauseInstrumentation

    def time(self, run: Callable[[], object]) -> float:
        gc_enabled = gc.isenabled()
        if self.disable_gc:
            gc.disable()
        try:
            with self.pause():
                start = self.timer()
                _on_fresh_stack(run)
                return self.timer() - start
        finally:
            if gc_enabled:
                gc.enable()


def _on_fresh_stack(run: Callable[[], object]) -> None:
    """``run()``, from a frame too large for the current chunk of CPython's
    frame stack (3.11+), so that ``run``'s frames start a new chunk with 32 KiB
    of room: every round runs at the same place in a chunk, whatever the
    caller's depth. Else a loop whose calls cross a chunk boundary allocates
    and frees a chunk on each call (CPython gh-142183, fixed in 3.13.x/3.14.x),
    which can make one side of the comparison several times slower."""
    run()


if sys.implementation.name == "cpython":
    # A frame of 32 KiB and a bit: CPython gives it a 64 KiB chunk of its own.
    _on_fresh_stack.__code__ = _on_fresh_stack.__code__.replace(co_stacksize=32 * 1024 // 8 + 64)


@contextmanager
def _recorder(config: ProfilingConfig | None, implementation: str | None) -> Iterator[Recorder]:
    from netprof_core import ProfilingConfig, Recorder

    config = config if config is not None else ProfilingConfig(app_name="netprof-overhead")
    shm = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None
    directory = tempfile.mkdtemp(prefix="netprof-overhead-", dir=shm)
    try:
        recorder = Recorder(config.replace(segment_dir=directory), implementation=implementation)
        try:
            yield recorder
        finally:
            recorder.close(remove=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _check_recorded(recorder: Recorder, served: int) -> int:
    counters = recorder.snapshot(records=False).counters
    if counters.requests + counters.sampled_out != served or counters.internal_errors:
        pytest.fail(
            f"NetProfMiddleware served {served} requests but its segment counts {counters.requests} recorded,"
            f" {counters.sampled_out} sampled out, {counters.disabled_calls} while disabled and"
            f" {counters.internal_errors} internal errors: a hook that does not record every request"
            " cannot have its overhead checked (is profiling enabled in the config?)",
            pytrace=False,
        )
    return counters.requests


def _check_status(what: str, got: int | None, expected: int, method: str, path: str) -> None:
    if got != expected:
        answer = f"answered {got}" if got else "sent no complete response"
        pytest.fail(
            f"{what} {answer} to {method} {path}, not {expected}: its overhead would be measured on the"
            f" wrong response (pass status={got} if that is the one to measure)",
            pytrace=False,
        )


# -- requests, as a server makes them ----------------------------------------------


@contextmanager
def _event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class _Exchange:
    """``receive`` and ``send`` for one ASGI request: the body once, then, as
    uvicorn does, ``http.disconnect`` once the response is complete."""

    __slots__ = ("body", "complete", "status", "waiter")

    def __init__(self, body: bytes) -> None:
        self.body: bytes | None = body
        self.complete = False
        self.status = 0
        self.waiter: asyncio.Future[None] | None = None

    async def receive(self) -> Message:
        body, self.body = self.body, None
        if body is not None:
            return {"type": "http.request", "body": body, "more_body": False}
        if not self.complete:  # e.g. a streaming response listening for a disconnect
            from asyncio import get_running_loop

            self.waiter = get_running_loop().create_future()
            await self.waiter
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.complete = True
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)


class _ASGIRequest:
    def __init__(self, method: str, path: str, headers: Headers, body: bytes) -> None:
        path, _, query = path.partition("?")
        self.body = body
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": [
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in _headers(headers, body)
            ],
            "client": ("127.0.0.1", 54321),
            "server": ("127.0.0.1", 8000),
            "state": {},
            "extensions": {},
        }

    async def serve(self, app: ASGIApp, n: int) -> None:
        scope, body = self.scope, self.body
        for _ in range(n):
            exchange = _Exchange(body)
            await app(dict(scope), exchange.receive, exchange.send)  # a fresh scope: apps write into it

    def check(self, loop: asyncio.AbstractEventLoop, app: ASGIApp) -> int | None:
        exchange = _Exchange(self.body)
        loop.run_until_complete(app(dict(self.scope), exchange.receive, exchange.send))
        return exchange.status if exchange.complete else None


def _start_response(
    status: str, headers: list[tuple[str, str]], exc_info: Any = None
) -> Callable[[bytes], None]:
    return _write


def _write(data: bytes) -> None:
    pass


class _WSGIRequest:
    def __init__(self, method: str, path: str, headers: Headers, body: bytes) -> None:
        path, _, query = path.partition("?")
        self.body = body
        self.environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "REMOTE_PORT": "54321",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in _headers(headers, body):
            key = name.upper().replace("-", "_")
            self.environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"] = value

    def serve(self, app: WSGIApp, n: int, start_response: Callable[..., Any] = _start_response) -> None:
        environ, body = self.environ, self.body
        for _ in range(n):
            request = dict(environ)
            request["wsgi.input"] = io.BytesIO(body)
            response = app(request, start_response)
            try:
                for _chunk in response:
                    pass
            finally:
                close = getattr(response, "close", None)
                if close is not None:
                    close()

    def check(self, app: WSGIApp) -> int | None:
        statuses: list[str] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            statuses.append(status)
            return _write

        self.serve(app, 1, start_response)
        return int(statuses[-1][:3]) if statuses else None


def _headers(headers: Headers, body: bytes) -> list[tuple[str, str]]:
    base = [("host", "127.0.0.1:8000"), ("user-agent", "netprof-overhead/1.0"), ("accept", "*/*")]
    if body:
        base.append(("content-length", str(len(body))))
    return base + list(headers)
