"""netprofd's configuration: the shared ``network_profiling`` table plus the
daemon's own ``daemon`` table, from one TOML or JSON file."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from netprof_core.config import (
    ConfigError,
    ProfilingConfig,
    check_table,
    check_values,
    profiling_config_from_mapping,
    read_config_file,
    setting,
)

from .rules import Rule, builtin_rules, parse_rules

__all__ = (
    "ApiKey", "DaemonConfig", "DaemonSettings", "ListenAddress", "load_daemon_config", "parse_listen",
    "resolve_listen",
)  # fmt: skip

_LISTEN = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")
# A shorter key is warned about: it may be guessed (the guide makes 32 random bytes).
MIN_KEY_BYTES = 16
# (family, sockaddr) as getaddrinfo gives them, ready for socket() and bind().
ListenAddress = tuple[socket.AddressFamily, tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """The ``daemon`` table."""

    listen: str = setting(
        "127.0.0.1:9465",
        "HOST:PORT the HTTP API and /metrics listen on (loopback unless you say otherwise)",
        pattern=_LISTEN,
        pattern_hint='"HOST:PORT", e.g. "127.0.0.1:9465"',
    )
    api_key_file: str = setting(
        "", "File holding the API key (NETPROF_API_KEY, when set, wins)", pattern=re.compile(r".*")
    )
    require_auth: bool = setting(True, "Require the bearer key; false is allowed only on a loopback address")
    metrics_require_auth: bool = setting(
        False, "Require the bearer key on /metrics too (scrapers often have none)"
    )
    state_dir: str = setting("/var/lib/netprofd", "Where the daemon keeps its state")
    tick_seconds: float = setting(1.0, "Seconds between snapshots of every segment", lo=0.05, hi=60)
    # Alerting: the lifecycle of alerts and the delivery of notifications.
    group_wait_seconds: float = setting(
        5.0, "Alerts that fire within this many seconds go out as one notification", hi=3600
    )
    repeat_interval_seconds: float = setting(
        4 * 3600.0, "Notify again about an alert still firing after this long", lo=1, hi=30 * 86400
    )
    notify_timeout_seconds: float = setting(
        10.0, "Time a notifier plugin has for one delivery", lo=0.1, hi=600
    )
    notify_max_attempts: int = setting(
        8, "Deliveries tried per notification and plugin before giving up", lo=1, hi=100
    )
    overhead_alert_ms: float = setting(
        2.0, "Alert (and auto-disable) when record() costs more than this on average", lo=0.001, hi=1000
    )
    # The HTTP listener's limits (docs/DEPLOYMENT.md: how they fit LimitNOFILE).
    max_connections: int = setting(
        512,
        "HTTP connections open at once; at the cap a new one closes the longest idle one, or is "
        "refused (lowered to a quarter of RLIMIT_NOFILE where that is less)",
        lo=8,
        hi=65536,
    )
    idle_timeout_seconds: float = setting(
        10.0,
        "An HTTP connection that has not sent a whole request (head and body) this long after it "
        "opened or got its last answer is closed: idle, slow and partial requests alike",
        lo=0.1,
        hi=3600,
    )

    def __post_init__(self) -> None:
        check_values(self)

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


def parse_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 in brackets) as (host, port); ValueError names what is wrong."""
    if not _LISTEN.fullmatch(listen):
        raise ValueError(f'listen = {listen!r}: expected "HOST:PORT", e.g. "127.0.0.1:9465"')
    host, _, port = listen.rpartition(":")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"listen = {listen!r}: port {port} is not within 0 and 65535")
    return host.strip("[]"), int(port)


