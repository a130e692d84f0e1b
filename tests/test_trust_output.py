"""Issue 15, what netprof shows and exports: names that come from outside
(routes, methods, apps, a daemon's error text) are data wherever they appear,
never a spreadsheet formula, terminal control, markup or a forged line; and
the durations shown are what was measured.

Every test runs the real parts: an application process recording through
``Recorder.route_id``/``measure``/``record``, a real netprofd, the real
``netprof`` command and scripts as subprocesses, real notification receivers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from email.message import Message
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.apps.netprofd import API_KEY, NP, PREFIX, Netprofd, daemon_env, netprofd
from tests.apps.receivers import HttpReceiver, LocalHttpServer, smtp_server
from tests.apps.servers import ROOT, server_env, wait_for

# -- an application process ----------------------------------------------------------

# Plays phases of requests; each entry: [template, method, direction, status,
# durations in ns (each one request through record()), or null: one request
# through measure()]. Prints "ready" after each phase and waits for a line on
# stdin before the next; after the last it stays alive until stdin closes, so
# that its segment (and the records in it) stay live.
APP = """\
import json, sys, time
from netprof_core import ProfilingConfig, Recorder
segment_dir, app, implementation, phases = sys.argv[1:]
config = ProfilingConfig(segment_dir=segment_dir, app_name=app, log_slow_requests=False)
recorder = Recorder(config, implementation=implementation)
for at, phase in enumerate(json.loads(phases)):
    if at:
        sys.stdin.readline()
    for template, method, direction, status, durations in phase:
        if durations is None:
            with recorder.measure(template, method, direction) as call:
                call.status = status
            continue
        route = recorder.route_id(template, method, direction)
        for duration in durations:
            start = time.monotonic_ns()
            recorder.record(route, status, start, start + duration, 10, 20)
    print("ready", flush=True)
