"""Fuzzing netprofd's HTTP API (issue 15, "Trust": no 500, no hang, no crash).

One real daemon (``python -m netprof_daemon``) reads a segment directory in
which a real recorder of this process keeps writing, routes with hostile
names included. Hypothesis sends every call of the API query strings built
from its parameters and from random names, values that break number parsers,
unicode, repeated and empty parameters; the silences call JSON bodies of every
shape (and bodies that are not JSON); other paths and methods; and, over raw
sockets, requests that are not HTTP at all.

What must hold for every answer:
- it comes within HANG seconds (a stalled loop, a worker thread that never
  ends, a parser waiting for bytes that never come);
- its status is below 500, but for the documented one: a control call
  answers 500 when every segment it should have reached refused;
- an error (4xx) is JSON with an ``error`` message and its ``status``;
- an export is well-formed (JSON, NDJSON, CSV) and no CSV cell starts a formula.
And after the run the daemon still runs, /healthz says ok, its log holds no
traceback, and it stops cleanly on SIGTERM (the ``netprofd`` helper checks
the exit code).
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from netprof_core import Direction, ProfilingConfig, Recorder
from tests.apps.netprofd import API_KEY, NP, PREFIX, Netprofd, netprofd
from tests.fuzzing import AWKWARD_JSON, AWKWARD_NUMBERS, HUGE_INTS, NUMBER_TEXTS, fuzz_settings

# The HTTP layer is the same whichever core reads the segments.
pytestmark = pytest.mark.any_core

APP = "fuzz-app"
# Longer than any answer may take: the daemon's idle timeout (10 s, the
# default: a request that is never finished is closed then) and some more.
HANG = 15.0
# Route names a hostile or careless app may intern: formulas, escapes, bidi, line breaks.
HOSTILE_ROUTES = (
    ("GET", "/items/{item_id}"),
    ("POST", '=HYPERLINK("http://evil.example","x")'),
    ("GET", "+1+1"),
    ("GET", "-2+3"),
    ("GET", "@SUM(A1:A2)"),
    ("GET", "\t=1"),
    ("GET", "\r=1"),
    ("GET", "'quoted"),
    ("PUT", "/clear\x1b[2J\x1b]0;title\x07"),
    ("GET", "/rtl/\u202egnp.exe"),
    ("GET", '/line\nbreak,"quote"'),
    ("=cmd|", "/method/is/a/formula"),
)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\0")

# The calls, and the query parameters each takes (see api.make_app).
CALLS: dict[tuple[str, str], tuple[str, ...]] = {
    ("GET", f"{PREFIX}/network-stats"): ("window", "app", "slowest"),
    ("POST", f"{NP}/enable"): ("app",),
    ("POST", f"{NP}/disable"): ("app",),
    ("GET", f"{NP}/export/json"): ("since", "until", "route", "status", "min_duration_ms", "app", "limit"),
    ("GET", f"{NP}/export/csv"): ("since", "until", "route", "status", "min_duration_ms", "app", "limit"),
    ("GET", f"{NP}/export/ndjson"): ("since", "until", "route", "status", "min_duration_ms", "app", "limit"),
    ("GET", f"{NP}/memory-usage"): ("app",),
    ("POST", f"{NP}/force-cleanup"): ("app",),
    ("POST", f"{NP}/retention-policy"): ("max_age_hours", "app"),
    ("GET", f"{NP}/production-metrics"): ("app",),
    ("POST", f"{NP}/reset-errors"): ("app",),
    ("GET", f"{NP}/alerts"): ("history",),
    ("GET", f"{NP}/silences"): (),
    ("POST", f"{NP}/silences"): (),
    ("GET", "/healthz"): (),
    ("GET", "/metrics"): (),
}
ALL_PARAMETERS = sorted({name for names in CALLS.values() for name in names})
# The control calls: 500 when every segment refused (docs/NETWORK_PROFILING_API.md).
CONTROL_PATHS = {f"{NP}/{name}" for name in ("enable", "disable", "force-cleanup", "reset-errors")}


# -- the daemon, and a recorder writing under it ------------------------------------------------------


@dataclass
class Target:
    daemon: Netprofd
    recorder: Recorder
    silence_ids: list[str] = field(default_factory=list)
    log_offset: int = 0

    def new_log(self) -> str:
        """What the daemon logged since the last call."""
        text = self.daemon.log()
        new, self.log_offset = text[self.log_offset :], len(text)
        return new


def _traffic(recorder: Recorder, stop: threading.Event) -> None:
    """Requests on every route, a few a second, for as long as the fuzzing runs."""
    routes = [recorder.route_id(template, method) for method, template in HOSTILE_ROUTES]
    routes.append(recorder.route_id("api.example/v1/{id}", "GET", Direction.OUTBOUND))
    i = 0
    while not stop.is_set():
        start = time.monotonic_ns()
        for n, route in enumerate(routes):
            status = (200, 404, 500, 503)[(i + n) % 4]
            recorder.record(route, status, start, start + 1000 * (i % 5000 + n + 1), 100 + n, 2000 + i)
        i += 1
        stop.wait(0.05)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("fuzz-api")
    segment_dir = tmp / "segments"
    segment_dir.mkdir()
    recorder = Recorder(
        ProfilingConfig(segment_dir=str(segment_dir), app_name=APP, max_stored_requests=512, max_routes=32)
    )
    stop = threading.Event()
    writer = threading.Thread(target=_traffic, args=(recorder, stop), name="fuzz-traffic", daemon=True)
    writer.start()
    try:
        with netprofd(tmp, segment_dir) as daemon:
            daemon.wait_until(lambda: daemon.app_stats(APP, "all"), what=f"the daemon to see {APP}")
            yield Target(daemon, recorder)
            stop.set()
            writer.join()
    finally:
        stop.set()
        recorder.close(remove=True)


# -- one request, and what every answer must be -----------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes


def send(
    daemon: Netprofd,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: Sequence[tuple[str, str]] = (),
    *,
    key: bool = True,
) -> Answer:
    """One request on a connection of its own, sent as given (``target`` is
    not re-encoded); it must be answered within HANG seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=HANG)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        if key:
            conn.putheader("Authorization", f"Bearer {API_KEY}")
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
    except TimeoutError as exc:
        pytest.fail(f"{method} {target[:300]!r}: no answer within {HANG} s ({exc})")
    finally:
        conn.close()
    return Answer(response.status, response.getheader("Content-Type", ""), data)


