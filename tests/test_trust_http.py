"""netprofd's HTTP surface and start-up under attack (issue 15, "Trust"): idle
and slow connections, malformed requests and bodies, a listen address that is
not what it looks like, a weak key, and a first tick that takes long.

No mocks: each test runs the real ``python -m netprof_daemon`` and speaks to it
over raw TCP sockets and HTTP, as a neighbour on the host would.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.apps.netprofd import (
    API_KEY,
    NP,
    PREFIX,
    START_TIMEOUT,
    Netprofd,
    daemon_env,
    netprofd_argv,
    write_daemon_config,
)
from tests.apps.servers import ROOT, free_port

# The HTTP layer is the same whichever core reads the segments.
pytestmark = pytest.mark.any_core

# What the daemon must do however it is attacked: answer within this.
PROMPT = 3.0
# The documented default of daemon.idle_timeout_seconds.
IDLE_DEADLINE = 10.0
# Systemd's default soft RLIMIT_NOFILE (without LimitNOFILE= in the unit).
SYSTEMD_DEFAULT_NOFILE = 1024


# -- a daemon started with limits of its own ---------------------------------------


class LimitedNetprofd(Netprofd):
    """A netprofd process with an RLIMIT_NOFILE of its own, and optionally
    started through a wrapper command (a private mount namespace)."""

    def __init__(self, *args: Any, nofile: int | None = None, wrapper: Sequence[str] = ()) -> None:
        super().__init__(*args)
        self.nofile = nofile
        self.wrapper = list(wrapper)

    def _limit(self) -> None:
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, *netprofd_argv(self.config)],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self._limit,  # noqa: PLW1509  (the test's process starts no threads of its own)
            )


@contextlib.contextmanager
def started(
    tmp: Path,
    segment_dir: Path,
    *,
    nofile: int | None = None,
    daemon: Mapping[str, Any] | None = None,
    name: str = "netprofd",
    launch_only: bool = False,
) -> Iterator[LimitedNetprofd]:
    port = free_port()
    config = write_daemon_config(
        tmp / f"{name}.toml", segment_dir, tmp / f"{name}-state", port, daemon=daemon
    )
    process = LimitedNetprofd(config, port, tmp / f"{name}.log", daemon_env(), API_KEY, nofile=nofile)
    try:
        process.launch() if launch_only else process.start()
        yield process
    finally:
        process.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def keyed_client(d: Netprofd) -> httpx.Client:
    """A new client (a new connection), as an operator's curl would be."""
    return httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=PROMPT + 2)


def timed_get(client: httpx.Client, path: str) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = client.get(path)
    return response, time.monotonic() - start


# -- raw TCP -----------------------------------------------------------------------------