sys.stdin.readline()
"""

Phase = Sequence[tuple[str, str, int, int, Sequence[int] | None]]


class AppProcess:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"the app process did not record (exit code {self.proc.poll()})"

    def next_phase(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.wait_ready()


@contextlib.contextmanager
def app_process(
    segment_dir: Path, implementation: str, phases: Sequence[Phase], app: str = "shop"
) -> Iterator[AppProcess]:
    proc = subprocess.Popen(
        [sys.executable, "-c", APP, str(segment_dir), app, implementation, json.dumps(phases)],
        cwd=ROOT,
        env=server_env(implementation),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        running = AppProcess(proc)
        running.wait_ready()
        yield running
    finally:
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def netprof(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """The real ``netprof`` command; its output as bytes, as a terminal gets them."""
    env = daemon_env(API_KEY)
    env["COLUMNS"] = "160"
    return subprocess.run(
        [sys.executable, "-m", "netprof_core.cli", *args], cwd=ROOT, env=env, capture_output=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def total_count(daemon: Netprofd, app: str, window: str = "all") -> int:
    entry = daemon.app_stats(app, window)
    return sum(r["count"] for r in entry["routes"]) if entry else 0


# -- 1. CSV formula injection -------------------------------------------------------------

FORMULAS = ['=HYPERLINK("http://x","y")', "+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"]
DANGEROUS_FIRST = ("=", "+", "-", "@", "\t", "\r")
CSV_PHASE: Phase = [
    *((name, "GET", 0, 200, [2_000_000]) for name in FORMULAS),
    ("'=already quoted", "GET", 0, 200, [2_000_000]),
    ("/items/{id}", "GET", 0, 200, [3_000_000, 4_000_000]),
    ("@payments", "+POST", 1, 200, None),  # a client hook's name, through measure()
]
CSV_APP = "-A1"  # a valid app_name that a spreadsheet reads as a formula


def test_csv_export_neutralises_formulas_json_keeps_the_names(
    tmp_path: Path, segment_dir: Path, implementation: str
) -> None:
    sent = {(CSV_APP, method, route) for route, method, *_ in CSV_PHASE}
    records = sum(len(d) if d is not None else 1 for *_, d in CSV_PHASE)
    with (
        netprofd(tmp_path, segment_dir) as daemon,
        app_process(segment_dir, implementation, [CSV_PHASE], app=CSV_APP),
    ):
        daemon.wait_until(lambda: total_count(daemon, CSV_APP) == records, what="the app's requests")
        response = daemon.get(f"{NP}/export/csv")
        assert response.status_code == 200, response.text
        as_json = daemon.get(f"{NP}/export/json").json()
        as_ndjson = [json.loads(line) for line in daemon.get(f"{NP}/export/ndjson").text.splitlines()]
        cli_csv = tmp_path / "cli.csv"
        done = netprof("export", "--url", daemon.url, "--format", "csv", "-o", str(cli_csv))
        assert done.returncode == 0, done.stderr

    for text in (response.text, cli_csv.read_bytes().decode("utf-8")):
        header, *rows = list(csv.reader(io.StringIO(text, newline="")))
        for row in rows:
            for field, cell in zip(header, row):
                assert not cell.startswith(DANGEROUS_FIRST), f"{field} cell {cell!r} is a formula"
        assert len(rows) == records, "a name ended a line (a bare CR) and made rows of its own"
        named = [dict(zip(header, row)) for row in rows]
        # The exporter's own numbers stay numbers; a text cell that starts with
        # a quote had one added, and taking it away gives the name back.
        timed = [float(r["duration_ms"]) for r in named if r["method"] != "'+POST"]
        assert sorted(timed) == [2.0] * 7 + [3.0, 4.0]
        assert all(int(r["pid"]) > 0 and int(r["status"]) == 200 for r in named)
        unquoted = {
            tuple(cell.removeprefix("'") for cell in (r["app"], r["method"], r["route"])) for r in named
        }
        assert unquoted == sent
    # JSON and NDJSON are data, not cells: the names exactly as recorded.
    assert {(r["app"], r["method"], r["route"]) for r in as_json["records"]} == sent
    assert {(r["app"], r["method"], r["route"]) for r in as_ndjson} == sent
    # No browser takes an export for a page.
    assert response.headers["X-Content-Type-Options"] == "nosniff"


# -- 2. terminal escapes, markup ---------------------------------------------------------

TITLE_AND_CLEAR = "/\x1b]0;pwned\x07\x1b[2J"
TERMINAL_ROUTES = [
    TITLE_AND_CLEAR,
    "/c1\x9b31mred",
    "/bidi\u202eevil",
    "/del\x7fx",
    "/nul\x00x",
    "/nl\nAPP fake row",
    "/cr\rover",
    "[bold red]/markup[/]",
    "[/broken]",
]
TERMINAL_PHASE: Phase = [
    *((route, "GET", 0, 200, [1_048, 1_048, 1_001]) for route in TERMINAL_ROUTES),
    ("payments.internal", "\x1b[31mPOST", 1, 200, None),
]
SHOWN = [
    "/\\x1b]0;pwned\\x07\\x1b[2J",
    "/c1\\x9b31mred",
    "/bidi\\u202eevil",
    "/del\\x7fx",
    "/nul\\x00x",
    "/nl\\nAPP fake row",
    "/cr\\rover",
    "[bold red]/markup[/]",
    "[/broken]",
    "\\x1b[31mPOST",
]


def assert_printable(out: bytes, where: str) -> str:
    text = out.decode("utf-8")  # strictly: no stray byte either
    bad = sorted({f"U+{ord(c):04X}" for c in text if c != "\n" and not c.isprintable()})
    assert not bad, f"{where} printed {bad} raw:\n{text!r}"
    return text


def table_lines(text: str) -> list[str]:
    """The lines of the route table: from its header to the last route row."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "APP" in line and "ROUTE" in line)
    end = max(i for i, line in enumerate(lines) if "/markup" in line or "payments.internal" in line)
    return lines[start : end + 1]


def assert_aligned(text: str, where: str) -> None:
    """Every line of the table as wide as the header: no name pushed a column."""
    from rich.cells import cell_len

    widths = {cell_len(line.rstrip()) for line in table_lines(text)}
    assert len(widths) == 1, f"{where}: the table's lines have widths {widths}:\n{text}"


def shown_duration_ns(cell: str) -> float:
    match = re.fullmatch(r"≤?([\d.]+)(ns|µs|ms|s)", cell)
    assert match, f"not a duration: {cell!r}"
    return float(match.group(1)) * {"ns": 1, "µs": 1e3, "ms": 1e6, "s": 1e9}[match.group(2)]


def assert_durations_within_1_percent(text: str, where: str) -> None:
    """The markup route's P50 (1048 ns) and MAX (1048 ns) as shown, within 1 %."""
    (row,) = [line for line in text.splitlines() if "/markup" in line]
    cells = re.findall(r"≤?[\d.]+(?:ns|µs|ms|s)\b", row)
    p50, maximum = shown_duration_ns(cells[0]), shown_duration_ns(cells[-1])
    assert abs(p50 - 1048) <= 10.48 and abs(maximum - 1048) <= 10.48, f"{where}: {row}"


