"""netprof's configuration: one schema, read from JSON or TOML by the app and the daemon."""

from __future__ import annotations

__all__ = (
    "ConfigError",
    "ProfilingConfig",
    "check_table",
    "check_values",
    "describe_keys",
    "load_profiling_config",
    "profiling_config_from_mapping",
    "read_config_file",
)

import dataclasses
import difflib
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info < (3, 11):
    import tomli as tomllib
else:
    import tomllib


class ConfigError(ValueError):
    """One or more problems in a configuration; ``str()`` gives one problem per line."""

    def __init__(self, problems: Iterable[str], source: str | None = None) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        self.source = source
        # Both go into args so that the error survives pickling (multiprocessing, logging).
        super().__init__(self.problems, source)

    def __str__(self) -> str:
        return "\n".join(self.problems)


@dataclass(frozen=True, slots=True)
class _Spec:
    help: str
    lo: float = 0
    hi: float | None = None
    lo_open: bool = False  # True: ``lo`` itself is not allowed
    pattern: re.Pattern[str] = re.compile(r".+", re.DOTALL)  # for str keys only
    pattern_hint: str = "a non-empty string"


def setting(default: Any, help: str, **spec: Any) -> Any:
    """A checked config field: its default, a line of help, and its bounds
    (``lo``, ``hi``, ``lo_open``; ``pattern`` and ``pattern_hint`` for strings)."""
    if callable(default):
        return field(default_factory=default, metadata={"spec": _Spec(help, **spec)})
    return field(default=default, metadata={"spec": _Spec(help, **spec)})


_APP_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def _default_app_name() -> str:
    argv0 = (getattr(sys, "argv", None) or [""])[0]
    stem = os.path.basename(argv0).removesuffix(".py")
    if stem == "__main__":  # ``python -m pkg``: the package is the program
        stem = os.path.basename(os.path.dirname(argv0))
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".")[:64]
    return name or "python"


@dataclass(frozen=True, slots=True)
class ProfilingConfig:
    """The ``network_profiling`` table; every field is checked on construction."""

    enabled: bool = setting(True, "Profile requests from start-up")
    feature_flag_enabled: bool = setting(True, "Rollout switch; false overrides enabled")
    slow_request_threshold: float = setting(
        2.0, "Seconds after which a request counts as slow", lo=0, hi=3600, lo_open=True
    )
    max_stored_requests: int = setting(1000, "Request records kept (the last N)", lo=1, hi=1_000_000)
    log_slow_requests: bool = setting(True, "Log each slow request")
    enable_alerts: bool = setting(True, "Evaluate alert rules and send notifications")
    alert_slow_request_threshold: float = setting(15.0, "Alert above this % of slow requests", hi=100)
    alert_error_rate_threshold: float = setting(10.0, "Alert above this % of errors", hi=100)
    graceful_degradation: bool = setting(True, "Never let a netprof error reach the application")
    performance_monitoring: bool = setting(
        True, "Measure netprof's overhead (network_profiling_overhead_ms)"
    )
    max_memory_mb: float = setting(
        # The smallest segment (16 records, 1 route) takes about 0.1 MiB.
        10.0, "Memory cap for one process's segment, in MiB", lo=0.25, hi=4096
    )
    auto_disable_on_error: bool = setting(True, "Stop recording after > 3 consecutive internal errors")
    debug: bool = setting(False, "Verbose diagnostics for development")
    segment_dir: str = setting(
        "/dev/shm/netprof",
        "Directory of the shared-memory segments (app and daemon must agree)",
        pattern=re.compile(r"[^\x00]+"),
        pattern_hint="a non-empty directory path without NUL bytes",
    )
    segment_dir_owner: str = setting(
        "netprofd",
        "User (name or uid) whose segment_dir apps trust, besides root and their own",
        pattern=re.compile(r"[0-9]+|[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?"),
        pattern_hint="a user name (up to 32 of A-Z a-z 0-9 _ . -) or a numeric uid",
    )
    app_name: str = setting(
        _default_app_name,
        "Application name in segments and metric labels (default: the program's name)",
        pattern=_APP_NAME,
        pattern_hint="1 to 64 characters of A-Z a-z 0-9 _ . -, not starting with '.'",
    )
    max_routes: int = setting(
        24, "Distinct routes per process; more share an overflow route", lo=1, hi=4096
    )
    sample_rate: float = setting(1.0, "Fraction of requests recorded, 0 to 1", hi=1)
    retention_hours: float = setting(
        0.0, "Drop records older than this; 0 keeps them until overwritten", hi=100_000
    )

    def __post_init__(self) -> None:
        check_values(self)

    def replace(self, **changes: Any) -> ProfilingConfig:
        return dataclasses.replace(self, **changes)


def check_values(instance: Any) -> None:
    """Validate every :func:`setting` field of a frozen dataclass instance in
    ``__post_init__``, storing ints given for floats as floats."""
    problems = []
    for f in fields(instance):
        value = getattr(instance, f.name)
        clean = _normalize(f, value)
        if clean is _INVALID:
            problems.append(f"{type(instance).__name__}({f.name}={value!r}): expected {_expected(f)}")
        else:
            object.__setattr__(instance, f.name, clean)
    if problems:
        raise ConfigError(problems)


