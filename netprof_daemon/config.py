"""netprofd's configuration: the shared ``network_profiling`` table plus the
daemon's own ``daemon`` table, from one TOML or JSON file."""

from __future__ import annotations

import contextlib
import os
import re
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

__all__ = ("DaemonConfig", "DaemonSettings", "load_daemon_config", "parse_listen")

_LISTEN = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


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

    def __post_init__(self) -> None:
        check_values(self)

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]

    @property
    def loopback(self) -> bool:
        return self.host in _LOOPBACK_HOSTS or self.host.startswith("127.")


def parse_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 in brackets) as (host, port); ValueError names what is wrong."""
    if not _LISTEN.fullmatch(listen):
        raise ValueError(f'listen = {listen!r}: expected "HOST:PORT", e.g. "127.0.0.1:9465"')
    host, _, port = listen.rpartition(":")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"listen = {listen!r}: port {port} is not within 0 and 65535")
    return host.strip("[]"), int(port)


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
        key = os.environ.get("NETPROF_API_KEY", "").strip()
        if key:
            return key
        if not self.daemon.api_key_file:
            return None
        try:
            with open(self.daemon.api_key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as exc:
            raise ConfigError(
                [
                    f"{self.source}: daemon.api_key_file: cannot read {self.daemon.api_key_file}: {exc.strerror}"
                ],
                self.source,
            ) from None
        if not key:
            raise ConfigError(
                [f"{self.source}: daemon.api_key_file: {self.daemon.api_key_file} is empty"], self.source
            )
        return key


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
            if not DaemonSettings(listen=address).loopback:
                problems.append(
                    f"{source}: daemon.require_auth = false is allowed only on a loopback address, "
                    f"not on {address}"
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
