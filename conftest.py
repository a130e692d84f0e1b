"""Shared by tests/ and benchmarks/: one suite, both recorder cores. Tests ask
for ``implementation`` (or ``make_recorder``) and run once against the Cython
core and once against its pure-Python twin."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from netprof_core import ProfilingConfig, Recorder
from netprof_core._recorder import NO_EXTENSIONS, core_module

IMPLEMENTATIONS = [
    pytest.param("cython", marks=pytest.mark.c_extension, id="cython"),
    pytest.param("python", id="python"),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-c-extensions",
        action="store_true",
        default=NO_EXTENSIONS,
        help="skip the tests of the Cython core (the default when NETPROF_NO_EXTENSIONS is set)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--no-c-extensions"):
        return
    skip = pytest.mark.skip(reason="--no-c-extensions / NETPROF_NO_EXTENSIONS")
    # What does not depend on the core (the HTTP layer, alerting, the
    # scripts) runs once, in the accelerated install: the pure-Python run
    # is for what the cores do differently.
    once = pytest.mark.skip(reason="any_core: the same with either core; run in the accelerated install")
    for item in items:
        if "c_extension" in item.keywords:
            item.add_marker(skip)
        elif "any_core" in item.keywords:
            item.add_marker(once)


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def core(implementation: str) -> ModuleType:
    """The module of the parametrised core, for tests of its free functions
    (pack_words, read_live, ...), which both cores have."""
    return core_module(implementation)


@pytest.fixture
def segment_dir(tmp_path: Path) -> Path:
    path = tmp_path / "segments"
    path.mkdir()
    return path


@pytest.fixture
def make_recorder(implementation: str, segment_dir: Path) -> Iterator[Callable[..., Recorder]]:
    """``make_recorder(**config_keys)``: a recorder of the parametrised core
    writing into this test's segment directory; closed after the test."""
    made: list[Recorder] = []

    def make(**keys: Any) -> Recorder:
        keys.setdefault("segment_dir", str(segment_dir))
        keys.setdefault("app_name", "test-app")
        recorder = Recorder(ProfilingConfig(**keys), implementation=implementation)
        made.append(recorder)
        return recorder

    yield make
    for recorder in made:
        recorder.close()