def check(target: Target, method: str, path: str, query: str, answer: Answer) -> None:
    what = f"{method} {path}?{query[:300]!r} -> {answer.status} {answer.body[:300]!r}"
    assert answer.status < 500 or _documented_500(path, answer), what
    if answer.status >= 400:
        assert answer.content_type.startswith("application/json"), what
        error = json.loads(answer.body)
        assert isinstance(error.get("error"), str) and error["error"], what
        assert error.get("status") == answer.status, what
    elif "/export/" in path and answer.status == 200:
        _check_export(path.rsplit("/", 1)[1], answer.body.decode("utf-8"), what)
    elif answer.content_type.startswith("application/json"):
        json.loads(answer.body)
    log = target.new_log()
    assert "Traceback" not in log, f"{what}\n--- netprofd logged ---\n{log[-4000:]}"


def _documented_500(path: str, answer: Answer) -> bool:
    if path not in CONTROL_PATHS or answer.status != 500:
        return False
    body = json.loads(answer.body)
    return body.get("segments") == 0 and bool(body.get("failed"))


def _check_export(fmt: str, text: str, what: str) -> None:
    if fmt == "json":
        document = json.loads(text)
        assert document["count"] == len(document["records"]), what
    elif fmt == "ndjson":
        for line in text.splitlines():
            json.loads(line)
    else:
        rows = list(csv.reader(io.StringIO(text, newline="")))
        assert rows and rows[0][0] == "app", what
        for row in rows[1:]:
            assert len(row) == len(rows[0]), f"{what}: {row!r}"
            starts = [cell for cell in row if cell.startswith(FORMULA_STARTS)]
            assert not starts, f"{what}: cells that start a formula: {starts!r}"


