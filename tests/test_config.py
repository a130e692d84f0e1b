from __future__ import annotations

import dataclasses
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest

from netprof_core.config import (
    ConfigError,
    ProfilingConfig,
    describe_keys,
    load_profiling_config,
    profiling_config_from_mapping,
    read_config_file,
)

# The four configurations of the deployment guide, verbatim.
PHASE1_DEV = """\
{
  "debug": true,
  "network_profiling": {
    "enabled": true,
    "feature_flag_enabled": true,
    "slow_request_threshold": 1.0,
    "max_stored_requests": 2000,
    "log_slow_requests": true,
    "enable_alerts": false,
    "graceful_degradation": true,
    "performance_monitoring": true
  }
}
"""

PHASE2_STAGING = """\
{
  "debug": false,
  "network_profiling": {
    "enabled": true,
    "feature_flag_enabled": true,
    "slow_request_threshold": 2.0,
    "max_stored_requests": 1000,
    "log_slow_requests": true,
    "enable_alerts": true,
    "alert_slow_request_threshold": 15.0,
    "alert_error_rate_threshold": 10.0,
    "graceful_degradation": true,
    "performance_monitoring": true,
    "max_memory_mb": 50.0
  }
}
"""

PHASE3_CANARY = """\
{
  "network_profiling": {
    "enabled": false,
    "feature_flag_enabled": true,
    "slow_request_threshold": 3.0,
    "max_stored_requests": 500,
    "log_slow_requests": false,
    "enable_alerts": true,
    "alert_slow_request_threshold": 20.0,
    "alert_error_rate_threshold": 15.0,
    "graceful_degradation": true,
    "performance_monitoring": true,
    "max_memory_mb": 25.0,
    "auto_disable_on_error": true
  }
}
"""

PHASE4_FINAL = """\
{
  "network_profiling": {
    "enabled": true,
    "feature_flag_enabled": true,
    "slow_request_threshold": 2.0,
    "max_stored_requests": 1000,
    "log_slow_requests": true,
    "enable_alerts": true,
    "alert_slow_request_threshold": 15.0,
    "alert_error_rate_threshold": 10.0,
    "graceful_degradation": true,
    "performance_monitoring": true,
    "max_memory_mb": 50.0,
    "auto_disable_on_error": true
  }
}
"""

GUIDE_CONFIGS = {
    "dev": PHASE1_DEV,
    "staging": PHASE2_STAGING,
    "canary": PHASE3_CANARY,
    "final": PHASE4_FINAL,
}


def as_toml(doc: dict[str, Any]) -> str:
    # json.dumps spells bools, ints, floats and plain strings the way TOML does.
    lines = [f"debug = {json.dumps(doc['debug'])}"] if "debug" in doc else []
    lines.append("[network_profiling]")
    lines += [f"{key} = {json.dumps(value)}" for key, value in doc["network_profiling"].items()]
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, name: str, text: str) -> tuple[ConfigError, Path]:
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        load_profiling_config(path)
    return info.value, path


def test_dev_config(tmp_path: Path) -> None:
    config = load_profiling_config(write(tmp_path, "dev.json", PHASE1_DEV))
    assert config.debug is True
    assert config.slow_request_threshold == 1.0
    assert config.max_stored_requests == 2000
    assert config.enable_alerts is False
    # Left out by the file, so the defaults:
    assert config.max_memory_mb == ProfilingConfig().max_memory_mb
    assert config.alert_error_rate_threshold == 10.0
    assert config.sample_rate == 1.0


def test_staging_config(tmp_path: Path) -> None:
    config = load_profiling_config(write(tmp_path, "staging.json", PHASE2_STAGING))
    assert config.debug is False
    assert config.enabled is True
    assert config.max_memory_mb == 50.0
    assert config.alert_slow_request_threshold == 15.0
    assert config.auto_disable_on_error is True  # not in the file: default


def test_canary_config(tmp_path: Path) -> None:
    config = load_profiling_config(write(tmp_path, "canary.json", PHASE3_CANARY))
    assert config.enabled is False
    assert config.feature_flag_enabled is True
    assert config.slow_request_threshold == 3.0
    assert config.max_stored_requests == 500
    assert config.log_slow_requests is False
    assert config.alert_slow_request_threshold == 20.0
    assert config.alert_error_rate_threshold == 15.0
    assert config.max_memory_mb == 25.0
    assert config.auto_disable_on_error is True
    assert config.debug is False


def test_final_config(tmp_path: Path) -> None:
    config = load_profiling_config(write(tmp_path, "final.json", PHASE4_FINAL))
    assert config == ProfilingConfig(max_memory_mb=50.0)


@pytest.mark.parametrize("phase", sorted(GUIDE_CONFIGS))
def test_toml_and_json_with_same_content_are_equal(tmp_path: Path, phase: str) -> None:
    text = GUIDE_CONFIGS[phase]
    toml_text = as_toml(json.loads(text))
    assert "[network_profiling]" in toml_text
    from_json = load_profiling_config(write(tmp_path, "c.json", text))
    from_toml = load_profiling_config(write(tmp_path, "c.toml", toml_text))
    assert from_toml == from_json


