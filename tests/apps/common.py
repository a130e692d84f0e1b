"""What the test apps share: the wrap switch and the events file."""

from __future__ import annotations

import os

STREAM_CHUNKS = 5
STREAM_CHUNK = b"0123456789abcdef" * 64  # 1 KiB
STREAM_SLEEP = 0.02  # seconds between chunks
SLOW_STREAM_CHUNKS = 200  # a disconnecting client leaves long before the end
SLOW_STREAM_SLEEP = 0.02
EXCLUDE_PATHS = [r"^/healthz$"]


def wrapped() -> bool:
    """Serve the app with netprof's middleware (the default) or bare."""
    return os.environ.get("NETPROF_TEST_WRAP", "1") != "0"


def note_event(event: str) -> None:
    """Append ``event <pid> [core]`` to the events file, if there is one."""
    path = os.environ.get("NETPROF_TEST_EVENTS")
    if not path:
        return
    line = f"{event} {os.getpid()}"
    if event == "startup" and wrapped():
        from netprof_core import get_recorder

        line += f" {get_recorder().implementation}"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