# -- strategies -----------------------------------------------------------------------------------------

known_values = st.sampled_from(
    [APP, "nosuch", "1m", "5m", "15m", "all", "2h", "5xx", "200", "599", "600", "99", "json", "csv",
     "/items/{item_id}", "=HYPERLINK(\"http://evil.example\",\"x\")", "2026-01-01T00:00:00Z",
     "2026-01-01T00:00:00+14:00", "9999-12-31T23:59:59", "0001-01-01", "1970-01-01T00:00:00-23:59",
     "T", "2026-13-45", "1e11", "99999999999"]
)  # fmt: skip
values = st.one_of(
    known_values,
    NUMBER_TEXTS,
    HUGE_INTS.map(str),
    st.integers().map(str),
    st.floats().map(repr),
    st.text(max_size=40),
    st.text(max_size=3).map(lambda s: s * 2000),  # long, within the URL limit once encoded (mostly)
)
names = st.one_of(st.sampled_from(ALL_PARAMETERS), st.text(max_size=12))
# Query-string bytes that are not what a well-behaved client sends: bad
# percent escapes, invalid UTF-8 escaped, separators without names or values.
raw_query = st.text(alphabet="%&=+;?/#azAZ09fFcC~-._!$'()*,:@[]", max_size=40)


def encode_query(pairs: list[tuple[str, str | None]], raw: str) -> str:
    parts = [quote(name, safe="") if value is None else f"{quote(name, safe='')}={quote(value, safe='')}"
             for name, value in pairs]  # fmt: skip
    return "&".join(parts) + raw


def queries(parameters: Sequence[str]) -> st.SearchStrategy[str]:
    """Query strings: mostly the call's own parameters (each maybe repeated
    or without a value), with random ones and raw junk sometimes."""
    own = st.sampled_from(parameters) if parameters else names
    pair_names = st.one_of(own, own, own, names)
    pairs = st.lists(st.tuples(pair_names, st.one_of(st.none(), values, values, values)), max_size=5)
    return st.builds(encode_query, pairs, st.one_of(st.just(""), st.just(""), raw_query))


def ask(target: Target, method: str, path: str, query: str, **kwargs: Any) -> Answer:
    answer = send(target.daemon, method, f"{path}?{query}" if query else path, **kwargs)
    check(target, method, path, query, answer)
    return answer


# -- the calls' parameters ------------------------------------------------------------------------------

GET_CALLS = sorted(key for key in CALLS if key[0] == "GET" and "/export/" not in key[1])
EXPORTS = sorted(key for key in CALLS if "/export/" in key[1])
CONTROL_CALLS = sorted(key for key in CALLS if key[0] == "POST" and not key[1].endswith("/silences"))


@fuzz_settings(200)
@given(call=st.sampled_from(GET_CALLS), data=st.data())
def test_fuzz_the_queries_of_the_reading_calls(target: Target, call: tuple[str, str], data: Any) -> None:
    method, path = call
    ask(target, method, path, data.draw(queries(CALLS[call]), label="query"))


@fuzz_settings(200)
@given(call=st.sampled_from(EXPORTS), data=st.data())
def test_fuzz_the_queries_of_the_exports(target: Target, call: tuple[str, str], data: Any) -> None:
    method, path = call
    ask(target, method, path, data.draw(queries(CALLS[call]), label="query"))


@fuzz_settings(150)
@given(call=st.sampled_from(CONTROL_CALLS), data=st.data())
def test_fuzz_the_queries_of_the_control_calls(target: Target, call: tuple[str, str], data: Any) -> None:
    method, path = call
    ask(target, method, path, data.draw(queries(CALLS[call]), label="query"))