@pytest.mark.parametrize("text", [PHASE3_CANARY, as_toml(json.loads(PHASE3_CANARY))])
def test_other_suffix_is_recognised_by_content(tmp_path: Path, text: str) -> None:
    config = load_profiling_config(write(tmp_path, "netprof.conf", text))
    assert config.max_stored_requests == 500


def test_daemon_tables_are_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "netprofd.toml",
        """\
[network_profiling]
app_name = "orders"
sample_rate = 0.25

[daemon]
listen = "127.0.0.1:9465"

[notifiers.apprise]
urls = ["mailto://ops@example.com"]

[[rules]]
name = "errors"
""",
    )
    config = load_profiling_config(path)
    assert (config.app_name, config.sample_rate) == ("orders", 0.25)
    assert read_config_file(path)["daemon"] == {"listen": "127.0.0.1:9465"}


def test_environment_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = write(tmp_path, "canary.json", PHASE3_CANARY)
    dev = write(tmp_path, "dev.json", PHASE1_DEV)

    monkeypatch.setenv("NETPROF_CONFIG", str(canary))
    assert load_profiling_config().max_stored_requests == 500
    assert load_profiling_config(dev).max_stored_requests == 2000  # explicit path wins

    monkeypatch.setenv("NETPROF_CONFIG", "")
    assert load_profiling_config() == ProfilingConfig()
    monkeypatch.delenv("NETPROF_CONFIG")
    assert load_profiling_config() == ProfilingConfig()


def test_defaults() -> None:
    config = ProfilingConfig()
    assert config.enabled and config.feature_flag_enabled and config.auto_disable_on_error
    assert config.debug is False
    assert config.max_stored_requests == 1000
    assert config.segment_dir == "/dev/shm/netprof"
    assert config.max_routes == 24
    assert config.sample_rate == 1.0
    assert config.retention_hours == 0.0


def nested(**table: Any) -> str:
    return json.dumps({"network_profiling": table})


@pytest.mark.parametrize(
    ("text", "key", "bad"),
    [
        (nested(max_stored_requests="1000"), "network_profiling.max_stored_requests", "'1000'"),
        (nested(slow_request_threshold="2.0"), "network_profiling.slow_request_threshold", "'2.0'"),
        (nested(enabled=1), "network_profiling.enabled", "1"),
        (nested(max_stored_requests=True), "network_profiling.max_stored_requests", "True"),
        (nested(max_stored_requests=-5), "network_profiling.max_stored_requests", "-5"),
        (nested(max_stored_requests=2.5), "network_profiling.max_stored_requests", "2.5"),
        (nested(sample_rate=1.5), "network_profiling.sample_rate", "1.5"),
        (
            nested(alert_error_rate_threshold=150),
            "network_profiling.alert_error_rate_threshold",
            "150",
        ),
        (nested(max_memory_mb=0), "network_profiling.max_memory_mb", "0"),
        (nested(retention_hours=-1), "network_profiling.retention_hours", "-1"),
        (nested(app_name="my app"), "network_profiling.app_name", "'my app'"),
        (nested(app_name=".hidden"), "network_profiling.app_name", "'.hidden'"),
        (nested(segment_dir=""), "network_profiling.segment_dir", "''"),
        ('{"debug": "yes"}', "debug", "'yes'"),
        ('{"network_profiling": [1]}', "network_profiling", "[1]"),
        ('{"daemon": "127.0.0.1"}', "daemon", "'127.0.0.1'"),
        ('{"rules": {"name": "x"}}', "rules", "{'name': 'x'}"),
    ],
)
def test_bad_value_names_file_key_and_value(tmp_path: Path, text: str, key: str, bad: str) -> None:
    err, path = load_error(tmp_path, "netprof.json", text)
    assert isinstance(err, ValueError)
    assert err.source == str(path)
    [problem] = err.problems
    assert str(path) in problem
    assert f"{key} = {bad}:" in problem
    assert "expected" in problem


def test_nan_from_toml_is_rejected(tmp_path: Path) -> None:
    err, path = load_error(tmp_path, "netprof.toml", "[network_profiling]\nmax_memory_mb = nan\n")
    assert f"{path}: network_profiling.max_memory_mb = nan: expected a number" in str(err)


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    err, path = load_error(tmp_path, "netprof.json", nested(max_stored_request=500))
    assert str(err) == (
        f"{path}: network_profiling.max_stored_request: unknown key;"
        " did you mean 'max_stored_requests'?"
    )


def test_unknown_top_level_key(tmp_path: Path) -> None:
    err, path = load_error(tmp_path, "netprof.toml", "[network_profilng]\nenabled = true\n")
    assert str(err) == f"{path}: network_profilng: unknown key; did you mean 'network_profiling'?"

    err, path = load_error(tmp_path, "other.toml", "colour = 'blue'\n")
    assert f"{path}: colour: unknown key; known keys: debug, network_profiling" in str(err)