def connect_many(port: int, count: int, send: bytes = b"") -> list[socket.socket]:
    """``count`` connections, opened a hundred at a time as an attacker would
    (each batch given up to 2 s for the handshakes, never waiting for an
    accept: a daemon out of descriptors accepts none), each sending ``send``."""
    made: list[socket.socket] = []
    while len(made) < count:
        batch = []
        for _ in range(min(100, count - len(made))):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            batch.append(sock)
        pending = {sock.fileno(): sock for sock in batch}
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLOUT)
        deadline = time.monotonic() + 2
        while pending and time.monotonic() < deadline:
            for fd, _ in poller.poll(200):
                sock = pending.pop(fd)
                poller.unregister(fd)
                if send:
                    with contextlib.suppress(OSError):
                        sock.send(send)
        made.extend(batch)
    return made


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the other end closed (EOF or reset); never blocks."""
    try:
        return sock.recv(65536, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError as exc:
        return exc.errno in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE, errno.ECONNREFUSED)


def close_all(socks: Sequence[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def exchange(port: int, data: bytes, timeout: float = PROMPT + 2) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as it is, read the answer until the daemon closes (or
    ``timeout``): (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            received += chunk
            head, sep, body = received.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                break
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    assert match, f"no HTTP answer to {data[:80]!r}: {received[:200]!r}"
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(match.group(1)), headers, body


def assert_json_error(
    status: int, headers: Mapping[str, str], body: bytes, expected: range
) -> dict[str, Any]:
    assert status in expected, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (headers, body[:300])
    answer = json.loads(body)
    assert answer["status"] == status and isinstance(answer["error"], str) and answer["error"], answer
    assert len(answer["error"]) < 1000, "the answer does not echo an attacker's kilobytes"
    return answer  # type: ignore[no-any-return]


# == 1. connections ===========================================================================


def test_a_thousand_idle_connections_leave_the_api_and_the_descriptors_alone(
    tmp_path: Path, segment_dir: Path
) -> None:
    """The attack: ~1,000 idle connections (no key needed) used every
    descriptor of a netprofd under systemd's default limit, and with them its
    listing of the segments. Now: a keyed call and /healthz answer at once, and
    the descriptors stay far from the limit."""
    with started(tmp_path, segment_dir, nofile=SYSTEMD_DEFAULT_NOFILE) as d:
        assert d.proc is not None
        idle = connect_many(d.port, 1300)
        slow = connect_many(d.port, 200, send=b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        try:
            time.sleep(1.5)
            with keyed_client(d) as client:
                api, api_took = timed_get(client, f"{NP}/memory-usage")
            assert api.status_code == 200 and api_took < PROMPT, (api.status_code, api_took, api.text)
            with keyed_client(d) as client:
                health, health_took = timed_get(client, "/healthz")
            assert health.status_code == 200 and health_took < PROMPT, (health.text, health_took)
            fds = open_fds(d.proc.pid)
            assert fds <= SYSTEMD_DEFAULT_NOFILE // 2, f"{fds} descriptors open of {SYSTEMD_DEFAULT_NOFILE}"
            # Those beyond the cap were closed at once (the oldest idle ones first).
            closed = sum(closed_by_peer(sock) for sock in idle + slow)
            assert closed >= 1500 - SYSTEMD_DEFAULT_NOFILE // 4, closed
        finally:
            close_all(idle + slow)
        with keyed_client(d) as client:
            metrics = client.get("/metrics").text
        closed_at_cap = re.findall(
            r'^netprofd_http_connections_closed_total\{reason="\w+"\} (\S+)$', metrics, re.MULTILINE
        )
        assert sum(map(float, closed_at_cap)) >= 1000, metrics[-2000:]
        assert "Traceback" not in d.log()


def test_idle_and_slow_connections_are_closed_after_the_deadline(tmp_path: Path, segment_dir: Path) -> None:
    """A connection that has not sent a whole request head within the
    deadline is closed, however it trickles bytes (slowloris); so is one idle
    after an answer."""
    with started(tmp_path, segment_dir) as d:
        assert d.proc is not None
        baseline = open_fds(d.proc.pid)
        idle = connect_many(d.port, 50)
        slow = connect_many(d.port, 50, send=b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        served = socket.create_connection(("127.0.0.1", d.port), timeout=PROMPT)
        served.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert served.recv(65536).startswith(b"HTTP/1.1 200")  # kept alive, then idle
        try:
            time.sleep(1.0)
            assert open_fds(d.proc.pid) >= baseline + 100
            deadline = time.monotonic() + IDLE_DEADLINE + 4
            while time.monotonic() < deadline:
                for sock in slow:  # a header byte now and then never buys more time
                    with contextlib.suppress(OSError):
                        sock.send(b"X")
                time.sleep(1.0)
            still_open = [s for s in [*idle, *slow, served] if not closed_by_peer(s)]
            assert not still_open, f"{len(still_open)} of 101 connections still open after the deadline"
            assert open_fds(d.proc.pid) <= baseline + 2
        finally:
            close_all([*idle, *slow, served])


def test_the_connection_cap_and_the_deadline_are_configurable(tmp_path: Path, segment_dir: Path) -> None:
    with started(tmp_path, segment_dir, daemon={"max_connections": 20, "idle_timeout_seconds": 1.0}) as d:
        assert d.proc is not None
        baseline = open_fds(d.proc.pid)
        idle = connect_many(d.port, 200)
        try:
            time.sleep(0.5)
            assert open_fds(d.proc.pid) <= baseline + 20 + 2
            assert d.get("/healthz").status_code == 200  # a new connection still gets in
            time.sleep(2.5)
            assert all(closed_by_peer(sock) for sock in idle)
        finally:
            close_all(idle)
        metrics = d.get("/metrics").text
        assert re.search(r"^netprofd_http_connections \d", metrics, re.MULTILINE), metrics[-1500:]


# == 2. malformed requests ===========================================================================

_MALFORMED = {
    "bad-request-line": b"GARBAGE\r\n\r\n",
    "bad-method": b"G(T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "https-on-http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),
    "bad-version": b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    "long-url": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "long-header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    "many-headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: y\r\n" % i for i in range(300))
    + b"\r\n",
    "bad-header-line": b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "nul-in-path": b"GET /heal\x00thz HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad-content-length": b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "length-and-chunked": (
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "bad-chunk-size": (
        f"POST {NP}/silences HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n"
    ).encode(),
    "bad-chunk-unauthenticated": (
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nnot-hex\r\n\r\n"
    ),
}


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitedNetprofd]:
    tmp = tmp_path_factory.mktemp("http")
    segments = tmp / "segments"
    segments.mkdir()
    with started(tmp, segments) as d:
        yield d


@pytest.mark.parametrize("data", list(_MALFORMED.values()), ids=list(_MALFORMED))
def test_malformed_requests_get_a_json_4xx(shared_daemon: LimitedNetprofd, data: bytes) -> None:
    status, headers, body = exchange(shared_daemon.port, data)
    assert_json_error(status, headers, body, range(400, 500))


_BAD_BODIES = {
    "deeply-nested-list": (b"[" * 30_000 + b"]" * 30_000, "application/json"),
    "deeply-nested-object": (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "application/json"),
    "not-json": (b"{matchers: nope", "application/json"),
    "not-utf8": (b'{"comment": "\xff\xfe"}', "application/json"),
    "unknown-charset": (b"{", "application/json; charset=no-such-charset"),
    "empty": (b"", "application/json"),
}


@pytest.mark.parametrize(("body", "content_type"), list(_BAD_BODIES.values()), ids=list(_BAD_BODIES))
def test_bodies_that_cannot_be_parsed_get_a_400_naming_the_body(
    shared_daemon: LimitedNetprofd, body: bytes, content_type: str
) -> None:
    response = shared_daemon.http.post(f"{NP}/silences", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 400, response.text[:300]
    assert response.json()["parameter"] == "body", response.text[:300]
    assert "body" in response.json()["error"]


def test_a_body_too_large_gets_a_json_413(shared_daemon: LimitedNetprofd) -> None:
    response = shared_daemon.http.post(f"{NP}/silences", content=b"[" + b" " * 200_000 + b"]")
    assert response.status_code == 413 and response.json()["status"] == 413, response.text[:300]
    assert "bytes" in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "query"),
    [
        (f"{PREFIX}/network-stats", {"x" * 5000: "1"}),  # an unknown parameter's name
        (f"{PREFIX}/network-stats", {"window": "y" * 5000}),
        (f"{NP}/export/json", {"since": "z" * 5000}),
    ],
    ids=["unknown-name", "window", "since"],
)
def test_an_error_does_not_echo_kilobytes_of_the_request(
    shared_daemon: LimitedNetprofd, path: str, query: dict[str, str]
) -> None:
    response = shared_daemon.http.get(path, params=query)
    assert response.status_code == 400, response.text[:300]
    assert len(response.content) < 2000, len(response.content)


def test_a_body_that_never_arrives_is_given_up(tmp_path: Path, segment_dir: Path) -> None:
    with started(tmp_path, segment_dir, daemon={"idle_timeout_seconds": 1.0}) as d:
        head = (
            f"POST {NP}/silences HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        ).encode()
        start = time.monotonic()
        status, headers, body = exchange(d.port, head, timeout=10)
        assert time.monotonic() - start < 5
        answer = assert_json_error(status, headers, body, range(408, 409))
        assert "body" in answer["error"]


def test_a_thousand_junk_requests_log_a_line_or_two_not_tracebacks(tmp_path: Path, segment_dir: Path) -> None:
    """Each junk request logged a full traceback (a log flood any local user
    could cause without a key). Now: the first one line, then a count."""
    with started(tmp_path, segment_dir) as d:
        before = d.log().count("\n")
        junk = [*_MALFORMED.values()]
        nested = b"[" * 50_000
        keyed = (
            f"POST {NP}/silences HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(nested)}\r\n\r\n"
        ).encode() + nested
        for at in range(1000):
            status, _, _ = exchange(d.port, keyed if at % 4 == 0 else junk[at % len(junk)])
            assert 400 <= status < 500, status
        time.sleep(0.5)
        grown = d.log().splitlines()[before:]
        assert "Traceback" not in "\n".join(grown)
        assert len(grown) <= 6, "\n".join(grown[:20])
        assert d.get("/healthz").status_code == 200
        code = d.stop()
        assert code == 0
        # The count of what was not logged one by one is told (here, at the stop).
        assert re.search(r"\b\d{3} more (malformed|bad) requests?\b", d.log()), d.log()[-3000:]


# == 3. the listen address ==============================================================================


def write_config(path: Path, listen: str, *, require_auth: bool, extra: str = "") -> Path:
    path.write_text(
        f'[daemon]\nlisten = "{listen}"\nrequire_auth = {str(require_auth).lower()}\n'
        f'state_dir = "{path.parent / "state"}"\n{extra}',
        encoding="utf-8",
    )
    return path


def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), cwd=ROOT, env=dict(env or daemon_env(None)), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.evil.example", False),  # a name that merely starts with 127. (does not resolve here)
        ("0.0.0.0", False),
        ("[::]", False),
        ("0", False),  # 0.0.0.0 spelled short
        ("localhost", True),
        ("127.0.0.2", True),
        ("[::1]", True),
    ],
)
def test_no_key_only_where_every_address_of_the_host_is_loopback(
    tmp_path: Path, host: str, loopback: bool
) -> None:
    config = write_config(tmp_path / "d.toml", f"{host}:{free_port()}", require_auth=False)
    done = run(netprofd_argv(config, "--check"))
    if loopback:
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 2, done.stdout + done.stderr
        assert "daemon.listen" in done.stderr and str(config) in done.stderr, done.stderr


def _private_hosts(tmp_path: Path, line: str) -> list[str]:
    """A wrapper running a command in a mount namespace of its own where
    /etc/hosts holds ``line``: a host name resolving where the test says."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /etc/hosts")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{line}\n", encoding="utf-8")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind {hosts} /etc/hosts && getent hosts evil-probe.example"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if probe.returncode not in (0, 2):
        pytest.skip(f"cannot bind-mount /etc/hosts in a private namespace: {probe.stderr.strip()}")
    return ["unshare", "-m", "sh", "-c", f'mount --bind {hosts} /etc/hosts && exec "$@"', "netprofd"]


