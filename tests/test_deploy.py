"""The files under deploy/: the systemd unit, the example config, the guide's
phase configs and the Prometheus rules, checked with the tools that use them
(systemd-analyze, promtool) and with netprof's own config loaders."""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netprof_core.config import ProfilingConfig, describe_keys, load_profiling_config
from netprof_daemon.config import DaemonSettings, load_daemon_config
from tests.tools import require_tool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "netprofd.service"
EXAMPLE_TOML = DEPLOY / "netprofd.toml"
PHASES = DEPLOY / "phases"
PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "network_profiling_rules.yml"
RULES_TEST = PROMETHEUS / "network_profiling_rules_test.yml"
ALERTS = ("NetworkProfilingHighMemory", "NetworkProfilingAutoDisabled", "NetworkProfilingHighOverhead")

# The deployment guide's four configurations, as values (the files are its JSON verbatim).
GUIDE_PHASES = {
    "phase1-development.json": {
        "debug": True, "enabled": True, "feature_flag_enabled": True, "slow_request_threshold": 1.0,
        "max_stored_requests": 2000, "log_slow_requests": True, "enable_alerts": False,
        "graceful_degradation": True, "performance_monitoring": True,
    },
    "phase2-staging.json": {
        "debug": False, "enabled": True, "feature_flag_enabled": True, "slow_request_threshold": 2.0,
        "max_stored_requests": 1000, "log_slow_requests": True, "enable_alerts": True,
        "alert_slow_request_threshold": 15.0, "alert_error_rate_threshold": 10.0,
        "graceful_degradation": True, "performance_monitoring": True, "max_memory_mb": 50.0,
    },
    "phase3-canary.json": {
        "enabled": False, "feature_flag_enabled": True, "slow_request_threshold": 3.0,
        "max_stored_requests": 500, "log_slow_requests": False, "enable_alerts": True,
        "alert_slow_request_threshold": 20.0, "alert_error_rate_threshold": 15.0,
        "graceful_degradation": True, "performance_monitoring": True, "max_memory_mb": 25.0,
        "auto_disable_on_error": True,
    },
    "phase4-production.json": {
        "enabled": True, "feature_flag_enabled": True, "slow_request_threshold": 2.0,
        "max_stored_requests": 1000, "log_slow_requests": True, "enable_alerts": True,
        "alert_slow_request_threshold": 15.0, "alert_error_rate_threshold": 10.0,
        "graceful_degradation": True, "performance_monitoring": True, "max_memory_mb": 50.0,
        "auto_disable_on_error": True,
    },
}


def _run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


# --- systemd unit -------------------------------------------------------------


