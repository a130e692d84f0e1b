"""The debug HTTP API (aiohttp.web): the deployment guide's calls under
/api/v1/debug/, plus /metrics and /healthz. Handlers read the daemon's latest
tick and never block its loop; every error is JSON (those of aiohttp's own
parser too: server.py), a client's bad input a 4xx that is not logged."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.exposition import gzip_accepted

from netprof_core import Direction, SegmentControl
from netprof_core._display import shorten

from . import actions
from .export import ExportFilter, stream_export
from .log import api_logger
from .metrics import Exposition
from .server import RateLimitedLog
from .silences import SilenceError
from .summary import direction_summary, route_summary
from .windows import parse_window

if TYPE_CHECKING:
    from .daemon import Daemon

# Ticks failing in a row before /healthz says so (one may be a passing fault).
TICK_FAILURES_UNHEALTHY = 3

__all__ = ("ApiError", "make_app")

PREFIX = "/api/v1/debug"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DAEMON_KEY: web.AppKey[Daemon] = web.AppKey("daemon", object)  # type: ignore[arg-type]
EXPOSITION_KEY: web.AppKey[Exposition] = web.AppKey("exposition", Exposition)
MAX_SLOWEST = 1000
MAX_BODY = 64 * 1024  # the largest request body (a silence is far smaller)

# A bug of ours that a client can trigger at will must not flood the log.
_internal_errors = RateLimitedLog(api_logger, "internal errors", level=logging.ERROR)


class ApiError(Exception):
    """A request the API refuses: an HTTP status and a message naming the culprit."""

    def __init__(self, status: int, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.parameter = parameter


def _json_error(
    status: int, message: str, parameter: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    body: dict[str, Any] = {"error": message, "status": status}
    if parameter is not None:
        body["parameter"] = parameter
    return web.json_response(body, status=status, headers=headers)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda obj: json.dumps(obj, allow_nan=False))


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:  # (its message may quote the client: kilobytes are not echoed back)
        parameter = None if exc.parameter is None else shorten(exc.parameter)
        return _json_error(exc.status, shorten(exc.message, 1000), parameter)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: f"no such path: {shorten(request.path)}",
            405: f"{request.method} is not allowed on {shorten(request.path)}",
            413: f"the body is larger than {MAX_BODY} bytes",
        }
        return _json_error(exc.status, message.get(exc.status, exc.reason))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001  (a bug of ours: answer 500, keep serving)
        _internal_errors("%s %s failed", request.method, shorten(request.path), exc_info=exc)
        return _json_error(500, "internal error in netprofd; see its log")


async def _flush_logs(app: web.Application) -> None:
    _internal_errors.flush()  # the count of what the last minute did not log one by one


@web.middleware
async def _starting(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Until the first tick is done (and the alert state restored), only
    /healthz answers; the rest would read what is not there yet."""
    if request.app[DAEMON_KEY].alerting is None and request.path != "/healthz":
        raise ApiError(503, "netprofd is starting: it has not read the segments yet; try again in a moment")
    return await handler(request)