def _listening(port: int) -> list[str]:
    """The local addresses listening on ``port`` (from /proc/net/tcp{,6})."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hexport = local.partition(":")
                if state == "0A" and int(hexport, 16) == port:
                    found.append(address)
    return found


def test_a_name_resolving_to_every_interface_is_refused_without_a_key(tmp_path: Path) -> None:
    """The attack: 127.evil.example resolved to 0.0.0.0, passed the check of
    the name's first characters, and served the API with no key to anyone."""
    wrapper = _private_hosts(tmp_path, "0.0.0.0 127.evil.example")
    port = free_port()
    config = write_config(tmp_path / "d.toml", f"127.evil.example:{port}", require_auth=False)
    config.write_text(
        config.read_text(encoding="utf-8")
        + f'\n[network_profiling]\nsegment_dir = "{tmp_path / "segments"}"\n',
        encoding="utf-8",
    )
    done = run([*wrapper, *netprofd_argv(config, "--check")])
    assert done.returncode == 2, done.stdout + done.stderr
    assert "0.0.0.0" in done.stderr and "daemon.listen" in done.stderr and str(config) in done.stderr
    process = LimitedNetprofd(config, port, tmp_path / "start.log", daemon_env(None), None, wrapper=wrapper)
    try:
        process.launch()
        assert process.proc is not None
        try:
            code = process.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"netprofd started without a key, listening on {_listening(port)}")
        assert code == 2, process.log()
        assert _listening(port) == []
    finally:
        process.close()


