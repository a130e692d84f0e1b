"""Overhead guards: NetProfMiddleware on netprof's own benchmark applications
(benchmarks/apps.py), checked by the ``netprof_overhead`` fixture that users run
on theirs (plugins/pytest_overhead.py), once per recorder core.

The bound is far above the 1-3 µs per request the Cython core adds on a laptop:
a guard, on any machine, against a gross regression (a lock, a log line, an
allocation per field on the hot path), not the precise figures, which
test_hook_benchmarks.py keeps. Each check stores the medians and the overhead in
the benchmark's ``extra_info``; report.py prints them.

    cd /work/main && PYTHONPATH=. python -m pytest benchmarks/test_overhead_checks.py -q -p no:cacheprovider
"""

from __future__ import annotations

from apps import PATH, raw_asgi_app, raw_wsgi_app, starlette_app
from netprof_plugins.pytest_overhead import NetProfOverhead

BOUND_US = 20.0


def test_overhead_raw_asgi(netprof_overhead: NetProfOverhead, implementation: str) -> None:
    netprof_overhead.asgi(raw_asgi_app, path=PATH, max_overhead_us=BOUND_US, implementation=implementation)


def test_overhead_starlette(netprof_overhead: NetProfOverhead, implementation: str) -> None:
    netprof_overhead.asgi(starlette_app(), path=PATH, max_overhead_us=BOUND_US, implementation=implementation)


def test_overhead_raw_wsgi(netprof_overhead: NetProfOverhead, implementation: str) -> None:
    netprof_overhead.wsgi(raw_wsgi_app, path=PATH, max_overhead_us=BOUND_US, implementation=implementation)
