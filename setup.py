"""Builds the Cython recorder core and the hooks' per-request code (each
``_<name>_c.py`` is a link to ``_<name>_py.py``: one source, compiled here). NETPROF_NO_EXTENSIONS=1 (or a non-CPython
interpreter) installs the pure-Python twin instead; otherwise a failed build
fails the install, since a silent fallback would hide a slow profiler."""

import os
import platform
import sys

from setuptools import Extension, setup

NO_EXTENSIONS = os.environ.get("NETPROF_NO_EXTENSIONS", "") not in ("", "0") or platform.python_implementation() != "CPython"

if NO_EXTENSIONS:
    print("*" * 60, "netprof: installing the pure-Python core", "*" * 60, sep="\n", file=sys.stderr)
    ext_modules = []
else:
    from Cython.Build import cythonize

    print("*" * 60, "netprof: building the accelerated (Cython) core", "*" * 60, sep="\n", file=sys.stderr)
    # Compiler directives are in the .pyx header.
    compiled_twins = ["_asgi_c", "_outbound_c", "_wsgi_c"]
    ext_modules = cythonize(
        [Extension(f"netprof_core.{name}", [f"netprof_core/{name}.pyx"]) for name in ("_recorder_c", "_awaiting_c")]
        + [Extension(f"netprof_core.{name}", [f"netprof_core/{name}.py"]) for name in compiled_twins]
    )

setup(ext_modules=ext_modules)