def test_a_loopback_name_binds_the_addresses_it_was_checked_for(tmp_path: Path, segment_dir: Path) -> None:
    wrapper = _private_hosts(tmp_path, "127.0.0.3 metrics.internal.example")
    port = free_port()
    config = write_daemon_config(
        tmp_path / "d.toml", segment_dir, tmp_path / "state", port,
        daemon={"listen": f"metrics.internal.example:{port}", "require_auth": False},
    )  # fmt: skip
    process = LimitedNetprofd(config, port, tmp_path / "d.log", daemon_env(None), None, wrapper=wrapper)
    try:
        process.launch()
        assert process.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and not _listening(port):
            assert process.proc.poll() is None, process.log()
            time.sleep(0.1)
        assert _listening(port) == ["0300007F"]  # 127.0.0.3, and nothing else
        assert httpx.get(f"http://127.0.0.3:{port}/healthz", timeout=PROMPT + 2).status_code in (200, 503)
    finally:
        process.close()


# == 3b. the key ========================================================================================


def test_a_weak_key_file_is_warned_about(tmp_path: Path, segment_dir: Path) -> None:
    key = tmp_path / "api_key"
    key.write_text("short-key\n", encoding="utf-8")
    key.chmod(0o644)
    port = free_port()
    config = write_daemon_config(
        tmp_path / "d.toml", segment_dir, tmp_path / "state", port, daemon={"api_key_file": str(key)}
    )
    done = run(netprofd_argv(config, "--check"))
    assert done.returncode == 0, done.stderr
    assert f"{key}" in done.stderr and "0644" in done.stderr, done.stderr
    assert "16 bytes" in done.stderr, done.stderr
    log = tmp_path / "d.log"
    process = LimitedNetprofd(config, port, log, daemon_env(None), "short-key")
    try:
        process.start()
        assert "0644" in process.log() and "16 bytes" in process.log(), process.log()
    finally:
        process.close()
    key.chmod(0o600)
    key.write_text("a-key-of-thirty-two-characters-x\n", encoding="utf-8")
    done = run(netprofd_argv(config, "--check"))
    assert done.returncode == 0 and "warning" not in done.stderr.lower(), done.stderr


