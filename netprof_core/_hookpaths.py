"""Selects the hooks' per-request code to match a recorder's core: beside the
Cython core, the modules Cython compiled from the same source (``_wsgi_c``
from ``_wsgi_py.py``); beside the pure-Python twin, that source itself."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from . import _wsgi_py
from ._recorder import NO_EXTENSIONS

if TYPE_CHECKING:
    from . import _wsgi_py as _wsgi_c
elif NO_EXTENSIONS:
    _wsgi_c = None
else:
    try:
        from . import _wsgi_c
    except ImportError:  # the build is made to fail loudly; this is an editable tree
        _wsgi_c = None

if _wsgi_c is not None and _wsgi_c.__file__.endswith(".py"):
    _wsgi_c = None  # the link to the source, found where the extension was not built

_PURE: dict[str, ModuleType] = {"wsgi": _wsgi_py}
_COMPILED: dict[str, ModuleType | None] = {"wsgi": _wsgi_c}


def hook_path(name: str, implementation: str) -> ModuleType:
    """The per-request code of hook ``name`` ("wsgi") for a recorder of
    ``implementation`` ("cython" or "python")."""
    compiled = _COMPILED[name] if implementation == "cython" else None
    return compiled if compiled is not None else _PURE[name]
