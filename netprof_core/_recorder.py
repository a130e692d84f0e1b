"""Selects the recorder core: the Cython extension, or its pure-Python twin
when ``NETPROF_NO_EXTENSIONS`` is set, off CPython, or when asked by name."""

from __future__ import annotations

import os
import platform
import sys
from types import ModuleType
from typing import TYPE_CHECKING

NO_EXTENSIONS = os.environ.get("NETPROF_NO_EXTENSIONS", "") not in ("", "0") or platform.python_implementation() != "CPython"

if sys.byteorder != "little":  # the cores write native words into a little-endian layout
    raise ImportError("netprof_core runs on little-endian hosts only")

if TYPE_CHECKING:
    from ._recorder_py import RecorderCore as RecorderCore  # noqa: PLC0414 - explicit re-export
    from ._recorder_py import add_counts as add_counts  # noqa: PLC0414 - explicit re-export
    from ._recorder_py import subtract_counts as subtract_counts  # noqa: PLC0414 - explicit re-export
else:
    if NO_EXTENSIONS:
        from ._recorder_py import RecorderCore, add_counts, subtract_counts
    else:
        try:
            from ._recorder_c import RecorderCore, add_counts, subtract_counts
        except ImportError:  # the build is made to fail loudly; this is an editable tree
            from ._recorder_py import RecorderCore, add_counts, subtract_counts  # noqa: F401 - re-exported

def implementation_of(core_class: type) -> str:
    return "cython" if core_class.__module__.endswith("_recorder_c") else "python"


IMPLEMENTATION = implementation_of(RecorderCore)

IMPLEMENTATIONS = ("cython", "python")


def core_module(implementation: str | None = None) -> ModuleType:
    """The module of the named core ("cython" or "python"), or of the live one."""
    name = implementation or IMPLEMENTATION
    if name == "python":
        from . import _recorder_py

        return _recorder_py
    if name == "cython":
        from . import _recorder_c  # type: ignore[attr-defined]

        return _recorder_c  # type: ignore[no-any-return]
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