def resolve_listen(host: str, port: int) -> list[ListenAddress]:
    """Every address ``host`` stands for (what netprofd binds); ValueError
    when it stands for none."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"{host!r} does not resolve ({getattr(exc, 'strerror', None) or exc})") from None
    addresses = [
        (family, sockaddr)
        for family, _, _, _, sockaddr in found
        if family in (socket.AF_INET, socket.AF_INET6)
    ]
    if not addresses:
        raise ValueError(f"{host!r} resolves to no IPv4 or IPv6 address")
    return list(dict.fromkeys(addresses))  # each once, in the resolver's order


def _not_loopback(addresses: list[ListenAddress]) -> list[str]:
    return [
        str(sockaddr[0]) for _, sockaddr in addresses if not ipaddress.ip_address(sockaddr[0]).is_loopback
    ]


def _loopback_problem(listen: str) -> str | None:
    """Why ``listen`` is not loopback only: a name is resolved, and every
    address it stands for must be loopback (a name is no proof: 127.x.example
    may stand for 0.0.0.0)."""
    try:
        addresses = resolve_listen(*parse_listen(listen))
    except ValueError as exc:
        return str(exc)
    public = _not_loopback(addresses)
    if public:
        return f"it stands for {', '.join(public)}, not a loopback address"
    return None


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything netprofd reads from its file."""

    source: str
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    notifiers: Mapping[str, Any] | None = None  # None: no ``notifiers`` table (the log notifier alone)
    rules: tuple[Rule, ...] = ()  # the custom ones; see all_rules()

    def all_rules(self) -> list[Rule]:
        """The built-in rules (from the guide's keys) and the custom ones."""
        builtin = builtin_rules(self.profiling, overhead_ms=self.daemon.overhead_alert_ms)
        custom = {rule.name for rule in self.rules}
        return [rule for rule in builtin if rule.name not in custom] + list(self.rules)

    def api_key(self) -> str | None:
        """The key from NETPROF_API_KEY, else from ``api_key_file``; None when neither."""
        return self.read_api_key().value

    def read_api_key(self) -> ApiKey:
        """The key (as api_key()) and what is weak about it: a file that others
        may read, a key too short to resist guessing."""
        key = os.environ.get("NETPROF_API_KEY", "").strip()
        if key:
            return ApiKey(key, _short_key(key, "NETPROF_API_KEY"))
        path = self.daemon.api_key_file
        if not path:
            return ApiKey(None)
        problem = f"{self.source}: daemon.api_key_file"
        try:
            with open(path, "rb") as f:
                mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)  # of the file read, not of a later one
                key = f.read().decode("utf-8").strip()
        except OSError as exc:
            raise ConfigError([f"{problem}: cannot read {path}: {exc.strerror}"], self.source) from None
        except UnicodeDecodeError:
            raise ConfigError([f"{problem}: {path} is not UTF-8 text"], self.source) from None
        if not key:
            raise ConfigError([f"{problem}: {path} is empty"], self.source)
        warnings = _short_key(key, f"{problem} ({path})")
        if mode & 0o077:
            warnings.append(
                f"{problem}: {path} has mode {mode:04o}: other users than its owner may read or change "
                "the key; make it 0400 or 0600, owned by netprofd"
            )
        return ApiKey(key, warnings)

    def listen_addresses(self) -> list[ListenAddress]:
        """What netprofd binds: every address ``daemon.listen`` stands for,
        checked again (all loopback) when no key is required. ConfigError
        names the key and the file."""
        listen = self.daemon.listen
        try:
            addresses = resolve_listen(*parse_listen(listen))
        except ValueError as exc:
            raise ConfigError([f"{self.source}: daemon.listen = {listen!r}: {exc}"], self.source) from None
        public = _not_loopback(addresses)
        if public and not self.daemon.require_auth:
            raise ConfigError(
                [
                    f"{self.source}: daemon.require_auth = false is allowed only on a loopback address: "
                    + f"daemon.listen = {listen!r} stands for {', '.join(public)}"
                ],
                self.source,
            )
        return addresses


@dataclass(frozen=True, slots=True)
class ApiKey:
    """The API key (None: no key configured) and warnings about its strength."""

    value: str | None
    warnings: list[str] = field(default_factory=list)


def _short_key(key: str, where: str) -> list[str]:
    size = len(key.encode("utf-8"))
    if size >= MIN_KEY_BYTES:
        return []
    return [f"{where}: the API key is {size} bytes, shorter than {MIN_KEY_BYTES} bytes: it may be guessed"]


def daemon_config_from_mapping(
    data: Mapping[str, Any], source: str, *, listen: str | None = None
) -> DaemonConfig:
    """Validate a parsed file; every problem of every table is reported in one ConfigError."""
    problems: list[str] = []
    try:
        profiling = profiling_config_from_mapping(data, source)
    except ConfigError as exc:
        problems.extend(exc.problems)
        profiling = ProfilingConfig()
    values = check_table(DaemonSettings, data.get("daemon", {}), f"{source}: daemon", problems)
    if "listen" in values:
        try:
            parse_listen(values["listen"])
        except ValueError as exc:
            problems.append(f"{source}: daemon.{exc}")
    if listen is not None:  # --listen wins over the file
        try:
            parse_listen(listen)
            values["listen"] = listen
        except ValueError as exc:
            problems.append(f"--listen: {exc}")
    # Checked whatever else is wrong in the file, so that --check prints every error at once.
    if values.get("require_auth") is False:
        address = values.get("listen", DaemonSettings().listen)
        with contextlib.suppress(ValueError):  # a malformed listen is reported above
            parse_listen(address)
            why = _loopback_problem(address)
            if why is not None:
                problems.append(
                    f"{source}: daemon.require_auth = false is allowed only on a loopback address: "
                    f"daemon.listen = {address!r}: {why}"
                )
    settings = DaemonSettings(**values) if not problems else DaemonSettings()
    notifiers = data.get("notifiers")
    for name, table in notifiers.items() if isinstance(notifiers, Mapping) else ():
        if not isinstance(table, Mapping):
            problems.append(f"{source}: notifiers.{name} = {table!r}: expected a table")
    tables = data.get("rules", [])
    rules: list[Rule] = []
    if isinstance(tables, list):
        for at, table in enumerate(tables):
            if not isinstance(table, Mapping):
                problems.append(f"{source}: rules[{at}] = {table!r}: expected a table")
        rules, rule_problems = parse_rules([t for t in tables if isinstance(t, Mapping)], source)
        problems.extend(rule_problems)
    if problems:
        raise ConfigError(problems, source)
    return DaemonConfig(source, profiling, settings, notifiers, tuple(rules))


def load_daemon_config(path: str | os.PathLike[str], *, listen: str | None = None) -> DaemonConfig:
    """Read and validate ``path`` (TOML or the guide's JSON)."""
    source = os.fsdecode(path)
    return daemon_config_from_mapping(read_config_file(path), source, listen=listen)