def check_stats_output(done: subprocess.CompletedProcess[bytes], where: str) -> None:
    assert done.returncode == 0, f"{where}: {done.stderr.decode(errors='replace')}"
    text = assert_printable(done.stdout, where)
    assert_printable(done.stderr, f"{where} (stderr)")
    for shown in SHOWN:
        assert shown in text, f"{where} does not show {shown!r}:\n{text}"
    assert_aligned(text, where)
    assert_durations_within_1_percent(text, where)


def test_stats_shows_control_characters_escaped(
    tmp_path: Path, segment_dir: Path, implementation: str
) -> None:
    records = 3 * len(TERMINAL_ROUTES) + 1
    with app_process(segment_dir, implementation, [TERMINAL_PHASE]):
        check_stats_output(netprof("stats", "--segment-dir", str(segment_dir)), "netprof stats")
        watch = ("--watch", "--count", "1", "--interval", "0.1")
        check_stats_output(
            netprof("stats", "--segment-dir", str(segment_dir), *watch), "netprof stats --watch"
        )
        with netprofd(tmp_path, segment_dir) as daemon:
            daemon.wait_until(lambda: total_count(daemon, "shop") == records, what="the app's requests")
            remote = ("stats", "--url", daemon.url, "--window", "all")
            check_stats_output(netprof(*remote), "netprof stats --url")
            check_stats_output(netprof(*remote, *watch), "netprof stats --url --watch")


# -- anything at --url: its names and its error text -------------------------------------

HOSTILE_APP = "\x1b]0;app\x07"
HOSTILE_ERROR = "unknown app '\x1b[2J\x1b]0;pwned\x07'; known apps: \x9b31m"


