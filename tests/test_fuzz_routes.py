"""Fuzzing route names (issue 15, "Trust": no input may become code, markup
or control).

Hypothesis text (control characters, bidi overrides, zero-width and
unassigned code points, CSV formula starts, names far past the table's 128
bytes) goes through a real recorder of each core (``Recorder.route_id``,
inbound and outbound, any method), then every place a name comes out:
- the snapshot (in process, and read from the file): a name comes back as it
  was, or cut to its first 12 (method) or 112 (template) bytes of UTF-8 at a
  character boundary (``netprof_core.segment.write_route_name``);
- ``netprof stats``: its table (local) and its rich table (``--url``,
  ``--watch``), and the log lines of the app and of netprofd: no control
  character, no line of its own;
- netprofd's CSV export: no cell starts a formula, and taking the one
  leading quote away gives the name back.
And through the hooks in process: whatever path, method and root_path a
client sends to a Starlette app (mounts with path parameters) or a Flask app,
the route recorded is one of the app's templates, never request data.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask
from hypothesis import example, given
from hypothesis import strategies as st
from rich.console import Console
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from netprof_core import Direction, Recorder, read_segment
from netprof_core._display import PrintableFormatter, printable
from netprof_core.asgi import NetProfMiddleware as AsgiMiddleware
from netprof_core.cli import _render, route_table
from netprof_core.cli_live import routes_table
from netprof_core.wsgi import NetProfMiddleware as WsgiMiddleware
from netprof_daemon.export import spreadsheet_cell
from tests.fuzzing import fuzz_settings

MakeRecorder = Callable[..., Recorder]

METHOD_BYTES = 12  # L.ROUTE_NAME_STRUCT: method 12s, template 112s
TEMPLATE_BYTES = 112
UNMATCHED = "<unmatched>"
OVERFLOW = "<other>"
# What a spreadsheet reads as a formula (OWASP's CSV injection list, and NUL).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\0")
KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")

# Characters that do harm on a terminal, in a log, in a spreadsheet.
NASTY = (
    "\x00\x07\x08\t\n\x0b\x0c\r\x1b\x7f\x85\x9b\u00ad\u061c\u200b\u200d\u200e\u200f\u2028\u2029\u202a\u202b"
    "\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff\ufff9\ufffe\uffff\U000e0001\U0010ffff"
    "=+-@'\",;[]{}/\\%é中𝔘"
)
# Text with plenty of the nasty characters, any unicode besides (no lone surrogates: not UTF-8).
names = st.one_of(
    st.text(alphabet=st.sampled_from(NASTY), max_size=20),
    st.text(max_size=30),
    st.builds(
        lambda a, b: a + b,
        st.sampled_from(["=", "+", "-", "@", "\t", "\r", "'", "\x1b[2J", "\u202e"]),
        st.text(max_size=20),
    ),
    st.text(alphabet=st.sampled_from("a中𝔘é\u202e"), min_size=100, max_size=140),  # cut at a boundary
    st.text(max_size=5).map(lambda s: s * 300),
)
methods = st.one_of(st.sampled_from(KNOWN_METHODS), names)
directions = st.sampled_from([Direction.INBOUND, Direction.OUTBOUND])


def stored(text: str, limit: int) -> str:
    """What a segment keeps of a name: its first ``limit`` bytes of UTF-8
    (a lone surrogate as its escape, \\udcff), cut at a character boundary;
    NUL bytes at its end read as padding."""
    return text.encode("utf-8", "backslashreplace")[:limit].decode("utf-8", "ignore").rstrip("\0")


def shown_everywhere_without_control(rendered: str) -> None:
    for line in rendered.split("\n"):
        assert line.isprintable(), repr(line)


# -- the recorder, and where names come out ------------------------------------------------------------


@fuzz_settings(120)
@given(routes=st.lists(st.tuples(methods, names, directions), min_size=1, max_size=10))
@example(routes=[("GET", "\x00", Direction.INBOUND), ("GET", "a\x00", Direction.OUTBOUND)])
@example(routes=[("=cmd|' /C calc'!A0", '=HYPERLINK("http://evil.example")', Direction.INBOUND)])
def test_fuzz_route_names(make_recorder: MakeRecorder, routes: list[tuple[str, str, Direction]]) -> None:
    recorder = make_recorder(app_name="fuzz", max_stored_requests=16, max_routes=16)
    try:
        ids = []
        for n, (method, template, direction) in enumerate(routes):
            route = recorder.route_id(template, method, direction)
            ids.append(route)
            recorder.record(route, 200, 10**15, 10**15 + 1000 * (n + 1))
        snapshot = recorder.snapshot()
        assert snapshot.counters.internal_errors == 0, snapshot.counters
        assert recorder.path is not None
        on_file = read_segment(recorder.path, records=False)
    finally:
        recorder.close(remove=True)
    for (method, template, direction), route in zip(routes, ids):
        assert route != 0  # the table has room for them all
        for keys in (snapshot.route_keys, on_file.route_keys):
            key = keys[route]
            assert (key.method, key.template, key.direction) == (
                stored(method, METHOD_BYTES),
                stored(template, TEMPLATE_BYTES),
                direction,
            )
            assert len(key.method.encode()) <= METHOD_BYTES and len(key.template.encode()) <= TEMPLATE_BYTES
    # `netprof stats`, local: its plain table.
    shown_everywhere_without_control(_render(route_table([snapshot])))
    # `netprof stats --url` and `--watch`: the rich table, drawn as a terminal gets it (without colours).
    rows = [{"app": "fuzz", "direction": "outbound" if r.key.direction else "inbound", "method": r.key.method,
             "route": r.key.template, "count": r.count} for r in snapshot.routes if r.count]  # fmt: skip
    console = Console(file=io.StringIO(), width=400, color_system=None, force_terminal=False)
    console.print(routes_table(rows, title="\x1b]0;title\x07" + routes[0][1]))
    shown_everywhere_without_control(console.file.getvalue())  # type: ignore[attr-defined]
    # netprofd's CSV export, cell by cell (as export._csv_line writes them).
    for record in snapshot.records:
        for text in (record.route.method, record.route.template):
            check_csv_cell(text)


def check_csv_cell(text: str) -> None:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow([spreadsheet_cell(text), 1])
    (cell, number), = list(csv.reader(io.StringIO(out.getvalue(), newline="")))  # fmt: skip
    assert not cell.startswith(FORMULA_STARTS), repr(cell)
    assert cell.removeprefix("'") == text, (cell, text)
    assert number == "1"  # no name ends a row


@fuzz_settings(200)
@given(text=st.one_of(names, st.text()))
def test_fuzz_the_display_and_csv_functions(text: str) -> None:
    """printable(): printable, idempotent, identity on printable text; the
    log formatter: one record, its continuation lines indented; a CSV cell:
    never a formula, the name back from it."""
    shown = printable(text)
    assert shown.isprintable() and printable(shown) == shown
    if text.isprintable():
        assert shown == text
    record = logging.LogRecord(
        "netprofd", logging.WARNING, __file__, 1, "found %s: app %s", (text, text), None
    )
    lines = PrintableFormatter("%(levelname)s %(message)s").format(record).split("\n")
    assert lines[0].startswith("WARNING found ")
    for line in lines:
        assert line.isprintable(), repr(line)
    assert all(line.startswith("    ") for line in lines[1:]), lines
    check_csv_cell(text)


@fuzz_settings(60)
@given(text=st.text(alphabet=st.characters(codec=None, categories=["Cs"]) | st.sampled_from("a/\x1b"),
                    min_size=1, max_size=8),
       method=st.sampled_from(["GET", "\ud800"]), direction=directions)  # fmt: skip
def test_fuzz_names_that_are_not_utf8(
    make_recorder: MakeRecorder, text: str, method: str, direction: Direction
) -> None:
    """A name with a lone surrogate (as surrogateescape decodes bytes that
    are not UTF-8) is interned, shown escaped, and costs no internal error."""
    recorder = make_recorder(app_name="fuzz", max_stored_requests=16, max_routes=4)
    try:
        route = recorder.route_id(text, method, direction)
        recorder.record(route, 200, 10**15, 10**15 + 1000)
        snapshot = recorder.snapshot(records=False)
    finally:
        recorder.close(remove=True)
    assert route != 0 and snapshot.counters.internal_errors == 0, snapshot.counters
    key = snapshot.route_keys[route]
    assert (key.method, key.template) == (stored(method, METHOD_BYTES), stored(text, TEMPLATE_BYTES))


def test_names_that_are_not_utf8_do_not_auto_disable_recording(make_recorder: MakeRecorder) -> None:
    """Regression (found by the fuzzing): route_id() with a lone surrogate
    in a name counted an internal error (UnicodeEncodeError writing the
    route table) and fell back to the overflow route; four such routes in a
    row, as an app interns its routes at start-up, auto-disabled recording."""
    recorder = make_recorder(app_name="fuzz")
    routes = [recorder.route_id(f"/files/\udcff{i}", "GET") for i in range(5)]
    recorder.record(routes[-1], 200, 10**15, 10**15 + 1000)
    snapshot = recorder.snapshot(records=False)
    assert 0 not in routes
    assert snapshot.control.recording and snapshot.counters.internal_errors == 0
    assert snapshot.route_keys[routes[0]].template == "/files/\\udcff0"


# -- the hooks: a route name comes from templates only --------------------------------------------------


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def starlette_app(literal_templates: list[str]) -> Starlette:
    """Templates with path parameters under mounts (the issue's attack) and
    the fuzzed literal ones."""
    routes: list[Any] = [Route(t, _ok, methods=list(KNOWN_METHODS)) for t in literal_templates]
    routes += [
        Route("/items/{item_id}", _ok),
        Mount("/org/{org}", routes=[
            Route("/items/{item_id:int}", _ok),
            Mount("/team/{team}", routes=[Route("/files/{rest:path}", _ok)]),
        ]),
        Mount("/static", routes=[Route("/{name}", _ok)]),
    ]  # fmt: skip
    return Starlette(routes=routes)


def asgi_scope(method: str, path: str, root_path: str) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode("utf-8", "surrogatepass"), "root_path": root_path,
        "query_string": b"", "headers": [(b"host", b"t")], "client": ("127.0.0.1", 1), "server": ("t", 80),
    }  # fmt: skip


async def call_asgi(app: Any, scope: dict[str, Any]) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return int(sent[0]["status"])


# Paths that reach each template, and what they must be recorded as.
CANONICAL = {
    "/items/1": "/items/{item_id}",
    "/org/acme/items/7": "/org/{org}/items/{item_id}",  # (path_format: without the convertor)
    "/org/acme/team/red/files/a/b/c": "/org/{org}/team/{team}/files/{rest}",
    "/static/logo.png": "/static/{name}",
}
# A path a mount takes but none of its routes (a 404) is recorded under the
# mount's template: one name per mount, whatever the path.
MOUNTS = {"/org/{org}/{path}", "/org/{org}/team/{team}/{path}", "/static/{path}"}
path_parts = st.one_of(
    st.sampled_from(["org", "items", "team", "files", "static", "1", "", ".."]),
    st.text(alphabet=st.sampled_from(NASTY + "azAZ09"), max_size=12),
)
paths = st.one_of(
    st.builds(lambda parts: "/" + "/".join(parts), st.lists(path_parts, max_size=6)),
    st.text(max_size=30),
    st.sampled_from(sorted(CANONICAL)).flatmap(lambda p: st.builds(lambda s: p + s, st.text(max_size=10))),
)


@fuzz_settings(80)
@given(
    literal=st.lists(names.map(lambda s: "/" + s.replace("{", "(").replace("}", ")")), max_size=3),
    requests=st.lists(st.tuples(methods, paths, st.one_of(st.just(""), st.just(""), paths)), min_size=1,
                      max_size=12),
)  # fmt: skip
@example(literal=[], requests=[("GET", "/org/\x1b[2J=1+1/items/1", "/org/\x1b[2J=1+1")])
def test_fuzz_requests_through_the_asgi_hook(
    make_recorder: MakeRecorder, literal: list[str], requests: list[tuple[str, str, str]]
) -> None:
    """Whatever path, method and root_path come, a Starlette app's route is
    recorded under one of its templates (or <unmatched>); the app answers as
    it would without the hook."""
    recorder = make_recorder(app_name="fuzz-asgi", max_stored_requests=16, max_routes=64)
    inner = starlette_app(literal)
    app = AsgiMiddleware(inner, recorder=recorder)
    allowed = (
        {stored(t, TEMPLATE_BYTES) for t in [*literal, *CANONICAL.values()]} | MOUNTS | {UNMATCHED, OVERFLOW}
    )
    loop = asyncio.new_event_loop()
    try:
        for path in CANONICAL:
            assert loop.run_until_complete(call_asgi(app, asgi_scope("GET", path, ""))) == 200
        for method, path, root_path in requests:
            scope = asgi_scope(method, path, root_path)
            with_hook = loop.run_until_complete(call_asgi(app, scope))
            assert with_hook == loop.run_until_complete(call_asgi(inner, asgi_scope(method, path, root_path)))
    finally:
        loop.close()
    snapshot = recorder.snapshot(records=False)
    assert snapshot.counters.internal_errors == 0
    recorded = {r.key.template for r in snapshot.routes if r.count}
    assert set(CANONICAL.values()) <= recorded
    assert recorded <= allowed, recorded - allowed
    assert {r.key.method for r in snapshot.routes if r.count} <= {*KNOWN_METHODS, "OTHER"}


def flask_app() -> Flask:
    app = Flask("fuzz")

    @app.route("/items/<int:item_id>", methods=list(KNOWN_METHODS[:-2]))
    def item(item_id: int) -> str:
        return "ok"

    @app.route("/files/<path:name>")
    def files(name: str) -> str:
        return "ok"

    return app


FLASK_TEMPLATES = {"/items/<int:item_id>", "/files/<path:name>", "/static/<path:filename>"}  # (Flask's own)


@fuzz_settings(60)
@given(requests=st.lists(st.tuples(methods, paths, paths), min_size=1, max_size=12))
def test_fuzz_requests_through_the_wsgi_hook(
    make_recorder: MakeRecorder, requests: list[tuple[str, str, str]]
) -> None:
    """The same through the WSGI middleware and a Flask app: PATH_INFO and
    SCRIPT_NAME are request data, the URL rule the template."""
    recorder = make_recorder(app_name="fuzz-wsgi", max_stored_requests=16, max_routes=64)
    app = WsgiMiddleware(flask_app().wsgi_app, recorder=recorder)
    for method, path, script_name in requests:
        environ = {
            "REQUEST_METHOD": method.encode("utf-8", "surrogatepass").decode("latin-1"),
            # As a WSGI server gives them: the path's bytes, each one a latin-1 character.
            "PATH_INFO": path.encode("utf-8", "surrogatepass").decode("latin-1"),
            "SCRIPT_NAME": script_name.encode("utf-8", "surrogatepass").decode("latin-1"),
            "SERVER_NAME": "t", "SERVER_PORT": "80", "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1",
            "QUERY_STRING": "", "wsgi.input": io.BytesIO(b""), "wsgi.errors": io.StringIO(),
        }  # fmt: skip
        body = app(environ, lambda status, headers, exc_info=None: None)
        b"".join(body)
        getattr(body, "close", lambda: None)()
    snapshot = recorder.snapshot(records=False)
    assert snapshot.counters.internal_errors == 0
    recorded = {r.key.template for r in snapshot.routes if r.count}
    assert recorded <= FLASK_TEMPLATES | {UNMATCHED, OVERFLOW}, recorded
    assert {r.key.method for r in snapshot.routes if r.count} <= {*KNOWN_METHODS, "OTHER"}