def _auth_middleware(key: str | None, metrics_require_auth: bool) -> Callable[..., Any]:
    expected = f"Bearer {key}".encode() if key else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        public = request.path == "/healthz" or (request.path == "/metrics" and not metrics_require_auth)
        if expected is not None and not public:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            # Constant time, whatever the given value's length or content.
            if not hmac.compare_digest(given, expected):
                return _json_error(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return auth


# -- parameters --------------------------------------------------------------


async def read_json_body(request: web.Request) -> Any:
    """The body as JSON. Bad input is a 400 naming the body, never a 500:
    nesting too deep for the parser (RecursionError), bytes that are not
    UTF-8, a charset nobody knows (JSON is UTF-8 whatever the header says).
    A body that does not arrive within daemon.idle_timeout_seconds is a 408."""
    deadline = request.app[DAEMON_KEY].config.daemon.idle_timeout_seconds
    try:
        raw = await asyncio.wait_for(request.read(), deadline)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the body did not arrive within {deadline:g} s", "body") from None
    except web.HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001  (a body aiohttp could not read: bad chunking, a cut)
        raise ApiError(400, f"the body cannot be read: {shorten(str(exc))}", "body") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8 text (JSON must be)", "body") from None
    except RecursionError:
        raise ApiError(400, "the body is JSON nested too deeply", "body") from None
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {shorten(str(exc))}", "body") from None


def _params(request: web.Request, allowed: tuple[str, ...]) -> Mapping[str, str]:
    for name in request.query:
        if name not in allowed:
            hint = ", ".join(allowed) if allowed else "none"
            raise ApiError(400, f"unknown parameter {name!r}; this call takes: {hint}", name)
    for name in allowed:
        if len(request.query.getall(name, [])) > 1:
            raise ApiError(400, f"parameter {name!r} given more than once", name)
    return request.query


def number_param(
    query: Mapping[str, str], name: str, lo: float, hi: float, *, integer: bool = False
) -> float | None:
    text = query.get(name)
    if text is None:
        return None
    kind = "an integer" if integer else "a number"
    try:
        value: float = int(text) if integer else float(text)
    except ValueError:
        raise ApiError(400, f"{name} must be {kind} from {lo:g} to {hi:g}, got {text!r}", name) from None
    # (an int is compared exactly: one past every float would overflow math.isfinite)
    if (isinstance(value, float) and not math.isfinite(value)) or not lo <= value <= hi:
        raise ApiError(400, f"{name} must be {kind} from {lo:g} to {hi:g}, got {text!r}", name)
    return value


def _app_param(daemon: Daemon, query: Mapping[str, str]) -> str | None:
    app = query.get("app")
    if app is not None and app not in daemon.store.app_names():
        known = ", ".join(sorted(daemon.store.app_names())) or "none yet"
        raise ApiError(404, f"unknown app {app!r}; known apps: {known}", "app")
    return app


# -- handlers ----------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    age = daemon.last_tick_age()
    stalled = age is None or age >= max(5.0, 5 * daemon.config.daemon.tick_seconds)
    # Ticks that run but fail (or cannot list the segments) leave the figures
    # stale as surely as ticks that stall.
    failing = daemon.consecutive_tick_failures >= TICK_FAILURES_UNHEALTHY
    status = "starting" if age is None else "stalled" if stalled else "failing" if failing else "ok"
    body: dict[str, Any] = {
        "status": status,
        "ticks": daemon.store.ticks,
        "last_tick_age_seconds": age,
        "tick_failures": daemon.tick_failures,
    }
    if failing:
        body["reason"] = daemon.tick_problem
        body["consecutive_tick_failures"] = daemon.consecutive_tick_failures
    return _json(body, 503 if stalled or failing else 200)


async def metrics(request: web.Request) -> web.Response:
    """Rendered off the loop, once per tick (see metrics.Exposition); gzipped
    for a scraper that accepts it (Prometheus does: 20 times fewer bytes)."""
    exposition = request.app[EXPOSITION_KEY]
    headers = {"Content-Type": CONTENT_TYPE_LATEST, "Vary": "Accept-Encoding"}
    # (as prometheus_client's own exporters decide it)
    if gzip_accepted(request.headers.get("Accept-Encoding", "")):
        headers["Content-Encoding"] = "gzip"
        return web.Response(body=await exposition.gzipped(), headers=headers)
    return web.Response(body=await exposition.text(), headers=headers)


async def network_stats(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    query = _params(request, ("window", "app", "slowest"))
    try:
        seconds = parse_window(query.get("window", "5m"))
    except ValueError as exc:
        raise ApiError(400, str(exc), "window") from None
    app_filter = _app_param(daemon, query)
    slowest = (
        int(number_param(query, "slowest", 0, MAX_SLOWEST, integer=True) or 0) if "slowest" in query else 10
    )

    now_ns = daemon.store.last_tick_ns
    apps = {name: state for name, state in daemon.apps.items() if app_filter in (None, name)}
    windows = daemon.history.window(apps, now_ns, seconds) if seconds is not None else None
    result = []
    for name, state in sorted(apps.items()):
        if windows is not None:
            span: float | None = windows[name].seconds
            routes = list(windows[name].routes.values())
        else:
            first = state.first_seen_ns or now_ns
            span = max(0.0, (now_ns - first) / 1e9)
            routes = list(state.routes.values())
        routes = [r for r in routes if r.count]
        result.append(
            {
                "app": name,
                "processes": len(state.processes),
                "recording": sum(e.snapshot.control.recording for e in state.processes),
                "window_seconds": round(span, 3) if span is not None else None,
                "inbound": direction_summary(routes, Direction.INBOUND, span),
                "outbound": direction_summary(routes, Direction.OUTBOUND, span),
                "routes": [
                    route_summary(r, span) for r in sorted(routes, key=lambda r: (-r.count, str(r.key)))
                ],
            }
        )
    body: dict[str, Any] = {
        "window": query.get("window", "5m"),
        "generated_at": now_ns / 1e9,
        "applications": result,
    }
    if slowest:
        body["slowest_requests"] = await daemon.slowest_records(app_filter, slowest, seconds)
    return _json(body)


def _control_call(what: str, action: Callable[[Daemon, str | None], actions.ActionResult]) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        daemon = request.app[DAEMON_KEY]
        query = _params(request, ("app",))
        app = _app_param(daemon, query)
        return _control_answer(what, app, action(daemon, app))

    return handler


def _control_answer(what: str, app: str | None, result: actions.ActionResult, **extra: Any) -> web.Response:
    """200, or 500 when every segment it should have reached refused: a rollback
    with ``curl -f`` must not report success when nothing changed."""
    body = {"action": what, "app": app, **extra, **result.to_json()}
    return _json(body, 500 if result.failed and not result.segments else 200)


async def enable(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    query = _params(request, ("app",))
    app = _app_param(daemon, query)
    blocked = daemon.feature_flag_off(app)
    if blocked:
        raise ApiError(409, blocked)
    return _control_answer("enable", app, daemon.set_enabled(app, True), enabled=True)


async def disable(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    query = _params(request, ("app",))
    app = _app_param(daemon, query)
    return _control_answer("disable", app, daemon.set_enabled(app, False), enabled=False)


async def retention_policy(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    query = _params(request, ("max_age_hours", "app"))
    if "max_age_hours" not in query:
        raise ApiError(400, "max_age_hours is required (hours, 0 for no limit)", "max_age_hours")
    hours = number_param(query, "max_age_hours", 0, 100_000) or 0.0
    app = _app_param(daemon, query)
    result = daemon.set_retention(app, hours * 3600)
    return _json({"action": "retention-policy", "app": app, "max_age_hours": hours, **result.to_json()})


async def memory_usage(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    query = _params(request, ("app",))
    app = _app_param(daemon, query)
    return _json(daemon.memory_usage(app))


async def production_metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    query = _params(request, ("app",))
    app = _app_param(daemon, query)
    return _json(daemon.production_metrics(app))


async def export(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON_KEY]
    fmt = request.match_info["format"]
    query = _params(request, ExportFilter.PARAMETERS)
    _app_param(daemon, query)
    try:
        wanted = ExportFilter.from_query(query)
    except ValueError as exc:
        parameter = str(exc).split(" ", 1)[0]
        raise ApiError(400, str(exc), parameter if parameter in ExportFilter.PARAMETERS else None) from None
    return await stream_export(request, daemon, fmt, wanted)


async def alerts(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    query = _params(request, ("history",))
    limit = int(number_param(query, "history", 0, 500, integer=True) or 0) if "history" in query else 50
    return _json(daemon.alerts_view(limit))


async def list_silences(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    _params(request, ())
    return _json({"silences": daemon.silences_view()})


async def create_silence(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    _params(request, ())
    body = await read_json_body(request)
    try:
        silence = daemon.add_silence(body)
    except SilenceError as exc:
        raise ApiError(400, str(exc), exc.field) from None
    return _json(silence, 201)


async def expire_silence(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    _params(request, ())
    silence = daemon.expire_silence(request.match_info["silence_id"])
    if silence is None:
        raise ApiError(404, f"no silence {request.match_info['silence_id']!r}", "silence_id")
    return _json(silence)


def make_app(daemon: Daemon, api_key: str | None) -> web.Application:
    app = web.Application(
        middlewares=[
            _errors,
            _auth_middleware(api_key, daemon.config.daemon.metrics_require_auth),
            _starting,
        ],
        client_max_size=MAX_BODY,
    )
    app[DAEMON_KEY] = daemon
    app.on_cleanup.append(_flush_logs)
    app[EXPOSITION_KEY] = Exposition(daemon)
    np = f"{PREFIX}/network-profiling"
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get(f"{PREFIX}/network-stats", network_stats)
    app.router.add_post(f"{np}/enable", enable)
    app.router.add_post(f"{np}/disable", disable)
    app.router.add_get(f"{np}/export/{{format:json|csv|ndjson}}", export)
    app.router.add_get(f"{np}/memory-usage", memory_usage)
    app.router.add_post(
        f"{np}/force-cleanup",
        _control_call("force-cleanup", lambda d, a: d.apply(a, SegmentControl.cleanup, "clean up")),
    )
    app.router.add_post(f"{np}/retention-policy", retention_policy)
    app.router.add_get(f"{np}/production-metrics", production_metrics)
    app.router.add_post(
        f"{np}/reset-errors",
        _control_call("reset-errors", lambda d, a: d.reset_errors(a)),
    )
    app.router.add_get(f"{np}/alerts", alerts)
    app.router.add_get(f"{np}/silences", list_silences)
    app.router.add_post(f"{np}/silences", create_silence)
    app.router.add_delete(f"{np}/silences/{{silence_id}}", expire_silence)
    return app