def test_conflicting_debug_values(tmp_path: Path) -> None:
    err, path = load_error(
        tmp_path, "netprof.json", '{"debug": true, "network_profiling": {"debug": false}}'
    )
    assert str(path) in str(err)
    assert "debug = True conflicts with network_profiling.debug = False" in str(err)


def test_debug_in_both_places_agreeing_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path, "netprof.json", '{"debug": true, "network_profiling": {"debug": true}}')
    assert load_profiling_config(path).debug is True


def test_every_mistake_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    text = nested(max_stored_request=500, slow_request_threshold="fast", sample_rate=1.5)
    err, path = load_error(tmp_path, "netprof.json", text)
    assert len(err.problems) == 3
    lines = str(err).splitlines()
    assert lines == list(err.problems)
    assert all(line.startswith(f"{path}: network_profiling.") for line in lines)
    assert "max_stored_request: unknown key" in str(err)
    assert "slow_request_threshold = 'fast'" in str(err)
    assert "sample_rate = 1.5" in str(err)


def test_json_syntax_error_gives_line(tmp_path: Path) -> None:
    broken = '{\n  "network_profiling": {\n    "enabled": true\n    "debug": true\n  }\n}\n'
    err, path = load_error(tmp_path, "netprof.json", broken)
    assert str(err).startswith(f"{path}: invalid JSON:")
    assert "line 4" in str(err)


def test_toml_syntax_error_gives_line(tmp_path: Path) -> None:
    err, path = load_error(tmp_path, "netprof.toml", "[network_profiling]\nenabled = \n")
    assert str(err).startswith(f"{path}: invalid TOML:")
    assert "line 2" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError) as info:
        load_profiling_config(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    assert "No such file" in str(info.value)


def test_top_level_array(tmp_path: Path) -> None:
    err, path = load_error(tmp_path, "netprof.json", '[{"network_profiling": {}}]')
    assert str(err) == f"{path}: the top level must be an object/table, got list"


def test_direct_construction_is_validated() -> None:
    with pytest.raises(
        ValueError, match=r"max_stored_requests=0\): expected an integer from 1 to 1000000"
    ):
        ProfilingConfig(max_stored_requests=0)
    with pytest.raises(ConfigError, match="enabled='no'"):
        ProfilingConfig(enabled="no")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_routes=True"):
        ProfilingConfig(max_routes=True)
    with pytest.raises(ConfigError, match="sample_rate=inf"):
        ProfilingConfig(sample_rate=float("inf"))
    with pytest.raises(ConfigError, match="retention_hours"):
        ProfilingConfig(retention_hours=10**400)
    assert ProfilingConfig(sample_rate=0).sample_rate == 0.0


def test_replace_validates_too() -> None:
    config = ProfilingConfig().replace(sample_rate=0.5)
    assert config.sample_rate == 0.5
    with pytest.raises(ConfigError, match="sample_rate"):
        config.replace(sample_rate=2)


def test_ints_for_float_fields_become_floats(tmp_path: Path) -> None:
    config = ProfilingConfig(slow_request_threshold=3, max_memory_mb=25, sample_rate=1)
    assert type(config.slow_request_threshold) is float
    assert type(config.max_memory_mb) is float
    assert type(config.sample_rate) is float

    loaded = load_profiling_config(
        write(tmp_path, "c.toml", "[network_profiling]\nmax_memory_mb = 25\n")
    )
    assert type(loaded.max_memory_mb) is float
    assert loaded == ProfilingConfig(max_memory_mb=25.0)


@pytest.mark.parametrize(
    ("argv0", "expected"),
    [
        ("/srv/bin/order-api.py", "order-api"),
        ("/srv/bin/my service", "my_service"),
        ("/srv/shop/__main__.py", "shop"),
        (".hidden", "hidden"),
        ("", "python"),
    ],
)
def test_default_app_name_is_the_program_name(
    monkeypatch: pytest.MonkeyPatch, argv0: str, expected: str
) -> None:
    monkeypatch.setattr(sys, "argv", [argv0])
    assert ProfilingConfig().app_name == expected


def test_config_error_lists_problems_and_survives_pickling() -> None:
    with pytest.raises(ConfigError) as info:
        profiling_config_from_mapping({"network_profiling": {"max_routes": 0, "debug": 1}})
    assert info.value.source == "<mapping>"
    assert str(info.value).splitlines() == [
        "<mapping>: network_profiling.max_routes = 0: expected an integer from 1 to 4096",
        "<mapping>: network_profiling.debug = 1: expected true or false",
    ]
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.problems, copy.source) == (info.value.problems, info.value.source)


def test_describe_keys_covers_every_field_once() -> None:
    rows = describe_keys()
    names = [f.name for f in dataclasses.fields(ProfilingConfig)]
    assert [row[0] for row in rows] == names
    defaults = ProfilingConfig()
    for key, type_name, default, description in rows:
        assert type_name in {"bool", "int", "float", "str"}
        assert default == getattr(defaults, key)
        assert description and "\n" not in description
    assert rows[names.index("max_stored_requests")][:3] == ("max_stored_requests", "int", 1000)
