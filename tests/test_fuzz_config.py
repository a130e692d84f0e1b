"""Fuzzing the configuration (issue 15, "Trust"): whatever a file holds, the
app's and the daemon's loaders answer a config or a ConfigError naming the
file and the key, never another exception; ``netprofd --check`` exits 0 or 2,
never with a traceback.

Hypothesis builds mappings of the known tables and keys (network_profiling,
daemon, rules, notifiers) and of random ones, with values of every JSON and
TOML type (integers past 64 bits and past every float, NaN, dates, nested
arrays and tables), writes them as real files in both formats, and loads them
with the real loaders (and the real notifier plugins).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import example, given
from hypothesis import strategies as st

from netprof_core.config import ConfigError, ProfilingConfig, load_profiling_config
from netprof_daemon.config import DaemonConfig, DaemonSettings, load_daemon_config
from netprof_daemon.plugins import NotifierManager
from tests.apps.netprofd import daemon_env, run_netprofd
from tests.fuzzing import AWKWARD_JSON, HUGE_INTS, fuzz_settings

# Reading configuration files is the same whichever core records.
pytestmark = pytest.mark.any_core

PROFILING_KEYS = tuple(f.name for f in dataclasses.fields(ProfilingConfig))
DAEMON_KEYS = tuple(f.name for f in dataclasses.fields(DaemonSettings))
RULE_KEYS = ("name", "metric", "op", "threshold", "window", "for", "severity", "app", "route",
             "min_requests", "action", "keep_firing_for", "summary")  # fmt: skip
NOTIFIERS = {"log": ("level",), "alertmanager": ("url", "timeout"), "apprise": ("urls",)}


# -- values ---------------------------------------------------------------------------------------------


def _toml_safe(value: Any) -> bool:
    """TOML has no null, and its files are UTF-8 (no lone surrogates)."""
    if value is None:
        return False
    if isinstance(value, list):
        return all(_toml_safe(v) for v in value)
    if isinstance(value, dict):
        return all(_toml_safe(v) for v in value.values())
    return True


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE_INTS, st.floats(),
    st.text(max_size=20), st.sampled_from(AWKWARD_JSON),
    st.datetimes(timezones=st.none() | st.just(datetime.timezone.utc)),  # TOML only: dropped for JSON
    st.dates(), st.times(),
)  # fmt: skip


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3))


anything = st.recursive(scalars, _containers, max_leaves=8)
# Plausible values: of the right kind, at and past the bounds.
EDGES = (0, 0.05, 0.25, 1, 4096, 4097, 1_000_000, 1_000_001, 100_000, 65536, 3600, 86400 * 31, 1e-9, -0.0)
numbers = st.one_of(st.integers(-5, 5000), st.floats(-1e6, 1e7), st.sampled_from(EDGES), HUGE_INTS)
texts = st.one_of(
    st.sampled_from(["", "/dev/shm/netprof", "/tmp", "\0", "app", ".hidden", "a" * 64, "a" * 65, "netprofd",
                     "0", "root", "x$", "127.0.0.1:9465", "[::1]:9465", "localhost:0", "0.0.0.0:80",
                     "127.0.0.1:65536", "[::1]:99999", "host", ":80", "[]:1", "1h", "5m", "30s", "500ms",
                     "1h30m", "16m", "h", "-1s", "1e3s", "disable", "error_rate_percent", "p99_ms",
                     "memory_mb", ">", ">=", "<", "<=", "==", "*", "info", "warning", "critical", "DEBUG",
                     "http://127.0.0.1:9093", "json://localhost", "mailto://x@y", "not a url"]),
    st.text(max_size=30),
)  # fmt: skip
plausible = st.one_of(st.booleans(), numbers, texts)
values = st.one_of(plausible, plausible, anything)


def _table(keys: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    known = st.dictionaries(st.sampled_from(keys), values, max_size=len(keys))
    unknown = st.dictionaries(st.text(max_size=10), values, max_size=2)
    return st.builds(lambda k, u: {**u, **k}, known, st.one_of(st.just({}), st.just({}), unknown))


rule = _table(RULE_KEYS)
notifiers = st.dictionaries(
    st.one_of(st.sampled_from(sorted(NOTIFIERS)), st.text(max_size=8)),
    st.one_of(_table(("level", "url", "timeout", "urls")), anything),
    max_size=3,
)
configs = st.fixed_dictionaries(
    {},
    optional={
        "network_profiling": st.one_of(_table(PROFILING_KEYS), _table(PROFILING_KEYS), anything),
        "daemon": st.one_of(_table(DAEMON_KEYS), _table(DAEMON_KEYS), anything),
        "rules": st.one_of(st.lists(rule, max_size=3), st.lists(rule, max_size=3), anything),
        "notifiers": st.one_of(notifiers, notifiers, anything),
        "debug": values,
        "extra": anything,
    },
)

# Configurations that are valid, or nearly: each key within its bounds (so
# that the loaders get past the first problem, to the rules and the plugins).


def _valid_value(f: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    spec, kind = f.metadata["spec"], str(f.type)
    if kind == "bool":
        return st.booleans()
    if kind == "str":
        if f.name in ("segment_dir", "state_dir", "api_key_file"):
            return st.sampled_from(["/tmp", "/dev/shm/netprof", ""])
        if f.name == "listen":
            return st.sampled_from(["127.0.0.1:0", "[::1]:9465", "localhost:9465", "0.0.0.0:9465"])
        return st.from_regex(spec.pattern, fullmatch=True)
    hi = spec.hi if spec.hi is not None else 10**6
    if kind == "int":
        return st.integers(int(spec.lo), int(hi))
    return st.floats(spec.lo, hi, exclude_min=spec.lo_open)


def _valid_table(schema: type) -> st.SearchStrategy[dict[str, Any]]:
    fields = dataclasses.fields(schema)
    return st.fixed_dictionaries({}, optional={f.name: _valid_value(f) for f in fields})


durations = st.one_of(
    st.sampled_from(["30s", "1m", "5m", "15m", "1h", "500ms", "1m30s"]), st.integers(0, 900)
)
METRICS = (
    "error_rate_percent", "slow_request_percent", "request_rate", "p50_ms", "p95_ms", "p99_ms", "memory_mb",
    "process_memory_mb", "overhead_ms", "consecutive_errors", "auto_disables",
)  # fmt: skip
valid_rule = st.fixed_dictionaries(
    {"name": st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True),
     "metric": st.sampled_from(METRICS),
     "op": st.sampled_from([">", ">=", "<", "<="]),
     "threshold": st.floats(-1e6, 1e6)},
    optional={"window": durations, "for": durations, "keep_firing_for": durations,
              "severity": st.sampled_from(["info", "warning", "critical"]), "app": texts, "route": texts,
              "min_requests": st.integers(0, 10**6), "action": st.just("disable"), "summary": texts},
)  # fmt: skip
log_table = st.fixed_dictionaries({}, optional={"level": st.sampled_from(["info", "WARNING", "error"])})
alertmanager_table = st.fixed_dictionaries(
    {"url": st.just("http://127.0.0.1:9093")}, optional={"timeout": st.floats(0.1, 60)}
)
valid_notifiers = st.fixed_dictionaries({}, optional={"log": log_table, "alertmanager": alertmanager_table})
nearly_valid = st.fixed_dictionaries(
    {},
    optional={"network_profiling": _valid_table(ProfilingConfig), "daemon": _valid_table(DaemonSettings),
              "rules": st.lists(valid_rule, max_size=3), "notifiers": valid_notifiers},
)  # fmt: skip
# ... and then one key, anywhere, made bad.
spoiled = st.builds(
    lambda data, table, key, value: {**data, table: {**data.get(table, {}), key: value}},
    nearly_valid,
    st.sampled_from(["network_profiling", "daemon"]),
    st.sampled_from(PROFILING_KEYS + DAEMON_KEYS),
    values,
)


# -- files ------------------------------------------------------------------------------------------------


def _as_json(value: Any) -> Any:
    """JSON has no dates: they become their ISO text."""
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return [_as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    return value


def _as_toml(value: Any) -> Any:
    """TOML has no null (left out), and a time with no date; its integers are 64 bits (tomllib reads more)."""
    if isinstance(value, list):
        return [_as_toml(v) for v in value if v is not None]
    if isinstance(value, dict):
        return {k: _as_toml(v) for k, v in value.items() if v is not None}
    return value


def write_config(directory: Path, data: Mapping[str, Any], fmt: str) -> Path:
    """``data`` as a real file: ``fmt`` is json, toml or sniffed (JSON in a file named ``.conf``)."""
    if fmt == "toml":
        path = directory / "netprof.toml"
        path.write_text(tomli_w.dumps(_as_toml(data)), encoding="utf-8")
    else:
        path = directory / ("netprof.json" if fmt == "json" else "netprof.conf")
        path.write_text(json.dumps(_as_json(data), indent=1), encoding="utf-8")
    return path


def keys_of(data: Any, depth: int = 3) -> set[str]:
    """Every key of ``data`` down to ``depth`` levels (the names a problem may give)."""
    if depth == 0:
        return set()
    if isinstance(data, Mapping):
        found = set(data)
        for value in data.values():
            found |= keys_of(value, depth - 1)
        return found
    if isinstance(data, list):
        return set().union(*(keys_of(v, depth - 1) for v in data)) if data else set()
    return set()


def check_config_error(exc: ConfigError, path: Path, data: Mapping[str, Any]) -> None:
    """Every problem names the file, and a key of it (or a table's key it lacks: rules[i].metric)."""
    assert exc.problems, exc
    named = {key for key in keys_of(data) if key} | {"rules[", "notifiers.", "network_profiling", "daemon"}
    for problem in exc.problems:
        assert problem.startswith(f"{path}: "), (problem, exc.problems)
        assert "" in keys_of(data) or any(key in problem for key in named), (problem, data)


def load_both(path: Path, data: Mapping[str, Any]) -> tuple[ProfilingConfig | None, DaemonConfig | None]:
    """The app's and the daemon's readings of ``path``: a config, or None after a ConfigError checked."""
    results: list[Any] = []
    for load in (load_profiling_config, load_daemon_config):
        try:
            results.append(load(path))
        except ConfigError as exc:
            check_config_error(exc, path, data)
            results.append(None)
    return results[0], results[1]


@pytest.fixture
def config_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "config"
    directory.mkdir()
    yield directory


# -- the loaders ------------------------------------------------------------------------------------------

FORMATS = st.sampled_from(["toml", "json", "sniffed"])


@fuzz_settings(300)
@given(data=st.one_of(configs, nearly_valid, spoiled), fmt=FORMATS)
@example(data={"rules": [{"name": "R", "metric": "p99_ms", "op": [], "threshold": 1}]}, fmt="json")
@example(data={"rules": [{"name": "R", "metric": "p99_ms", "op": ">", "threshold": 10**400}]}, fmt="json")
@example(data={"rules": [{"name": "R", "metric": "p99_ms", "op": ">", "threshold": 1, "window": 10**400}]},
         fmt="json")  # fmt: skip
def test_fuzz_config_files(config_dir: Path, data: dict[str, Any], fmt: str) -> None:
    path = write_config(config_dir, data, fmt)
    profiling, daemon = load_both(path, data)
    if daemon is not None:
        assert profiling == daemon.profiling
        daemon.all_rules()
        assert daemon.daemon.host and 0 <= daemon.daemon.port <= 65535
        _load_notifiers(daemon, path)


def _load_notifiers(config: DaemonConfig, path: Path) -> None:
    """The real plugins read their tables: a ConfigError naming the plugin, or active plugins."""
    manager = NotifierManager(config.notifiers)
    try:
        manager.load()
    except ConfigError as exc:
        for problem in exc.problems:
            assert problem.startswith("notifiers."), (problem, config.notifiers)
    finally:
        manager.close()


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_every_known_key_takes_every_awkward_value(config_dir: Path, fmt: str) -> None:
    """Not left to chance: each key of each table gets each kind of value at its edges."""
    tables: list[tuple[str, tuple[str, ...]]] = [
        ("network_profiling", PROFILING_KEYS),
        ("daemon", DAEMON_KEYS),
    ]
    valid_rule = {"name": "R", "metric": "p99_ms", "op": ">", "threshold": 1}
    for value in AWKWARD_JSON:
        if fmt == "toml" and not _toml_safe(value):
            continue
        candidates: list[dict[str, Any]] = [{"debug": value}]
        candidates += [{table: {key: value}} for table, keys in tables for key in keys]
        candidates += [{"rules": [{**valid_rule, key: value}]} for key in RULE_KEYS]
        candidates += [
            {"notifiers": {name: {key: value}}} for name, keys in NOTIFIERS.items() for key in keys
        ]
        candidates += [{table: value} for table in ("network_profiling", "daemon", "rules", "notifiers")]
        for data in candidates:
            path = write_config(config_dir, data, fmt)
            _, daemon = load_both(path, data)
            if daemon is not None:
                daemon.all_rules()
                if "notifiers" in data:  # (loading the plugins' entry points is the costly part)
                    _load_notifiers(daemon, path)


def test_a_rule_field_of_the_wrong_json_type_is_a_config_error(config_dir: Path) -> None:
    """Regression (found by the fuzzing): in a JSON config, a rule's ``op``
    given as a list or an object raised TypeError (unhashable, looked up in a
    dict), and a ``threshold``, ``window``, ``for`` or ``keep_firing_for``
    given as an integer past every float raised OverflowError: ``netprofd
    --check`` and the daemon's start died with a traceback."""
    bad: tuple[tuple[str, object], ...] = (
        ("op", []), ("op", {}), ("threshold", 10**400), ("window", 10**400), ("for", 10**400),
        ("keep_firing_for", -(10**400)),
    )  # fmt: skip
    rules = [{"name": f"R{i}", "metric": "p99_ms", "op": ">", "threshold": 1, key: value}
             for i, (key, value) in enumerate(bad)]  # fmt: skip
    path = write_config(config_dir, {"rules": rules}, "json")
    with pytest.raises(ConfigError) as caught:
        load_daemon_config(path)
    done = run_netprofd(path, "--check", env=daemon_env())
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    for i, (key, _) in enumerate(bad):
        assert [p for p in caught.value.problems if f"rules[{i}] (R{i}).{key}:" in p], caught.value.problems
        assert f"rules[{i}] (R{i}).{key}:" in done.stderr


# -- netprofd --check -------------------------------------------------------------------------------------


@fuzz_settings(8)
@given(data=configs, fmt=FORMATS)
def test_fuzz_netprofd_check(config_dir: Path, tmp_path: Path, data: dict[str, Any], fmt: str) -> None:
    """The real command on a handful of generated files: exit 0 or 2 and a
    message, never a traceback. (Existing directories, so that some pass.)"""
    data = dict(data)
    if isinstance(data.get("daemon"), dict):
        data["daemon"] = {**data["daemon"], "state_dir": str(tmp_path)}
    path = write_config(config_dir, data, fmt)
    done = run_netprofd(path, "--check", env=daemon_env())
    assert done.returncode in (0, 2), (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert done.stdout if done.returncode == 0 else "error" in done.stderr or "netprofd:" in done.stderr
