"""External programs some tests need (promtool, Alertmanager, systemd-analyze).

Missing ones skip the test on a developer's machine; CI sets
NETPROF_REQUIRE_TOOLS=1 so that a missing program fails instead of hiding a test.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str, *also_at: str) -> str:
    """The path of program ``name`` (on PATH or at one of ``also_at``), else skip or fail."""
    found = shutil.which(name) or next((p for p in also_at if os.access(p, os.X_OK)), None)
    if found:
        return found
    message = f"{name} is not installed (Debian: apt-get install {_PACKAGES.get(name, name)})"
    if os.environ.get("NETPROF_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


_PACKAGES = {
    "promtool": "prometheus",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "systemd-analyze": "systemd",
    "wrk": "wrk",
}