# Every parameter that takes a number (or a time, a status), in its call.
NUMBER_PARAMETERS = (
    (f"{PREFIX}/network-stats", "slowest"),
    (f"{NP}/alerts", "history"),
    (f"{NP}/retention-policy", "max_age_hours"),
    *((f"{NP}/export/json", name) for name in ("since", "until", "status", "min_duration_ms", "limit")),
)


def test_every_number_parameter_takes_every_awkward_number(target: Target) -> None:
    """Not left to chance: each numeric parameter gets each text that number
    parsers disagree on (superscripts, other scripts' digits, 400 digits...)."""
    for path, name in NUMBER_PARAMETERS:
        method = "POST" if path.endswith("retention-policy") else "GET"
        for text in AWKWARD_NUMBERS:
            answer = ask(target, method, path, f"{name}={quote(text, safe='')}")
            if answer.status == 400:
                assert json.loads(answer.body).get("parameter") == name, (name, text, answer.body)
    ask(target, "POST", f"{NP}/retention-policy", "max_age_hours=0")  # no limit again


def test_an_integer_parameter_past_every_float_is_a_400(target: Target) -> None:
    """Regression (found by the fuzzing): ``?slowest=`` or ``?history=`` with
    400 digits answered 500: int() took it, math.isfinite() raised OverflowError."""
    for path, name in ((f"{PREFIX}/network-stats", "slowest"), (f"{NP}/alerts", "history")):
        answer = send(target.daemon, "GET", f"{path}?{name}={'9' * 400}")
        assert answer.status == 400, answer.body
        assert json.loads(answer.body)["parameter"] == name


def test_a_superscript_digit_is_a_400_that_names_the_parameter(target: Target) -> None:
    """Regression (found by the fuzzing): ``?status=²`` (or ``limit``) passed
    str.isdigit(), then int() refused it: a 400 with Python's own message and
    no parameter named."""
    for name in ("status", "limit"):
        answer = send(target.daemon, "GET", f"{NP}/export/json?{name}={quote(chr(0xB2))}")
        assert answer.status == 400, answer.body
        error = json.loads(answer.body)
        assert error.get("parameter") == name and name in error["error"], error


# -- silences: bodies ---------------------------------------------------------------------------------

LABELS = ("alertname", "severity", "app", "route", "method", "direction")
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE_INTS, st.floats(), st.text(max_size=30)
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4))


json_values = st.recursive(json_scalars, _containers, max_leaves=12)
regexes = st.one_of(
    st.sampled_from(
        ["((\\w+)+)+!", "(a|aa)+$", "(/items)\\1", "(?=x)", "(?P<n>x)", "[", "a{100000}", "a{1000}{1000}",
         ".*", "(?i)CHECK.*", "\\p{Greek}+", "x" * 1100, "(((((((((((((((((((((a)))))))))))))))))))))", ""]
    ),
    st.text(alphabet="()[]{}*+?|\\^$.,:=!<>-wdsbpPQEaz019", max_size=40),
)  # fmt: skip
durations = st.one_of(
    st.sampled_from(["2h", "30m", "1h30m", "500ms", "0s", "366d", "367d", "1e3h", "h", "1.5.5h", "-1h", ""]),
    NUMBER_TEXTS, st.integers(), HUGE_INTS, st.floats(), json_values,
)  # fmt: skip
moments = st.one_of(
    st.floats(), st.integers(), HUGE_INTS, known_values, NUMBER_TEXTS, json_values,
    st.just(time.time() + 3600),
)  # fmt: skip
matcher = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(LABELS), st.text(max_size=130), json_values),
     "value": st.one_of(st.text(max_size=30), regexes, json_values)},
    optional={"regex": st.one_of(st.booleans(), json_values), "extra": json_values},
)  # fmt: skip
matchers = st.one_of(
    st.lists(matcher, max_size=18),
    st.dictionaries(
        st.one_of(st.sampled_from(LABELS), st.text(max_size=10)), st.text(max_size=20), max_size=18
    ),
    json_values,
)
silence = st.fixed_dictionaries(
    {"matchers": matchers},
    optional={
        "duration": durations,
        "ends_at": moments,
        "starts_at": moments,
        "comment": st.one_of(st.text(max_size=40), st.text(max_size=2).map(lambda s: s * 700), json_values),
        "created_by": st.one_of(st.text(max_size=40), json_values),
        "unknown": json_values,
    },
)