_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in fields(ProfilingConfig)}
_KINDS: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}
# The top-level keys besides ``debug``; only their shape is checked here, the daemon reads them.
_TABLES: dict[str, tuple[type, str]] = {
    "network_profiling": (Mapping, "a table"),
    "daemon": (Mapping, "a table"),
    "notifiers": (Mapping, "a table"),
    "rules": (list, "an array of tables"),
}
_TOP_LEVEL = ("debug", *_TABLES)
_INVALID = object()


def _rule(f: dataclasses.Field[Any]) -> tuple[type, _Spec]:
    # Annotations are strings here (``from __future__ import annotations``).
    return _KINDS[str(f.type)], f.metadata["spec"]


def _normalize(f: dataclasses.Field[Any], value: Any) -> Any:
    """``value`` as the config stores it, or ``_INVALID``."""
    kind, spec = _rule(f)
    # bool is a subclass of int: true/false is never a number here, nor a number a bool.
    if (kind is bool) != isinstance(value, bool):
        return _INVALID
    if kind is bool:
        return value
    if kind is str:
        return value if isinstance(value, str) and spec.pattern.fullmatch(value) else _INVALID
    if not isinstance(value, int if kind is int else (int, float)):
        return _INVALID
    if kind is float:
        try:
            value = float(value)
        except OverflowError:  # an int too large for any float
            return _INVALID
        if not math.isfinite(value):
            return _INVALID
    too_low = value <= spec.lo if spec.lo_open else value < spec.lo
    too_high = spec.hi is not None and value > spec.hi
    return _INVALID if too_low or too_high else value


def _expected(f: dataclasses.Field[Any]) -> str:
    kind, spec = _rule(f)
    if kind is bool:
        return "true or false"
    if kind is str:
        return spec.pattern_hint
    noun = "an integer" if kind is int else "a number"
    if spec.hi is None:
        return f"{noun} of at least {spec.lo}"
    if spec.lo_open:
        return f"{noun} greater than {spec.lo} and at most {spec.hi}"
    return f"{noun} from {spec.lo} to {spec.hi}"


def _unknown(where: str, key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(known)
    return f"{where}: unknown key; {hint}"


def check_table(
    schema: type, table: object, where: str, problems: list[str]
) -> dict[str, Any]:
    """The valid keys of ``table`` for a dataclass declared with :func:`setting`
    fields; each bad key is added to ``problems`` as ``where.key``."""
    known = {f.name: f for f in fields(schema)}
    values: dict[str, Any] = {}
    for key, value in table.items() if isinstance(table, Mapping) else ():
        at = f"{where}.{key}"
        if key not in known:
            problems.append(_unknown(at, key, known))
        elif (clean := _normalize(known[key], value)) is _INVALID:
            problems.append(f"{at} = {value!r}: expected {_expected(known[key])}")
        else:
            values[key] = clean
    return values


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a JSON or TOML file (by suffix, else by content) into a dict."""
    source = os.fsdecode(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [f"{source}: cannot read config file: {exc.strerror or exc}"], source
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: config file is not UTF-8 text: {exc}"], source) from None
    suffix = Path(path).suffix.lower()
    as_json = suffix == ".json" or (suffix != ".toml" and text.lstrip().startswith("{"))
    try:
        data = json.loads(text) if as_json else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        # Both parsers put the line and column in their message.
        raise ConfigError(
            [f"{source}: invalid {'JSON' if as_json else 'TOML'}: {exc}"], source
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{source}: the top level must be an object/table, got {type(data).__name__}"], source
        )
    return data


def profiling_config_from_mapping(
    data: Mapping[str, Any], source: str = "<mapping>"
) -> ProfilingConfig:
    """Validate a whole parsed file; every problem is reported in one ConfigError."""
    problems: list[str] = []
    for key, value in data.items():
        if key not in _TOP_LEVEL:
            problems.append(_unknown(f"{source}: {key}", key, _TOP_LEVEL))
        elif key in _TABLES and not isinstance(value, _TABLES[key][0]):
            problems.append(f"{source}: {key} = {value!r}: expected {_TABLES[key][1]}")

    table = data.get("network_profiling", {})
    values = check_table(ProfilingConfig, table, f"{source}: network_profiling", problems)

    # The guide puts ``debug`` at the top level; inside the table is accepted too.
    if "debug" in data:
        top = data["debug"]
        if _normalize(_FIELDS["debug"], top) is _INVALID:
            problems.append(f"{source}: debug = {top!r}: expected {_expected(_FIELDS['debug'])}")
        elif values.setdefault("debug", top) != top:
            inner = f"network_profiling.debug = {values['debug']!r}"
            problems.append(
                f"{source}: debug = {top!r} conflicts with {inner}: set it in one place"
            )

    if problems:
        raise ConfigError(problems, source)
    return ProfilingConfig(**values)


def load_profiling_config(path: str | os.PathLike[str] | None = None) -> ProfilingConfig:
    """Load ``path``, else the file named by ``NETPROF_CONFIG``, else the defaults."""
    if path is None:
        path = os.environ.get("NETPROF_CONFIG") or None
    if path is None:
        return ProfilingConfig()
    return profiling_config_from_mapping(read_config_file(path), os.fsdecode(path))


def describe_keys() -> list[tuple[str, str, object, str]]:
    """(key, type name, default, description) for every ``network_profiling`` key."""
    defaults = ProfilingConfig()
    return [
        (f.name, str(f.type), getattr(defaults, f.name), _rule(f)[1].help)
        for f in fields(ProfilingConfig)
    ]