class HostileDaemon(LocalHttpServer):
    """An HTTP server at --url answering like a netprofd, with control
    characters in every name and message: the CLI and the scripts trust
    nothing they get from the network."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.startswith(f"{PREFIX}/network-stats"):
                    route = {
                        "direction": "inbound", "method": "\x1b[31mGET", "route": TITLE_AND_CLEAR, "count": 3,
                        "rate_per_second": 1.0, "error_percent": 0.0, "slow_percent": 0.0, "p50_ms": 0.001048,
                        "p95_ms": 0.001048, "p99_ms": 0.001048, "max_ms": 0.001048,
                    }  # fmt: skip
                    self.answer(
                        200, {"window": "all", "applications": [{"app": HOSTILE_APP, "routes": [route]}]}
                    )
                else:
                    self.answer(500, {"error": HOSTILE_ERROR, "status": 500})

            def do_POST(self) -> None:
                if "app=" in self.path:
                    self.answer(404, {"error": HOSTILE_ERROR, "status": 404, "parameter": "app"})
                else:
                    failed = [{"path": "/dev/shm/netprof/\x1b[2J.npseg", "reason": "\x07\x1b]0;pwned\x07"}]
                    self.answer(200, {"segments": 1, "failed": failed})

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(Handler)
        self.url = f"http://127.0.0.1:{self.port}"


def test_cli_and_scripts_escape_what_a_daemon_sends() -> None:
    with HostileDaemon() as hostile:
        stats = netprof("stats", "--url", hostile.url, "--window", "all")
        assert stats.returncode == 0, stats.stderr
        text = assert_printable(stats.stdout, "netprof stats --url")
        assert "\\x1b]0;app\\x07" in text and "\\x1b[31mGET" in text and "/\\x1b]0;pwned\\x07\\x1b[2J" in text

        refused = netprof("enable", "--url", hostile.url, "--app", "nosuch")
        assert refused.returncode == 2
        assert "\\x1b[2J\\x1b]0;pwned\\x07" in assert_printable(refused.stderr, "netprof enable (refused)")

        failed = netprof("cleanup", "--url", hostile.url)
        assert failed.returncode == 1
        assert_printable(failed.stdout, "netprof cleanup")
        assert "\\x1b[2J.npseg" in assert_printable(failed.stderr, "netprof cleanup (failures)")

        monitor = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "monitor_network_profiling.py"), "--url", hostile.url,
             "--api-key", API_KEY, "--continuous", "--count", "1", "--interval", "0.1"],
            cwd=ROOT, env=daemon_env(API_KEY), capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert monitor.returncode == 0, monitor.stderr
        shown = assert_printable(monitor.stdout, "monitor_network_profiling.py --continuous")
        assert "ERROR" in shown and "\\x1b[2J" in shown
        once = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "monitor_network_profiling.py"), "--url", hostile.url,
             "--api-key", API_KEY],
            cwd=ROOT, env=daemon_env(API_KEY), capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert once.returncode == 2
        assert "\\x1b[2J" in assert_printable(once.stderr, "monitor_network_profiling.py (error)")


# -- 3. durations as measured --------------------------------------------------------------

MS = 1e6
PHASE_1: Phase = [
    ("/mix", "GET", 0, 200, [1_001, 1_500, 987_654_321]),
    ("/grow", "GET", 0, 200, [2_000]),
]
PHASE_2: Phase = [
    ("/mix", "GET", 0, 200, [1_200, 1_300]),  # the window's largest is not the largest ever
    ("/grow", "GET", 0, 200, [5_000, 1_500]),  # the largest ever, within the window
    ("/late", "GET", 0, 200, [1_048, 1_048, 1_001]),  # only in the window
]


def within_1_percent(shown_ms: float, true_ns: float) -> bool:
    return abs(shown_ms * MS - true_ns) <= 0.01 * true_ns


def routes_of(daemon: Netprofd, window: str) -> dict[str, dict[str, Any]]:
    entry = daemon.app_stats("shop", window)
    assert entry is not None
    return {r["route"]: r for r in entry["routes"]}


def test_network_stats_report_what_was_measured(
    tmp_path: Path, segment_dir: Path, implementation: str
) -> None:
    # Phase 1 is recorded before netprofd starts, so its first checkpoint holds
    # it and the 1m window (shorter than the daemon's life) covers phase 2 only.
    with (
        app_process(segment_dir, implementation, [PHASE_1, PHASE_2]) as app,
        netprofd(tmp_path, segment_dir) as daemon,
    ):
        daemon.wait_until(lambda: total_count(daemon, "shop") == 4, what="phase 1")
        app.next_phase()
        daemon.wait_until(lambda: total_count(daemon, "shop") == 11, what="phase 2")
        every = routes_of(daemon, "all")
        minute = routes_of(daemon, "1m")
        slowest = daemon.stats("all", slowest=3)["slowest_requests"]

    # window=all: the true maximum, exactly; quantiles within 1 %.
    mix = every["/mix"]
    assert mix["count"] == 5 and mix["max_ms"] == 987.654321 and mix["max_exact"] is True
    assert within_1_percent(mix["p50_ms"], 1_300) and within_1_percent(mix["p99_ms"], 987_654_321)
    assert every["/grow"]["max_ms"] == 0.005 and every["/grow"]["max_exact"] is True
    late = every["/late"]
    assert within_1_percent(late["p50_ms"], 1_048) and within_1_percent(late["mean_ms"], 3_097 / 3)
    assert late["max_ms"] == 0.001048 and late["max_exact"] is True
    assert [r["duration_ms"] for r in slowest] == [987.654321, 0.005, 0.002]

    # window=1m: phase 2 only.
    assert {name: r["count"] for name, r in minute.items()} == {"/mix": 2, "/grow": 2, "/late": 3}
    assert within_1_percent(minute["/mix"]["p50_ms"], 1_200) and within_1_percent(
        minute["/late"]["p50_ms"], 1_048
    )
    # The largest ever grew within the window: it is the window's maximum.
    assert minute["/grow"]["max_ms"] == 0.005 and minute["/grow"]["max_exact"] is True
    assert minute["/late"]["max_ms"] == 0.001048 and minute["/late"]["max_exact"] is True
    # It did not: the window's maximum is known to one bucket, and said to be an upper bound.
    assert minute["/mix"]["max_exact"] is False
    assert 0.0013 <= minute["/mix"]["max_ms"] <= 0.0013 * 1.016


# -- alert notifications and log lines -------------------------------------------------------

FORGED_LINE = "resolved: RouteErrors: all clear"
NOTIFIED_ROUTES = [
    f"/a\n{FORGED_LINE}\x1b[2J",
    "/<img src=x onerror=alert(1)>[click](http://evil.example)",
]
ROUTE_ERRORS_RULE = """
[[rules]]
name = "RouteErrors"
metric = "error_rate_percent"
op = ">"
threshold = 0
window = "30s"
route = "*"
min_requests = 1
severity = "critical"
"""
FAST = {"tick_seconds": 0.2, "group_wait_seconds": 0.3, "notify_timeout_seconds": 10.0}


def html_part(message: Message) -> str:
    for part in message.walk():
        if part.get_content_type() == "text/html":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode(part.get_content_charset() or "utf-8")
    raise AssertionError(f"no text/html part in {message}")


def test_alert_notifications_and_log_lines_keep_names_as_text(
    tmp_path: Path, segment_dir: Path, implementation: str
) -> None:
    phase: Phase = [(route, "GET", 0, 500, [2_000_000]) for route in NOTIFIED_ROUTES]
    with HttpReceiver() as receiver, smtp_server() as (smtp_port, mailbox):
        urls = [
            f"json://{receiver.url}/hooks/netprof",
            f"mailto://127.0.0.1:{smtp_port}?from=netprofd@example.com&to=ops@example.com&format=html",
        ]
        extra = f"[notifiers.log]\n[notifiers.apprise]\nurls = {json.dumps(urls)}\n" + ROUTE_ERRORS_RULE
        with netprofd(tmp_path, segment_dir, daemon=FAST, extra=extra) as daemon:
            with app_process(segment_dir, implementation, [phase]):
                wait_for(lambda: receiver.received(), what="the firing notification")
                wait_for(lambda: mailbox.messages, what="the firing email")
                wait_for(lambda: "FIRING RouteErrors" in daemon.log(), what="the log notifier's lines")
            log = daemon.log()

    # Text notifications and the daemon's log: one line per alert, no control character.
    (posted,) = receiver.received()
    lines = posted["message"].splitlines()
    assert len([line for line in lines if line.startswith("firing: RouteErrors:")]) == 2, lines
    assert not [line for line in lines if line.startswith(FORGED_LINE)], lines
    assert "\x1b" not in posted["message"] and "\\x1b[2J" in posted["message"]
    assert "\x1b" not in log and "\\x1b[2J" in log
    forged = [line for line in log.splitlines() if line.startswith(FORGED_LINE)]
    assert not forged, f"a route name wrote a line of the daemon's log: {forged}"
    # apprise sends the body as text: an HTML mail shows the route, never renders it.
    html = html_part(mailbox.messages[0])
    assert "&lt;img" in html and "<img" not in html
    assert "<a " not in html and "[click](http://evil.example)" in html


# The application's own log: netprof's slow-request line names the route.
SLOW_LOGGER = """\
import logging, sys, time
from netprof_core import ProfilingConfig, Recorder
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
segment_dir, implementation, route = sys.argv[1:]
config = ProfilingConfig(segment_dir=segment_dir, app_name="shop", slow_request_threshold=0.001)
recorder = Recorder(config, implementation=implementation)
start = time.monotonic_ns()
recorder.record(recorder.route_id(route), 200, start, start + 50_000_000)
recorder.close()
"""


def test_slow_request_log_line_shows_the_route_escaped(segment_dir: Path, implementation: str) -> None:
    route = f"/a\n{FORGED_LINE}\x1b]0;pwned\x07"
    done = subprocess.run(
        [sys.executable, "-c", SLOW_LOGGER, str(segment_dir), implementation, route],
        cwd=ROOT, env=server_env(implementation), capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    log = assert_printable(done.stderr, "the app's slow-request log line")
    (line,) = [line for line in log.splitlines() if line.startswith("slow request")]
    assert "/a\\nresolved: RouteErrors: all clear\\x1b]0;pwned\\x07 took 0.050 s" in line


# -- a directory that cannot be listed ------------------------------------------------

# Runs `netprof stats` for a directory it cannot list: out of descriptors (the
# limit lowered to what is open once everything is imported), as a process is
# when its host is short of them.
UNLISTABLE = """\
import os, resource, sys
from netprof_core.cli import main
main(["stats", "--segment-dir", sys.argv[1]])  # once as usual: everything it imports, imported
open_now = len(os.listdir("/proc/self/fd")) - 1  # (less the one this listing used)
limit = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now, limit[1]))
status = main(["stats", "--segment-dir", sys.argv[1]])
resource.setrlimit(resource.RLIMIT_NOFILE, limit)  # (for what runs at exit: coverage saves its data)
sys.exit(status)
"""


def test_stats_on_a_directory_it_cannot_list_says_so(tmp_path: Path) -> None:
    """A listing that fails is never shown as "no profiled processes"."""
    done = subprocess.run(
        [sys.executable, "-c", UNLISTABLE, str(tmp_path)],
        cwd=ROOT, env=server_env("python"), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.stdout.count("no profiled processes") == 1, done.stdout  # the first, listable run only
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.startswith("netprof: ") and "Too many open files" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