def _nested(depth: int, opener: str) -> bytes:
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "{":
        return ('{"a":' * depth + "1" + closer * depth).encode()
    return (opener * depth + closer * depth).encode()


bodies = st.one_of(
    silence.map(lambda b: json.dumps(b).encode()),
    silence.map(lambda b: json.dumps(b).encode()),
    json_values.map(lambda b: json.dumps(b).encode()),
    st.builds(_nested, st.integers(1, 30000), st.sampled_from("[{")),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda s: s.encode("utf-8")),
    st.text(max_size=50).map(lambda s: s.encode("utf-16")),
    st.just(b'{"matchers": {"alertname": "x"}, "duration": "1h", "comment": "' + b"x" * 60000 + b'"}'),
    st.just(b"x" * (64 * 1024 + 1)),
)
content_types = st.sampled_from(
    [None, "application/json", "application/json; charset=utf-16", "application/json; charset=nosuch",
     "text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", ""]
)  # fmt: skip


@fuzz_settings(250)
@given(body=bodies, content_type=content_types, query=queries(()))
@example(
    body=b'{"matchers": {"alertname": "x"}, "starts_at": ' + str(10**400).encode() + b', "duration": "1h"}',
    content_type="application/json",
    query="",
)
def test_fuzz_the_bodies_of_new_silences(
    target: Target, body: bytes, content_type: str | None, query: str
) -> None:
    headers = [("Content-Type", content_type)] if content_type is not None else []
    answer = ask(target, "POST", f"{NP}/silences", query, body=body, headers=headers)
    if answer.status == 201:
        target.silence_ids.append(json.loads(answer.body)["id"])


SILENCE_FIELDS = ("matchers", "duration", "ends_at", "starts_at", "comment", "created_by")
MATCHER_FIELDS = ("name", "value", "regex")


def test_every_silence_field_takes_every_awkward_value(target: Target) -> None:
    """Not left to chance: each field of a silence, and of its matcher, gets
    each kind of JSON value at its edges (integers past every float, NaN,
    the wrong type...), the rest of the body being valid."""
    valid: dict[str, Any] = {
        "matchers": [{"name": "alertname", "value": "x", "regex": False}],
        "duration": "1h",
    }
    bodies = []
    for name in SILENCE_FIELDS:
        for value in AWKWARD_JSON:
            body = {**valid, name: value}
            if name == "ends_at":
                del body["duration"]
            bodies.append(body)
    for name in MATCHER_FIELDS:
        bodies.extend(
            {**valid, "matchers": [{**valid["matchers"][0], name: value}]} for value in AWKWARD_JSON
        )
    for body in bodies:
        answer = ask(target, "POST", f"{NP}/silences", "", body=json.dumps(body).encode(),
                     headers=[("Content-Type", "application/json")])  # fmt: skip
        if answer.status == 201:
            target.silence_ids.append(json.loads(answer.body)["id"])
        else:
            assert json.loads(answer.body).get("parameter"), (body, answer.body)


