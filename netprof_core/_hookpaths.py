"""Selects the hooks' per-request code to match a recorder's core: beside the
Cython core, the modules Cython compiled from the same sources (``_wsgi_c``
from ``_wsgi_py.py``, through the link ``_wsgi_c.py``); beside the pure-Python
twin, those sources themselves."""

from __future__ import annotations

import importlib
from types import ModuleType

from . import _asgi_py, _outbound_py, _wsgi_py
from ._recorder import NO_EXTENSIONS

_PURE: dict[str, ModuleType] = {"asgi": _asgi_py, "outbound": _outbound_py, "wsgi": _wsgi_py}


def _compiled(name: str) -> ModuleType | None:
    if NO_EXTENSIONS:
        return None
    try:
        module = importlib.import_module(f"netprof_core._{name}_c")
    except ImportError:  # the build is made to fail loudly; this is an editable tree
        return None
    # Where the extension was not built, the import finds the link to the source.
    return None if module.__file__ is None or module.__file__.endswith(".py") else module


_COMPILED: dict[str, ModuleType | None] = {name: _compiled(name) for name in _PURE}


def hook_path(name: str, implementation: str) -> ModuleType:
    """The per-request code of hook ``name`` ("asgi", "outbound", "wsgi") for a
    recorder of ``implementation`` ("cython" or "python")."""
    compiled = _COMPILED[name] if implementation == "cython" else None
    return compiled if compiled is not None else _PURE[name]
