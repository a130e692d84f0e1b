"""The public surface: the names other code depends on, each module importing
on its own, and the accelerated core actually loaded when it should be."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import netprof_core

PUBLIC_NAMES = {
    "IMPLEMENTATION",
    "ConfigError",
    "ControlState",
    "Direction",
    "ErrorKind",
    "Histogram",
    "Measurement",
    "ProfilingConfig",
    "Recorder",
    "RequestRecord",
    "RouteKey",
    "RouteStats",
    "SegmentBusy",
    "SegmentControl",
    "SegmentError",
    "SegmentReader",
    "SegmentSnapshot",
    "__version__",
    "get_recorder",
    "load_profiling_config",
    "merge_routes",
    "read_segment",
    "read_segments",
}

MODULES = [
    "netprof_core",
    "netprof_core._layout",
    "netprof_core._recorder",
    "netprof_core._recorder_py",
    "netprof_core._failures",
    "netprof_core._hookpaths",
    "netprof_core._outbound_py",
    "netprof_core._wsgi_py",
    "netprof_core.asgi",
    "netprof_core.cli",
    "netprof_core.clients",
    "netprof_core.config",
    "netprof_core.control",
    "netprof_core.histogram",
    "netprof_core.hooks",
    "netprof_core.log",
    "netprof_core.reader",
    "netprof_core.recorder",
    "netprof_core.segment",
    "netprof_core.wsgi",
]


def test_public_names_are_pinned() -> None:
    assert set(netprof_core.__all__) == PUBLIC_NAMES
    for name in PUBLIC_NAMES:
        assert getattr(netprof_core, name) is not None
    assert not [name for name in netprof_core.__all__ if name.endswith(("_py", "_c"))]


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_on_its_own(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.c_extension
def test_cython_core_loaded() -> None:
    """Fails when the extension was expected but the pure-Python twin was
    silently used (a slow profiler in production)."""
    assert not os.environ.get("NETPROF_NO_EXTENSIONS")
    assert netprof_core.IMPLEMENTATION == "cython"
    core = importlib.import_module("netprof_core._recorder")
    assert core.RecorderCore.__module__ == "netprof_core._recorder_c"


@pytest.mark.c_extension
def test_compiled_hook_paths_loaded() -> None:
    """The hooks' per-request code compiled from the same source, not the
    source itself found through the link."""
    from netprof_core._hookpaths import hook_path

    for name in ("outbound", "wsgi"):
        assert not hook_path(name, "cython").__file__.endswith(".py"), name


def test_hook_paths_follow_the_recorder_core(make_recorder, implementation: str) -> None:
    from netprof_core._hookpaths import hook_path
    from netprof_core.clients import _hook
    from netprof_core.wsgi import NetProfMiddleware

    recorder = make_recorder()
    middleware = NetProfMiddleware(lambda environ, start_response: [], recorder=recorder)
    assert middleware._serve.__self__.__class__.__module__ == hook_path("wsgi", implementation).__name__
    assert type(_hook(recorder, None)).__module__ == hook_path("outbound", implementation).__name__
    assert hook_path("wsgi", "python").__name__ == "netprof_core._wsgi_py"
    assert hook_path("outbound", "python").__name__ == "netprof_core._outbound_py"


def test_no_extensions_variable_forces_the_python_core() -> None:
    env = {**os.environ, "NETPROF_NO_EXTENSIONS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", "import netprof_core; print(netprof_core.IMPLEMENTATION)"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.stdout.strip() == "python", result.stderr


def test_recorder_reports_its_core(make_recorder, implementation: str) -> None:
    assert make_recorder().implementation == implementation