def _unit_options(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; keys may repeat in a unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"continuation lines are not expected: {raw!r}"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a key=value line in a section: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _service() -> dict[str, list[str]]:
    return _unit_options(UNIT.read_text(encoding="utf-8"))["Service"]


def test_unit_runs_the_daemon_as_a_notify_service_with_a_watchdog() -> None:
    service = _service()
    expect = {
        "Type": "notify",
        "ExecStart": "/usr/local/bin/netprofd --config /etc/netprof/netprofd.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "User": "netprofd",
        "Group": "netprof",
        "StateDirectory": "netprofd",
        "EnvironmentFile": "-/etc/netprof/netprofd.env",
        "ProtectSystem": "strict",
        "AmbientCapabilities": "CAP_DAC_OVERRIDE",
        "CapabilityBoundingSet": "CAP_DAC_OVERRIDE",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter": "@system-service",
        "UMask": "0027",
        # Descriptors for the segments (two each) and the capped connections (docs/DEPLOYMENT.md).
        "LimitNOFILE": "8192",
    }
    assert {key: service.get(key, [None])[-1] for key in expect} == expect
    # The segment directory stays writable ("-": it may not exist yet at start).
    assert service["ReadWritePaths"][-1].lstrip("-") == "/dev/shm/netprof"


def test_unit_hides_neither_dev_shm_nor_other_processes() -> None:
    service = _service()
    # Each of these would hide the segments in /dev/shm/netprof, the apps'
    # /proc/<pid>/stat, or the apps' users (and so CAP_DAC_OVERRIDE over their files).
    for key in ("PrivateDevices", "PrivateIPC", "RemoveIPC", "DynamicUser", "PrivateUsers", "ProcSubset"):
        assert key not in service, f"{key}= must not be set"
    # invisible, noaccess and ptraceable all hide processes of other users.
    assert service.get("ProtectProc", ["default"])[-1] == "default"
    for key in ("InaccessiblePaths", "TemporaryFileSystem", "ReadOnlyPaths"):
        assert not any("/dev" in value for value in service.get(key, [])), f"{key}= covers /dev"
    # (PrivateTmp= is allowed: it replaces /tmp and /var/tmp only, never /dev/shm.)


def _verify(tmp_path: Path, text: str) -> tuple[int, list[str], str]:
    """systemd-analyze verify on ``text``: (exit status, warnings about the unit, stderr)."""
    systemd_analyze = require_tool("systemd-analyze", "/usr/bin/systemd-analyze")
    unit = tmp_path / "netprofd.service"
    unit.write_text(text, encoding="utf-8")
    result = _run(systemd_analyze, "verify", unit, cwd=tmp_path)
    # Unknown keys and unparsable values are warnings naming the file, exit status 0.
    complaints = [line for line in result.stderr.splitlines() if unit.name in line]
    return result.returncode, complaints, result.stderr


def _with_existing_program(text: str) -> str:
    """The unit with an ExecStart whose program exists here (verify insists on that)."""
    netprofd = shutil.which("netprofd")
    program = [netprofd] if netprofd else [sys.executable, "-m", "netprof_daemon"]
    exec_start = shlex.join([*program, "--config", "/etc/netprof/netprofd.toml"])
    lines = text.splitlines()
    rewritten = [f"ExecStart={exec_start}" if line.startswith("ExecStart=") else line for line in lines]
    assert rewritten != lines
    return "\n".join(rewritten) + "\n"


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    status, complaints, stderr = _verify(tmp_path, _with_existing_program(UNIT.read_text(encoding="utf-8")))
    assert status == 0, stderr
    assert not complaints, "\n".join(complaints)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("ExecStart=", "ExecStart=/nonexistent/netprofd --config /etc/netprof/netprofd.toml\n#"),
        ("WatchdogSec=30", "WatchdogSec=30\nWatchdogSecs=30"),
        ("WatchdogSec=30", "WatchdogSec=thirty"),
    ],
    ids=["missing-program", "unknown-key", "bad-value"],
)
def test_systemd_analyze_verify_check_can_fail(tmp_path: Path, old: str, new: str) -> None:
    """The check above can fail: a broken copy of the unit is refused or warned about."""
    text = _with_existing_program(UNIT.read_text(encoding="utf-8"))
    assert old in text
    status, complaints, stderr = _verify(tmp_path, text.replace(old, new, 1))
    assert status != 0 or complaints, stderr


# --- Prometheus ---------------------------------------------------------------


def _promtool() -> str:
    return require_tool("promtool", "/usr/bin/promtool")