def test_a_silence_time_past_every_float_is_a_400(target: Target) -> None:
    """Regression (found by the fuzzing): an integer past every float in
    ``starts_at``, ``ends_at`` or ``duration`` answered 500 (OverflowError in
    math.isfinite)."""
    huge = 10**400
    for field_name, body in (
        ("starts_at", {"starts_at": huge, "duration": "1h"}),
        ("ends_at", {"ends_at": huge}),
        ("duration", {"duration": huge}),
    ):
        body = {"matchers": {"alertname": "x"}, **body}
        answer = send(target.daemon, "POST", f"{NP}/silences", json.dumps(body).encode(),
                      [("Content-Type", "application/json")])  # fmt: skip
        assert answer.status == 400, (field_name, answer.body)
        assert json.loads(answer.body)["parameter"] == field_name


@fuzz_settings(40)
@given(data=st.data())
def test_fuzz_expiring_silences(target: Target, data: Any) -> None:
    known = target.silence_ids
    silence_id = data.draw(
        st.one_of(st.sampled_from(known), st.text(max_size=80)) if known else st.text(max_size=80), label="id"
    )
    ask(
        target, "DELETE", f"{NP}/silences/{quote(silence_id, safe='')}", data.draw(queries(()), label="query")
    )


# -- other paths and methods ----------------------------------------------------------------------------

segments = st.one_of(
    st.sampled_from(["export", "silences", "..", ".", "", "%2e%2e", "%00", "network-profiling"]),
    st.text(max_size=12).map(lambda s: quote(s, safe="")),
)
methods = st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "TRACE", "PROPFIND"])


@fuzz_settings(60)
@given(method=methods, base=st.sampled_from([PREFIX, NP, f"{NP}/export", f"{NP}/silences", ""]),
       tail=st.lists(segments, max_size=3), query=queries(ALL_PARAMETERS))  # fmt: skip
def test_fuzz_other_paths_and_methods(
    target: Target, method: str, base: str, tail: list[str], query: str
) -> None:
    path = "/".join([base, *tail]) or "/"
    if not path.startswith("/"):
        path = "/" + path
    if method == "HEAD":  # no body to check: the status alone
        answer = send(target.daemon, method, f"{path}?{query}")
        assert answer.status < 500, f"HEAD {path} -> {answer.status}"
        return
    ask(target, method, path, query)


# -- raw requests that are barely HTTP ----------------------------------------------------------------

header_lines = st.one_of(
    st.sampled_from(
        ["Host: x", "Content-Length: -1", "Content-Length: 99999999999999999999", "Content-Length: 5",
         "Content-Length: 1, 2", "Transfer-Encoding: chunked", "Transfer-Encoding: gzip, chunked",
         "Expect: 100-continue", "Connection: close", "Connection: upgrade", "Upgrade: websocket",
         f"Authorization: Bearer {API_KEY}", "Authorization: Bearer \xff\xfe", "Authorization: Basic",
         ": empty name", "No-Colon", " folded: continuation", "X: " + "y" * 9000]
    ),
    st.text(max_size=40),
)  # fmt: skip
RAW_TARGETS = ["/healthz", f"{PREFIX}/network-stats", "*", "http://x/metrics", "/" + "a" * 9000]
request_lines = st.one_of(
    st.builds(
        lambda m, t, v: f"{m} {t} {v}",
        st.one_of(methods, st.text(max_size=10)),
        st.one_of(st.sampled_from(RAW_TARGETS), st.text(max_size=30)),
        st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9.9", "HTTP/1.1x", "", "FOO"]),
    ),
    st.text(max_size=60),
)  # fmt: skip


@fuzz_settings(60)
@given(line=request_lines, headers=st.lists(header_lines, max_size=6),
       body=st.binary(max_size=64), tail=st.binary(max_size=32))  # fmt: skip