# == 4. start-up ========================================================================================

_MAKE_SEGMENTS = """
import sys
from netprof_core import ProfilingConfig, Recorder
for at in range(int(sys.argv[2])):
    Recorder(ProfilingConfig(segment_dir=sys.argv[1], app_name=f"app{at % 7}", max_memory_mb=1))
"""


def test_healthz_answers_while_the_first_tick_is_still_reading(tmp_path: Path, segment_dir: Path) -> None:
    """The first tick ran before the port was bound: a first tick that takes
    long (here: a thousand ended processes to fold) or never ends kept netprofd
    from answering at all (a crash loop under systemd). Now /healthz answers
    from the start, saying the daemon has not read the segments yet, and the
    other calls say it is starting."""
    made = subprocess.run(
        [sys.executable, "-c", _MAKE_SEGMENTS, str(segment_dir), "1000"],
        cwd=ROOT, env=daemon_env(None), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    with started(tmp_path, segment_dir, launch_only=True) as d:
        assert d.proc is not None
        first: httpx.Response | None = None
        during: httpx.Response | None = None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert d.proc.poll() is None, d.log()
            try:
                health = d.http.get("/healthz", timeout=PROMPT)
            except httpx.HTTPError:
                time.sleep(0.02)
                continue
            first = first or health
            if health.json()["ticks"] == 0 and during is None:
                during = d.get(f"{NP}/memory-usage")
            if health.status_code == 200:
                break
        assert first is not None, d.log()
        assert first.status_code == 503 and first.json()["ticks"] == 0, first.text
        assert first.json()["status"] == "starting"
        assert during is not None and during.status_code == 503, during
        assert "starting" in during.json()["error"], during.text
        assert d.http.get("/healthz").status_code == 200
        assert d.stats()["applications"]  # what the first tick folded is there