def test_promtool_checks_the_prometheus_config(tmp_path: Path) -> None:
    # rule_files is relative to the config file: check a copy with the rules next to it,
    # away from the checkout, so that only the two deployed files are involved.
    for source in (PROMETHEUS / "prometheus.yml", RULES):
        shutil.copy(source, tmp_path / source.name)
    result = _run(_promtool(), "check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_checks_the_rules() -> None:
    result = _run(_promtool(), "check", "rules", RULES.name, cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 rules found" in result.stdout + result.stderr
    text = RULES.read_text(encoding="utf-8")
    for rule in ALERTS:
        assert f"- alert: {rule}\n" in text
    assert "expr: increase(network_profiling_auto_disables[5m]) > 0\n" in text


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = _run(_promtool(), "test", "rules", RULES_TEST.name, cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every rule is tested, each with a firing and a not-firing case.
    text = RULES_TEST.read_text(encoding="utf-8")
    for rule in ALERTS:
        assert text.count(f"alertname: {rule}\n") >= 2, rule


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        # the rule watches a metric the test's series do not have
        (RULES, "expr: network_profiling_memory_mb > 75", "expr: network_profiling_memory_bytes > 75"),
        # the counter-style name, which the guide's expression does not match
        (
            RULES,
            "increase(network_profiling_auto_disables[5m])",
            "increase(network_profiling_auto_disables_total[5m])",
        ),
        # the test expects an annotation the rule does not give
        (RULES_TEST, "summary: \"Network profiling overhead too high\"", "summary: \"wrong\""),
    ],
    ids=["wrong-metric", "counter-name", "wrong-expectation"],
)
def test_promtool_unit_tests_fail_on_a_broken_copy(tmp_path: Path, file: Path, old: str, new: str) -> None:
    """The rule tests can fail: a broken copy of the rules or of their tests does."""
    for source in (RULES, RULES_TEST):
        text = source.read_text(encoding="utf-8")
        if source == file:
            assert old in text
            text = text.replace(old, new)
        (tmp_path / source.name).write_text(text, encoding="utf-8")
    result = _run(_promtool(), "test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "FAILED" in result.stdout + result.stderr


# --- configuration files --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GUIDE_PHASES))
def test_phase_configs_load_with_the_guides_values(name: str) -> None:
    config = load_profiling_config(PHASES / name)
    defaults = ProfilingConfig()
    expected = {key: getattr(defaults, key) for key in ("max_memory_mb", "auto_disable_on_error", "debug")}
    expected |= GUIDE_PHASES[name]
    assert {key: getattr(config, key) for key in expected} == expected
    # Keys the guide leaves out keep their defaults.
    assert config.sample_rate == defaults.sample_rate
    assert config.segment_dir == defaults.segment_dir


def test_phase3_canary_starts_disabled_with_a_small_segment() -> None:
    config = load_profiling_config(PHASES / "phase3-canary.json")
    assert config.enabled is False
    assert config.max_memory_mb == 25.0
    assert config.auto_disable_on_error is True


def test_example_toml_is_phase4_plus_the_daemon_defaults() -> None:
    config = load_daemon_config(EXAMPLE_TOML)
    phase4 = load_profiling_config(PHASES / "phase4-production.json")
    assert config.profiling == phase4
    assert config.daemon == DaemonSettings(api_key_file="/etc/netprof/api_key")
    assert config.daemon.listen == "127.0.0.1:9465"
    assert config.daemon.require_auth is True
    assert config.daemon.metrics_require_auth is False
    assert config.daemon.state_dir == "/var/lib/netprofd"
    # Notifiers and rules are commented-out examples only.
    assert config.notifiers is None  # no table: the log notifier alone
    assert config.rules == ()


def test_example_toml_shows_every_key() -> None:
    text = EXAMPLE_TOML.read_text(encoding="utf-8")
    profiling, _, rest = text.partition("\n[daemon]\n")
    assert "\n[network_profiling]\n" in profiling
    for key, _kind, _default, _help in describe_keys():
        commented = key == "app_name"  # its default, the program's name, is the right one
        assert f"\n{'# ' if commented else ''}{key} = " in profiling, key
    for f in dataclasses.fields(DaemonSettings):
        assert f"\n{f.name} = " in rest, f.name
    for example in ("# [notifiers.apprise]\n", "# urls = [", "# [[rules]]\n"):
        assert example in rest, example


def test_toml_and_json_with_the_same_content_are_the_same_config(tmp_path: Path) -> None:
    toml = tmp_path / "phase4.toml"
    toml.write_text(
        "[network_profiling]\n"
        "enabled = true\n"
        "feature_flag_enabled = true\n"
        "slow_request_threshold = 2.0\n"
        "max_stored_requests = 1000\n"
        "log_slow_requests = true\n"
        "enable_alerts = true\n"
        "alert_slow_request_threshold = 15.0\n"
        "alert_error_rate_threshold = 10.0\n"
        "graceful_degradation = true\n"
        "performance_monitoring = true\n"
        "max_memory_mb = 50.0\n"
        "auto_disable_on_error = true\n",
        encoding="utf-8",
    )
    json_config = load_profiling_config(PHASES / "phase4-production.json")
    assert load_profiling_config(toml) == json_config
    from_json = load_daemon_config(PHASES / "phase4-production.json")
    assert load_daemon_config(toml).profiling == from_json.profiling
    assert json_config != ProfilingConfig()  # the comparison is not between two sets of defaults