@example(line="GET /healthz HTTP/2.0", headers=[], body=b"", tail=b"")  # (answered "HTTP/2.0 200 OK")
@example(line="GET /healthz HTTP/1.1", headers=["Host: x"], body=b"", tail=b"GET /metrics HTTP/1.1\r\n\r\n")
def test_fuzz_raw_requests(target: Target, line: str, headers: list[str], body: bytes, tail: bytes) -> None:
    """Whatever bytes come, an answer is JSON or the connection closes, within HANG s."""
    raw = "\r\n".join([line, *headers]).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body + tail
    with socket.create_connection(("127.0.0.1", target.daemon.port), timeout=HANG) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)  # no more: the daemon must answer or close now
        except OSError:
            pass  # it closed already (a 400, or a refused header): read what it said
        received = _read_all(sock, raw)
    for status, content_type, payload in _responses(received):
        what = f"{raw[:300]!r} -> {status} {payload[:300]!r}"
        assert status < 500, what
        if status >= 400:
            assert content_type.startswith("application/json"), what
            assert isinstance(json.loads(payload).get("error"), str), what
    log = target.new_log()
    assert "Traceback" not in log, f"{raw[:300]!r}\n--- netprofd logged ---\n{log[-4000:]}"


def _read_all(sock: socket.socket, raw: bytes) -> bytes:
    chunks = []
    deadline = time.monotonic() + HANG
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"{raw[:300]!r}: the connection neither answered nor closed within {HANG} s")
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class _Received(io.BufferedReader):
    """The bytes a socket received, read response after response: an
    http.client.HTTPResponse closes its file when its body is read, and
    knows no version but 1.x (aiohttp answers a request of version 2.0 in kind)."""

    def close(self) -> None:
        pass

    def readline(self, size: int | None = -1) -> bytes:
        line = super().readline(size)
        return b"HTTP/1.1 " + line[9:] if line.startswith(b"HTTP/2.0 ") else line


class _Bytes:
    """What http.client.HTTPResponse reads from (it asks a socket for a file)."""

    def __init__(self, stream: _Received) -> None:
        self.stream = stream

    def makefile(self, mode: str) -> _Received:
        return self.stream


def _responses(received: bytes) -> Iterator[tuple[int, str, bytes]]:
    """(status, content type, body) of each response in ``received``."""
    stream = _Received(io.BytesIO(received))
    while stream.peek(1):
        response = http.client.HTTPResponse(_Bytes(stream))  # type: ignore[arg-type]
        try:
            response.begin()
            body = response.read()
        except http.client.HTTPException as exc:
            pytest.fail(f"not an HTTP answer: {received[:500]!r} ({exc!r})")
        yield response.status, response.getheader("Content-Type", ""), body


# -- after it all -----------------------------------------------------------------------------------------


def test_the_daemon_survived_the_fuzzing(target: Target) -> None:
    """Last in this file (pytest keeps the order): the daemon that took every
    example above is alive, ticking and serving, and logged no traceback."""
    daemon = target.daemon
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.fail("netprofd is gone")
    health = send(daemon, "GET", "/healthz", key=False)
    assert health.status == 200, health.body
    assert json.loads(health.body)["status"] == "ok"
    assert send(daemon, "GET", "/metrics").status == 200
    stats = send(daemon, "GET", f"{PREFIX}/network-stats?window=all&app={APP}")
    assert stats.status == 200, stats.body
    assert "Traceback" not in daemon.log(), daemon.log()[-6000:]


def _silence_ids(daemon: Netprofd) -> set[str]:
    answer = send(daemon, "GET", f"{NP}/silences")
    assert answer.status == 200, answer.body
    return {silence["id"] for silence in json.loads(answer.body)["silences"]}


def test_the_fuzzed_silences_survive_a_restart(target: Target) -> None:
    """The state the fuzzing left (every silence a body made, the ones kept:
    those that ended over a day ago are not) keeps no daemon from starting
    again, and comes back whole."""
    daemon = target.daemon
    assert target.silence_ids, "the fuzzing made no silence"
    before = _silence_ids(daemon)
    assert daemon.stop() == 0, daemon.fail("netprofd did not stop cleanly")
    daemon.start()
    assert _silence_ids(daemon) == before
    assert "Traceback" not in daemon.log(), daemon.log()[-6000:]
